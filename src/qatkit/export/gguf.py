"""Write a converted q4_0 / q8_0 checkpoint as a GGUF llama.cpp runs, packing the trained integers as they are.

The converted linears hold exactly the integers and fp16 scales of llama.cpp's Q4_0 / Q8_0 blocks
(`qatkit.quant.gguf_grid`), so they are packed into ggml's block layout byte for byte: nothing is dequantized and
quantized again (which would not be the trained model). Everything else is written as llama.cpp's own QAT releases
keep it: norms F32, token embeddings (and an untied, unquantized lm_head) F16 or Q8_0 (gguf-py's quantizer), and
any linear the scheme skipped F32. What llama.cpp expects beyond HF's layout, as convert_hf_to_gguf.py does it:
  llama:  the rows of q_proj / k_proj permuted from HF's rotate-half rope layout to llama.cpp's interleaved one
          (row-wise, so the blocks of a row move with it: still bit exact); qwen3 and gemma3 use NEOX rope, unpermuted;
  gemma3: RMSNorm weights + 1 (HF's Gemma3RMSNorm multiplies by 1 + w, llama.cpp by w);
  token embedding rows beyond the tokenizer's tokens dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qatkit.core.errors import GateError, RecipeError
from qatkit.export.gguf_meta import KeyValue, gguf_arch
from qatkit.run.layout import ExportDir
from qatkit.run.records import GGUFExportRecord

if TYPE_CHECKING:
    import numpy as np

    from qatkit.recipe import Recipe
    from qatkit.run.rundir import RunDir

log = logging.getLogger(__name__)

FILE_TYPES = {"Q4_0": 2, "Q8_0": 7, "F16": 1}  # gguf LlamaFileType.MOSTLY_*; F16: a float model, every matrix F16
BLOCK = 32


def check_exportable(scheme: str) -> str:
    """The GGUF type of a scheme's converted linears; other schemes hold integers no GGUF type reproduces exactly."""
    from qatkit.quant.registry import get_scheme
    from qatkit.recipe.export import export_refusal

    if why := export_refusal(scheme, "gguf"):
        raise RecipeError(why)
    return get_scheme(scheme).gguf_type


