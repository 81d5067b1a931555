"""The GGUF schemes (q4_0, q8_0): qatkit's fake quantizer is llama.cpp's grid bit for bit, checked against gguf-py
itself (its quantize, dequantize and block bytes), its gradient is straight-through, and convert stores exactly
those integers and scales in a checkpoint plain transformers loads."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from qatkit.quant.apply import attach_hf_quantizer, convert, prepare
from qatkit.quant.gguf_grid import GGUFFakeQuantizeConfig, GGUFFakeQuantizer, fake_quantize, quantize
from qatkit.quant.patches import cache_frozen_weight_fake_quant, signature
from qatkit.quant.spec import QuantSpec

QTYPES = ["Q4_0", "Q8_0"]
SCHEME = {"Q4_0": "q4_0", "Q8_0": "q8_0"}
QMAX = {"Q4_0": 8, "Q8_0": 127}  # Q4_0's d = max / -8, Q8_0's d = absmax / 127


def gguf_blocks(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """gguf-py's quantized bytes unpacked: (int8 q shaped like the weight, fp16 d per block of 32)."""
    if qtype == "Q4_0":  # 2-byte fp16 d, then 16 bytes: element j in the low nibble of byte j, j + 16 in the high one
        b = raw.reshape(-1, 18)
        nibbles = b[:, 2:]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int8) - 8
    else:  # 2-byte fp16 d, then 32 int8
        b = raw.reshape(-1, 34)
        q = b[:, 2:].copy().view(np.int8)
    d = b[:, :2].copy().view(np.float16)[:, 0]
    return q.reshape(shape), d.reshape(shape[0], shape[1] // 32)


def blocks_of(*values: list[float]) -> np.ndarray:
    """One row of 32-weight blocks, each the given values padded with zeros."""
    return np.concatenate([np.pad(np.asarray(v, np.float32), (0, 32 - len(v))) for v in values])[None, :]


def ties(qtype: str) -> np.ndarray:
    """Blocks whose d is a power of two, so x·id lands exactly on k + 0.5 (and, for Q4_0, x·id + 8.5 on an integer)."""
    rows = []
    for d in (1.0, 0.25, 2.0**-10, 64.0):
        peak = -QMAX[qtype] * d if qtype == "Q4_0" else QMAX[qtype] * d
        halves = (
            [(k + 0.5) * d for k in range(-8, 8)] if qtype == "Q4_0" else [(k + 0.5) * d for k in range(-127, 127, 9)]
        )
        rows.append(np.concatenate([[peak], halves, [-h for h in halves]])[:32])
    return blocks_of(*rows)


def cases(qtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mixed = rng.standard_normal((8, 256)).astype(np.float32) * np.float32(0.02)
    mixed[:, 32:64] *= 1e4  # a block of outliers beside ordinary ones
    mixed[:, 64:96] *= 1e-6
    return {
        "normal": rng.standard_normal((48, 256)).astype(np.float32),
        "tiny": (rng.standard_normal((16, 128)) * 1e-30).astype(np.float32),
        "large": (rng.standard_normal((16, 128)) * 3e3).astype(np.float32),
        "mixed-magnitudes": mixed,
        "half-ties": ties(qtype),
        # Q4_0 keeps the max's sign: positive and negative peaks, and ±peak ties (the first wins, as numpy's argmax)
        "signed-peaks": blocks_of([0.1, 3.0, -1.0], [0.1, -3.0, 1.0], [2.0, -2.0, 0.5], [-2.0, 2.0, 0.5], [5.0] * 32),
        "zero-blocks": blocks_of([0.0], [0.0, 1.0, -0.5], [-0.0, 0.0], [1e-3, -2e-3]),
        "uniform": rng.uniform(-1, 1, (32, 64)).astype(np.float32),
    }


def gguf_reference(arr: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dequantized, q, d) as gguf-py computes them from float32 data."""
    t = getattr(GGMLQuantizationType, qtype)
    raw = gguf_quantize(arr.astype(np.float32), t)
    return gguf_dequantize(raw, t), *gguf_blocks(raw, qtype, arr.shape)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize(
    "case", ["normal", "tiny", "large", "mixed-magnitudes", "half-ties", "signed-peaks", "zero-blocks", "uniform"]
)
def test_grid_is_gguf_py_bit_for_bit(qtype, case):
    arr = cases(qtype)[case]
    ref, ref_q, ref_d = gguf_reference(arr, qtype)
    w = torch.from_numpy(arr)
    mine = fake_quantize(w, qtype)
    assert mine.dtype == torch.float32
    assert np.array_equal(mine.numpy(), ref)
    assert np.array_equal(mine.numpy().view(np.uint32), ref.view(np.uint32))  # the same bits, signed zeros included
    q, d = quantize(w, qtype)
    assert q.dtype == torch.int8 and d.dtype == torch.float16
    assert np.array_equal(q.numpy(), ref_q)
    assert np.array_equal(d.numpy().view(np.uint16), ref_d.view(np.uint16))  # the fp16 scales, bit for bit
    lo, hi = (-8, 7) if qtype == "Q4_0" else (-127, 127)
    assert lo <= q.min() and q.max() <= hi


def test_the_cases_hit_what_they_are_named_for():
    """The special cases really occur: exact halves, a zero max, both signs of a Q4_0 peak, a first-wins tie."""
    for qtype in QTYPES:
        arr = cases(qtype)["half-ties"]
        _, _, d = gguf_reference(arr, qtype)
        scaled = arr.reshape(-1, 32) / d.astype(np.float32).reshape(-1, 1)
        assert (np.abs(scaled - np.trunc(scaled)) == 0.5).sum() >= 40
        _, q, d = gguf_reference(cases(qtype)["zero-blocks"], qtype)
        assert d[0, 0] == 0 and d[0, 2] == 0 and not q[0, :32].any() and not q[0, 64:96].any()
    _, q, d = gguf_reference(cases("Q4_0")["signed-peaks"], "Q4_0")
    assert d[0, 0] < 0 < d[0, 1]  # d = max / -8 carries the sign of the peak
    assert d[0, 2] < 0 < d[0, 3]  # ±2: the first one is the peak
    assert q[0, 32 + 1] == -8 and q[0, 3 * 32] == -8


@pytest.mark.parametrize("qtype", QTYPES)
def test_bf16_weight_is_quantized_from_its_float32_values(qtype):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(32, 128, generator=g) * 0.05).to(torch.bfloat16)
    ref, ref_q, ref_d = gguf_reference(w.float().numpy(), qtype)
    mine = fake_quantize(w, qtype)
    assert mine.dtype == torch.bfloat16
    assert torch.equal(mine, torch.from_numpy(ref).to(torch.bfloat16))
    q, d = quantize(w, qtype)
    assert np.array_equal(q.numpy(), ref_q) and np.array_equal(d.numpy().view(np.uint16), ref_d.view(np.uint16))


@pytest.mark.parametrize("qtype", QTYPES)
def test_blocks_too_small_for_a_float32_inverse_dequantize_like_gguf_py(qtype):
    """A block max below ~1e-37 makes 1/d overflow; fp16(d) is then 0 and the block dequantizes to zeros in both."""
    arr = (np.random.default_rng(2).standard_normal((4, 64)) * 1e-39).astype(np.float32)
    with np.errstate(all="ignore"):
        ref, _, _ = gguf_reference(arr, qtype)
    assert np.array_equal(fake_quantize(torch.from_numpy(arr), qtype).numpy(), ref)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_is_straight_through(qtype, dtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g).to(dtype).requires_grad_(True)
    upstream = torch.randn(16, 64, generator=g).to(dtype)
    fq = GGUFFakeQuantizer(GGUFFakeQuantizeConfig(qtype))
    out = fq(w)
    assert torch.equal(out.detach(), fake_quantize(w.detach(), qtype))
    (out * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_config_repr_and_refusals():
    assert repr(GGUFFakeQuantizeConfig("Q4_0")) == "GGUFFakeQuantizeConfig(qtype='Q4_0', block_size=32)"
    assert GGUFFakeQuantizeConfig("Q8_0").range_learning is False
    with pytest.raises(ValueError, match="unknown GGUF type"):
        GGUFFakeQuantizeConfig("Q4_K")
    with pytest.raises(ValueError, match="32"):
        GGUFFakeQuantizeConfig("Q4_0", block_size=64)
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize(torch.zeros(2, 48), "Q4_0")


def _load(model_dir, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


@pytest.mark.parametrize(
    ("qtype", "dtype", "lm_head"),
    [(q, dt, False) for q in QTYPES for dt in (torch.float32, torch.bfloat16)] + [("Q4_0", torch.float32, True)],
)
def test_convert_stores_the_gguf_integers_and_runs_the_fake_quant_forward(
    qtype, dtype, lm_head, tiny_model_dir, tmp_path
):
    """Converted weights hold gguf-py's q and fp16 d of each trained weight; converted logits == fake-quant logits,
    in memory and reloaded by plain from_pretrained in a fresh process. Embeddings and lm_head stay unquantized
    unless qat.quantize_lm_head asks for lm_head (then on the same grid, untied first)."""
    spec = dataclasses.replace(QuantSpec.named(SCHEME[qtype]), quantize_lm_head=lm_head)
    model = _load(tiny_model_dir, dtype)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # weights as training leaves them: not the init's, and with an outlier block
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.add_(torch.randn(mod.weight.shape, generator=g).to(dtype) * 0.01)
                mod.weight[:, :32] *= 50
    plan = prepare(model, spec)
    quantized = {m.fqn for m in plan.quantized}
    assert ("lm_head" in quantized) == lm_head and not any("embed" in f for f in quantized)
    assert all(type(model.get_submodule(f).weight_fake_quantizer) is GGUFFakeQuantizer for f in quantized)
    assert all(model.get_submodule(f).activation_fake_quantizer is None for f in quantized)
    weights = {f: model.get_submodule(f).weight.detach().clone() for f in quantized}
    x = torch.randint(3, 200, (3, 20), generator=g)
    with torch.no_grad():
        fake_quant = model(x).logits
    converted = convert(model, spec)
    assert set(converted) == quantized
    with torch.no_grad():
        deployed = model(x).logits
    assert torch.equal(deployed, fake_quant)
    lo, hi = (-8, 7) if qtype == "Q4_0" else (-127, 127)
    for fqn, w in weights.items():
        t = model.get_submodule(fqn).weight
        assert type(t).__name__ == "IntxUnpackedToInt8Tensor" and t.dtype == dtype
        _, ref_q, ref_d = gguf_reference(w.float().numpy(), qtype)
        assert np.array_equal(t.qdata.numpy(), ref_q), fqn
        assert np.array_equal(t.scale.numpy().view(np.uint16), ref_d.view(np.uint16)), fqn
        assert lo <= t.qdata.min() and t.qdata.max() <= hi and not t.zero_point.any()

    attach_hf_quantizer(model, converted)
    model.save_pretrained(tmp_path / "ckpt")
    torch.save({"x": x, "logits": deployed}, tmp_path / "ref.pt")
    fqn = "lm_head" if lm_head else "model.layers.0.mlp.down_proj"
    torch.save({"qdata": model.get_submodule(fqn).weight.qdata}, tmp_path / "q.pt")
    code = (
        "import torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}); r = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        f"q = torch.load({str(tmp_path / 'q.pt')!r})['qdata']; w = m.get_submodule({fqn!r}).weight\n"
        "with torch.no_grad(): out = m(r['x']).logits\n"
        "print(torch.equal(out, r['logits']), torch.equal(w.qdata, q), w.scale.dtype)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-3:] == ["True", "True", "torch.float16"], out.stdout


def test_signature_and_frozen_weight_cache(tiny_model_dir):
    """The QAT signature names the GGUF grid (convert checks it), and the fq(W) cache of frozen weights keeps the
    logits unchanged."""
    model = _load(tiny_model_dir, torch.float32)
    prepare(model, QuantSpec.named("q4_0"))
    sig = signature(model)
    assert sig["model.layers.0.self_attn.q_proj"] == (
        "act=None weight=GGUFFakeQuantizeConfig(qtype='Q4_0', block_size=32)"
    )
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randint(3, 200, (2, 16))
    with torch.no_grad():
        before = model(x).logits
        assert cache_frozen_weight_fake_quant(model) == len(sig)
        assert torch.equal(model(x).logits, before)
        assert torch.equal(model(x).logits, before)  # served from the cache


@pytest.mark.parametrize("qtype", QTYPES)
def test_learned_scales_start_at_gguf_py_and_train_what_exports(qtype):
    """With range learning each block's scale starts as gguf-py's d, the forward is exactly the dequantized
    integers convert stores on the (fp16) learned scale, and the scale gets an LSQ gradient: nonzero, and none
    reaches a weight clamped outside the range."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(6, 96, generator=g)
    w[:, 5] *= 20
    fq = GGUFFakeQuantizer(GGUFFakeQuantizeConfig(qtype, range_learning=True))
    assert repr(fq.config).endswith("range_learning=True)")
    out = fq(w)
    _, ref_q, ref_d = gguf_reference(w.numpy(), qtype)
    assert fq.scale.dtype == torch.float32 and fq.scale.shape == (6, 3)
    assert np.array_equal(fq.scale.detach().to(torch.float16).numpy().view(np.uint16), ref_d.view(np.uint16))
    q, d = fq.quantize(w)
    assert np.mean(q.numpy() == ref_q) > 0.99  # gguf-py divides by the float32 d, the learned grid by its fp16
    assert torch.equal(out, (q.float().reshape(6, 3, 32) * d.float().unsqueeze(-1)).reshape(6, 96))

    with torch.no_grad():
        fq.scale.mul_(0.5)  # half the range: the largest weights of each block now clamp
    w.requires_grad_(True)
    fq(w).pow(2).sum().backward()
    assert fq.scale.grad.abs().min() > 0
    clamped = (w.detach().reshape(6, 3, 32) / fq.scale.detach().unsqueeze(-1)).abs() > (8 if qtype == "Q4_0" else 127)
    assert clamped.any() and (w.grad.reshape(6, 3, 32)[clamped] == 0).all()
