"""Typed records of what stages write into a run dir, read back by later stages, the report and the benchmarks.

Each is a dataclass saved as JSON (the same files and keys as always); `load` returns None for a missing file and
ignores keys an older or newer qatkit wrote that this one does not know.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from qatkit.core.io import read_json, write_json_atomic

if TYPE_CHECKING:
    from qatkit.quant.plan import Plan

R = TypeVar("R", bound="Record")


class Record:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls: type[R], data: dict) -> R:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls: type[R], path: Path) -> R | None:
        data = read_json(path)
        return None if data is None else cls.from_dict(data)


@dataclass
class TrainResult(Record):
    """One training run (the QAT run or the no-QAT control), as a backend returns it."""

    steps: int
    final_loss: float | None
    first_loss: float | None
    seconds: float
    loss_history: list[dict] = field(default_factory=list)
    fake_quantized_modules: int = 0
    lora_layers: int = 0
    resumed_from_step: int | None = None

    def summary(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k != "loss_history"}


@dataclass
class TrainSummary(Record):
    """finetune/train_summary.json: the QAT run, its backend, and the control run when there was one."""

    backend: str
    steps: int
    final_loss: float | None
    first_loss: float | None
    seconds: float
    fake_quantized_modules: int = 0
    lora_layers: int = 0
    resumed_from_step: int | None = None
    control: dict | None = None  # the control's TrainResult summary plus its cache_key

    def to_dict(self) -> dict:
        data = super().to_dict()
        if data["control"] is None:
            del data["control"]
        return data


@dataclass
class QatPlanRecord(Record):
    """qat_plan.json: which modules the scheme quantized (finetune: also the LoRA mode and the exact fake-quantize
    configs, so convert can prove it rebuilt what was trained)."""

    scheme: str
    group_size: int | None
    untie_embeddings: bool
    quantized: list[str]
    skipped: dict[str, str]
    lora_mode: str | None = None
    signature: dict[str, str] | None = None

    @classmethod
    def from_plan(cls, plan: Plan, lora_mode: str | None = None, signature: dict[str, str] | None = None):
        return cls(**plan.to_dict(), lora_mode=lora_mode, signature=signature)

    def to_dict(self) -> dict:
        return {k: v for k, v in super().to_dict().items() if v is not None or k == "group_size"}


@dataclass
class Parity(Record):
    """convert/parity.json: logits of the converted model against the model as trained, SQNR in dB."""

    as_trained_vs_converted: dict | None  # {"sqnr_db", "max_abs_diff"}; None for PTQ (nothing was trained)
    fake_quant_merged_vs_converted: dict
    reloaded_vs_in_memory: dict
    qat_lora_mode: str
    threshold_db: float
    tokens: int

    @property
    def gated(self) -> dict:
        """The comparison the gate checks: against the model as trained, else against its fake quantization."""
        return self.as_trained_vs_converted or self.fake_quant_merged_vs_converted

    def sqnr_by_comparison(self) -> dict[str, float]:
        return {k: v["sqnr_db"] for k, v in self.to_dict().items() if isinstance(v, dict)}


@dataclass
class GGUFExportRecord(Record):
    """export/gguf.json: what the GGUF holds, whether its packed tensors read back bit for bit, and how llama.cpp
    ran it against the converted model."""

    file: str
    bytes: int
    architecture: str
    weights: str  # the GGUF type of the quantized linears (Q4_0 / Q8_0)
    embeddings: str
    tensor_types: dict[str, int]
    metadata_from: str  # hf (config + tokenizer.json) or gguf (copied from the source GGUF)
    packed_not_bit_exact: list[str]
    threshold_db: float
    llama_cpp: dict | None = None  # engine_parity's figures; None when llama-cpp-python is not installed
    llama_cpp_skipped: str | None = None


@dataclass
class ExecutorchExport(Record):
    """export/executorch.json: the .pte's size against the scheme's floor, and its logits in the ExecuTorch runtime
    against the converted model's ({"sqnr_db", "max_abs_diff", "top1_agreement", "tokens", "sequences"})."""

    scheme: str
    max_seq_len: int
    pte_bytes: int
    floor: dict  # {"bytes", "quantized_weight_bytes", "scale_bytes"}
    parity: dict
    threshold_db: float
    lower_seconds: float


@dataclass
class EvalResults(Record):
    """eval/results.json: every variant's scores on the same tasks and items."""

    tasks: list[str]
    primary_metric: dict[str, str]
    limit: int | float | None
    num_fewshot: int
    variants: dict[str, dict]  # variant name -> {"dtype", "tasks": {task: metrics}, "text_nll"?}
    seconds: dict[str, float | str]