def pack_blocks(q: np.ndarray, d: np.ndarray, qtype: str) -> np.ndarray:
    """ggml's block bytes of int8 q (rows, cols) and fp16 d (rows, cols // 32): per block the 2-byte d, then
    Q4_0: 16 bytes, element j + 8 in the low nibble of byte j and element j + 16 (+ 8) in its high nibble;
    Q8_0: the 32 int8. Returns uint8 (rows, bytes per row)."""
    import numpy as np

    rows, cols = q.shape
    blocks = q.reshape(rows, cols // BLOCK, BLOCK)
    if qtype == "Q4_0":
        u = (blocks.astype(np.int16) + 8).astype(np.uint8)
        payload = u[..., :16] | (u[..., 16:] << 4)
    else:
        payload = blocks.view(np.uint8)
    scale = d.astype(np.float16).reshape(rows, cols // BLOCK, 1).view(np.uint8)
    return np.concatenate([scale, payload], axis=-1).reshape(rows, -1)


def llama_rope_permute(t, n_head: int):
    """convert_hf_to_gguf's LlamaModel.permute on the rows (dim 0) of a q/k weight or of its per-row scales."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


@dataclass(frozen=True)
class Packed:
    name: str
    data: np.ndarray
    raw_dtype: object | None  # gguf.GGMLQuantizationType for block data; None: numpy's dtype (F32 / F16)
    reference: np.ndarray | None = None  # float32 values llama.cpp must read back, for packed integers


def _intx_parts(weight) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 q, fp16 d) of a converted GGUF-grid weight; None for a plain tensor."""
    if not hasattr(weight, "qdata"):
        return None
    if list(weight.block_size) != [1, BLOCK] or weight.zero_point.any():
        raise RecipeError(f"GGUF export: a converted weight has blocks {list(weight.block_size)}, not [1, {BLOCK}]")
    return weight.qdata.cpu().numpy(), weight.scale.cpu().numpy()


def model_tensors(model, qtype: str, embeddings: str, n_tokens: int) -> Iterator[Packed]:
    """Every tensor of a converted model under its GGUF name, laid out and typed for llama.cpp."""
    import gguf
    import numpy as np

    config = model.config
    arch = gguf_arch(config.model_type)
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for hf_name, param in model.named_parameters():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise RecipeError(f"GGUF export: no llama.cpp {arch} tensor for {hf_name}")
        parts = _intx_parts(param)
        permute = arch == "llama" and hf_name.split(".")[-2] in heads
        if parts is not None:
            q, d = parts
            if permute:
                n = heads[hf_name.split(".")[-2]]
                q, d = llama_rope_permute(q, n), llama_rope_permute(d, n)
            ref = (q.reshape(q.shape[0], -1, BLOCK).astype(np.float32) * d.astype(np.float32)[..., None]).reshape(
                q.shape
            )
            yield Packed(name, pack_blocks(q, d, qtype), getattr(gguf.GGMLQuantizationType, qtype), ref)
            continue
        w = param.detach().float().cpu().numpy()
        if permute:
            w = llama_rope_permute(w, heads[hf_name.split(".")[-2]])
        if arch == "gemma3" and hf_name.endswith("norm.weight"):
            w = w + np.float32(1)
        if name in ("token_embd.weight", "output.weight"):
            w = w[:n_tokens]
            if embeddings == "q8_0":
                yield Packed(
                    name, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
                )
            else:
                yield Packed(name, w.astype(np.float16), None)
            continue
        yield Packed(name, w.astype(np.float16) if qtype == "F16" and w.ndim == 2 else w, None)


def write_gguf(path: Path, arch: str, tensors: list[Packed], kvs: list[KeyValue], special_vocab, qtype: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for kv in kvs:
        writer.add_key_value(kv.key, kv.value, kv.vtype, kv.sub_type)
    if special_vocab is not None:
        special_vocab.add_to_gguf(writer, quiet=True)
    for t in tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_back_exact(path: Path, tensors: list[Packed]) -> list[str]:
    """Names of packed tensors that gguf-py's dequantize of the written file does not give bit for bit."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    stored = {t.name: t for t in GGUFReader(path).tensors}
    wrong = []
    for t in tensors:
        if t.reference is None:
            continue
        got = dequantize(stored[t.name].data, stored[t.name].tensor_type).reshape(t.reference.shape)
        if not np.array_equal(got.view(np.uint32), t.reference.view(np.uint32)):
            wrong.append(t.name)
    return wrong


def export_gguf(model, source: str, out: Path, qtype: str, embeddings: str) -> dict:
    """Write `model` (converted to the GGUF type `qtype`, see `check_exportable`; F16: a float model) to `out`, its
    metadata and tokenizer from `source` (the recipe's model: an HF directory, or a GGUF whose keys are copied);
    returns what was written and whether gguf-py reads every packed tensor back bit for bit."""
    from qatkit.export.gguf_meta import arch_key_values, gguf_source_key_values, hf_tokenizer_key_values
    from qatkit.models.loading import resolve_model

    arch = gguf_arch(model.config.model_type)
    src = resolve_model(source)
    if src.gguf_file:
        source_arch, kvs = gguf_source_key_values(Path(src.path) / src.gguf_file)
        if source_arch != arch:
            raise RecipeError(f"GGUF export: the source GGUF is {source_arch}, the model {arch}")
        special_vocab = None
    else:
        tokenizer_kvs, special_vocab = hf_tokenizer_key_values(Path(src.path))
        kvs = arch_key_values(model.config) + tokenizer_kvs
    n_tokens = len(next(kv.value for kv in kvs if kv.key == "tokenizer.ggml.tokens"))
    tensors = list(model_tensors(model, qtype, embeddings, n_tokens))
    write_gguf(out, arch, tensors, kvs, special_vocab, qtype)
    types: dict[str, int] = {}
    for t in tensors:
        kind = t.raw_dtype.name if t.raw_dtype is not None else {"float32": "F32", "float16": "F16"}[t.data.dtype.name]
        types[kind] = types.get(kind, 0) + 1
    return {
        "file": out.name,
        "bytes": out.stat().st_size,
        "architecture": arch,
        "weights": qtype,
        "embeddings": embeddings.upper(),
        "tensor_types": types,
        "metadata_from": "gguf" if src.gguf_file else "hf",
        "packed_not_bit_exact": read_back_exact(out, tensors),
    }


def export(run: RunDir, recipe: Recipe, parity_min_sqnr: float | None = None) -> dict:
    """<run>/export/model.gguf and gguf.json from the converted checkpoint, checked in llama.cpp when it is installed
    (parity batch: the convert stage's); the manifest gets the record. The files are published before the gate, so
    a failed one (exit 4) leaves them to inspect."""
    from qatkit.export import export_work, parity_sequences
    from qatkit.export.gguf_engine import ENGINE_MISSING, engine_parity, engine_version
    from qatkit.models.loading import load_model_and_tokenizer

    spec = recipe.export.gguf
    qtype = check_exportable(recipe.quant.name)
    model, tokenizer = load_model_and_tokenizer(recipe.model, str(run.convert.root))
    sequences = parity_sequences(tokenizer, run, recipe)
    with export_work(run, owned=(run.export.gguf.name, run.export.gguf_record.name)) as work:
        files = ExportDir(work)
        info = export_gguf(model, recipe.model.name_or_path, files.gguf, qtype, spec.embeddings)
        threshold = spec.parity_min_sqnr if parity_min_sqnr is None else parity_min_sqnr
        record = GGUFExportRecord(**info, threshold_db=threshold)
        if engine_version() is None:
            log.warning(ENGINE_MISSING)
            record.llama_cpp_skipped = ENGINE_MISSING
        else:
            record.llama_cpp = engine_parity(files.gguf, model, sequences)
        record.save(files.gguf_record)
    run.update_manifest(export={"gguf": record.to_dict()})
    gate(record)
    return {"format": "gguf", "gguf": str(run.export.gguf), **record.to_dict()}


def gate(record: GGUFExportRecord) -> None:
    """Exit 4 when a packed tensor is not what was trained, or llama.cpp's logits are below export.gguf's gate."""
    if record.packed_not_bit_exact:
        raise GateError(f"GGUF export: {', '.join(record.packed_not_bit_exact)} read back differently than packed")
    if record.llama_cpp and record.llama_cpp["sqnr_db"] < record.threshold_db:
        raise GateError(
            f"GGUF parity gate failed: llama.cpp vs converted logits SQNR {record.llama_cpp['sqnr_db']:.1f} dB "
            f"< export.gguf.parity_min_sqnr={record.threshold_db} dB"
        )
