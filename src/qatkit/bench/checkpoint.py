"""Converted checkpoint size on disk vs bf16 and vs the scheme's theoretical floor."""

import json
import math
import shutil
import tempfile
from pathlib import Path

from qatkit.bench.common import (
    load_kwargs,
    quiet,
)
from qatkit.core.metrics import unique_param_count


def save_converted(model_dir: str | Path, scheme_name: str, out: str | Path) -> dict:
    """PTQ through the convert stage's path (prepare + convert, attach the HF quantizer, save_pretrained).

    Returns what the size floor needs: the module plan, the parameter count and the dtype.
    """
    from transformers import AutoModelForCausalLM

    from qatkit.quant.apply import attach_hf_quantizer, quantize_ptq
    from qatkit.quant.plan import plan_modules
    from qatkit.quant.spec import QuantSpec

    quiet()
    spec = QuantSpec.named(scheme_name)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **load_kwargs())
    params = unique_param_count(model)
    plan = plan_modules(model, spec)
    tied_out = model.get_output_embeddings().weight.numel() if plan.untie_embeddings else 0
    converted = quantize_ptq(model, spec)
    attach_hf_quantizer(model, converted)
    model.save_pretrained(str(out))
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    except (OSError, ValueError):
        pass  # a model dir without a tokenizer still benchmarks; generate only needs token ids
    return {
        "params": params,
        "untied_lm_head_params": tied_out,
        "plan": plan,
        "dtype": str(model.dtype).removeprefix("torch."),
        "quantized_modules": len(converted),
    }


def _safetensors_breakdown(ckpt: Path) -> dict[str, dict]:
    """Bytes per role (quantized data, scales, zero points, other) and dtype, from the safetensors headers."""
    roles: dict[str, dict] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            leaf = name.rsplit(".", 1)[-1]
            role = (
                "quantized_data"
                if "qdata" in leaf
                else "scales"
                if "scale" in leaf
                else "zero_points"
                if "zero_point" in leaf
                else "other"
            )
            start, end = meta["data_offsets"]
            entry = roles.setdefault(role, {"bytes": 0, "tensors": 0, "dtypes": {}})
            entry["bytes"] += end - start
            entry["tensors"] += 1
            entry["dtypes"][meta["dtype"]] = entry["dtypes"].get(meta["dtype"], 0) + end - start
    return roles


def size_floor(plan, params: int, untied_lm_head_params: int, scheme_name: str, other_bytes: float = 2.0) -> dict:
    """The scheme's theoretical checkpoint size: quantized weights at their bit width, one 16-bit scale
    per group (or per output channel), no zero points (the schemes are symmetric), and every other
    parameter at `other_bytes` bytes (2: bf16)."""
    from qatkit.quant.registry import get_scheme

    quantized_params = weight_bytes = scales = 0
    for m in plan.quantized:
        rows, cols = m.shape
        quantized_params += rows * cols
        if m.kind == "embedding":  # IntxWeightOnly int8 per row
            weight_bytes += rows * cols * 8 / 8
            scales += rows
        else:
            weight_bytes += rows * cols * get_scheme(scheme_name).weight_bits / 8
            scales += rows * (math.ceil(cols / plan.group_size) if plan.group_size else 1)
    other = params + untied_lm_head_params - quantized_params
    return {
        "bytes": weight_bytes + scales * 2 + other * other_bytes,
        "quantized_weight_bytes": weight_bytes,
        "scale_bytes": scales * 2,
        "unquantized_params": other,
        "unquantized_bytes": other * other_bytes,
    }


def checkpoint_size(model_dir: str | Path, scheme: str, keep_dir: str | Path | None = None) -> dict:
    """Bytes on disk of the converted checkpoint vs bf16 (2 bytes/param) and vs the scheme's floor.

    The floor counts unquantized parameters at 16 bits; `floor_at_model_dtype` counts them (and the
    scales) at the dtype the checkpoint was saved in (fp32 on CPU), which is what convert writes here.
    """
    tmp = None
    if keep_dir is None:
        tmp = tempfile.mkdtemp(prefix="qatkit-bench-ckpt-")
        keep_dir = Path(tmp) / "ckpt"
    keep_dir = Path(keep_dir)
    try:
        info = save_converted(model_dir, scheme, keep_dir)
        weights = sum(f.stat().st_size for f in keep_dir.glob("*.safetensors"))
        total = sum(f.stat().st_size for f in keep_dir.rglob("*") if f.is_file())
        bf16 = info["params"] * 2
        floor = size_floor(info["plan"], info["params"], info["untied_lm_head_params"], scheme)
        dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(info["dtype"], 4)
        floor_dtype = size_floor(
            info["plan"], info["params"], info["untied_lm_head_params"], scheme, other_bytes=dtype_bytes
        )
        floor_dtype["bytes"] += floor_dtype["scale_bytes"] * (dtype_bytes / 2 - 1)  # scales at model dtype too
        return {
            "scheme": scheme,
            "saved_dtype": info["dtype"],
            "params": info["params"],
            "quantized_modules": info["quantized_modules"],
            "group_size": info["plan"].group_size,
            "weights_bytes": weights,
            "dir_bytes": total,
            "bf16_bytes": bf16,
            "floor_bytes": floor["bytes"],
            "floor": floor,
            "floor_at_model_dtype_bytes": floor_dtype["bytes"],
            "ratio_vs_bf16": weights / bf16,
            "ratio_vs_floor": weights / floor["bytes"],
            "ratio_vs_floor_at_model_dtype": weights / floor_dtype["bytes"],
            "breakdown": _safetensors_breakdown(keep_dir),
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
