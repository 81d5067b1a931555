"""The recipe's `export` section: which deployment formats `qatkit run` writes, and their parity gates."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from qatkit.quant.registry import get_scheme, list_schemes
from qatkit.recipe.strict import Strict


def export_refusal(scheme: str, fmt: str) -> str | None:
    """Why runs of `scheme` cannot be exported to `fmt`, naming the schemes that can (None: they can)."""
    if get_scheme(scheme).exports(fmt):
        return None
    can = ", ".join(s.name for s in list_schemes() if s.exports(fmt))
    if fmt == "gguf":
        return (
            f"GGUF export packs the trained integers exactly, which only the schemes {can} (llama.cpp's own grids) "
            f"allow; {scheme} has another grid (int8-int4 also quantizes activations as llama.cpp does not): train "
            "with one of those"
        )
    return f"scheme {scheme} does not export to {fmt} (schemes that do: {can})"


class GGUFExportSpec(Strict):
    embeddings: Literal["f16", "q8_0"] = Field(
        "f16",
        description="Type of the token embeddings (and of an untied lm_head the scheme leaves unquantized) in the GGUF: "
        "f16 as Google's Gemma 3 QAT Q4_0 GGUFs keep them, or q8_0 (gguf-py's quantizer; not trained on).",
    )
    parity_min_sqnr: float = Field(
        30.0,
        description="Gate: SQNR (dB) of llama.cpp's logits vs the converted model's on the parity batch must reach "
        "this, else exit 4 (checked when llama-cpp-python is installed).",
    )


class ExecutorchExportSpec(Strict):
    max_seq_len: int = Field(
        1024,
        gt=1,
        description="Tokens the .pte's static KV cache holds, prompt and generated ones together (the Qwen3-4B "
        "card exports 1024).",
    )
    parity_min_sqnr: float = Field(
        25.0,
        description="Gate: SQNR (dB) of the .pte's logits in the ExecuTorch runtime vs the converted model's, on the "
        "convert stage's parity texts, must reach this, else exit 4 and no .pte is published.",
    )


class ExportSpec(Strict):
    formats: list[Literal["gguf", "executorch"]] = Field(
        default_factory=list,
        description="Formats `qatkit run` exports the converted model to after its stages, into <out>/export/: gguf "
        "(llama.cpp; schemes q4_0 and q8_0, their trained integers packed as they are), executorch (model.pte for "
        "XNNPACK; int8-int4). None by default; `qatkit export RUN_DIR --format F` does one later.",
    )
    gguf: GGUFExportSpec = Field(GGUFExportSpec(), description="Settings of the GGUF export.")
    executorch: ExecutorchExportSpec = Field(
        ExecutorchExportSpec(), description="The ExecuTorch (.pte) export: KV-cache length and runtime parity gate."
    )
