"""Every scheme on CPU: prepare -> train steps (weights move) -> merge -> convert -> save -> reload (exact).

Schemes whose convert needs CUDA are prepared and trained here; their convert runs in tests/gpu.
"""

import dataclasses
import subprocess
import sys

import pytest
import torch

from qatkit.core.errors import EnvError
from qatkit.core.metrics import sqnr_db
from qatkit.models.assembly import attach_lora
from qatkit.quant.apply import attach_hf_quantizer, convert, prepare, quantize_ptq
from qatkit.quant.hardware import can_convert_here, hardware_ok
from qatkit.quant.patches import cache_frozen_weight_fake_quant, each_fake_quantizer, fake_quant_off, fake_quantizers
from qatkit.quant.plan import plan_modules, untie_embeddings
from qatkit.quant.registry import canonical_name, get_scheme, list_schemes
from qatkit.quant.scales import MSE_CLIP_RATIOS, learned_scales
from qatkit.quant.spec import QuantSpec
from qatkit.recipe import validate_recipe

ALL = [s.name for s in list_schemes()]
TRAINABLE_HERE = [s.name for s in list_schemes() if hardware_ok(s.train_on)]
CONVERTIBLE_HERE = [s.name for s in list_schemes() if can_convert_here(s)]
CUDA_CONVERT = [s.name for s in list_schemes() if s.convert_on != "cpu" and s.train_on == "cpu"]

# expected fake quantizer classes (activation, weight) on the linears, like Unsloth's test_qat.py
EXPECTED_FQ = {
    "int4": (None, "Int4WeightFakeQuantizer"),
    "int8": (None, "IntxFakeQuantizer"),
    "int8-int4": ("IntxFakeQuantizer", "IntxFakeQuantizer"),
    "w4-intx": (None, "IntxFakeQuantizer"),
    "w4-channel": (None, "IntxFakeQuantizer"),
    "fp8-int4": ("Float8FakeQuantizer", "Int4WeightFakeQuantizer"),
    "fp8-fp8": ("Float8FakeQuantizer", "Float8FakeQuantizer"),
    "q4_0": (None, "GGUFFakeQuantizer"),
    "q8_0": (None, "GGUFFakeQuantizer"),
}


def recipe_for(scheme: str, lora_mode: str = "merged"):
    return validate_recipe(
        {
            "name": "t",
            "model": {"name_or_path": "x/y"},
            "qat": {"scheme": scheme, "lora": lora_mode},
            "lora": {
                "r": 8,
                "alpha": 16,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            },
            "data": {"path": "x.jsonl"},
        }
    )


def load(model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


def batch(seed=0, vocab=200):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (4, 24), generator=g)


def train_steps(model, steps=4, lr=5e-3):
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr)
    x = batch().to(params[0].device)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    moved = sum(int(not torch.equal(b, p.detach())) for b, p in zip(before, params, strict=False))
    return losses, moved, len(params)


def test_registry_covers_the_required_schemes():
    for name in ("int4", "int8", "fp8-int4", "int8-int4", "fp8-fp8", "w4-intx", "nvfp4", "mxfp8", "q4_0", "q8_0"):
        assert name in ALL
    assert canonical_name("8da4w") == "int8-int4"


@pytest.mark.parametrize("name", [n for n in TRAINABLE_HERE if n in EXPECTED_FQ])
def test_fake_quantizers_present_and_called(name, tiny_model_dir):
    """Unsloth PR #3859's check, for every scheme: the right fake quantizer classes, each run in forward."""
    model = load(tiny_model_dir)
    prepare(model, QuantSpec.named(name))
    fqs = fake_quantizers(model)
    linears = {k: v for k, v in fqs.items() if "embed" not in k}
    assert linears and set(linears.values()) == {EXPECTED_FQ[name]}
    calls = {}
    for fqn, mod in model.named_modules():
        for attr in ("activation_fake_quantizer", "weight_fake_quantizer"):
            fq = getattr(mod, attr, None)
            if fq is not None:
                fq.register_forward_hook(lambda *a, key=f"{fqn}.{attr}": calls.__setitem__(key, calls.get(key, 0) + 1))
    with torch.no_grad():
        model(batch())
    expected = {
        f"{k}.{a}"
        for k, (act, _) in fqs.items()
        for a in (["activation_fake_quantizer"] if act else []) + ["weight_fake_quantizer"]
    }
    assert set(calls) == expected


@pytest.mark.parametrize("name", [n for n in TRAINABLE_HERE if n in EXPECTED_FQ])
@pytest.mark.parametrize("lora_mode", ["merged", "unmerged"])
def test_lora_learns_under_fake_quant(name, lora_mode, tiny_model_dir):
    """LoRA params move and base weights stay frozen, for every scheme (fp8 included: STE)."""
    model = load(tiny_model_dir)
    recipe = recipe_for(name, lora_mode)
    prepare(model, QuantSpec.named(name))
    model = attach_lora(recipe, model)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses, moved, total = train_steps(model)
    assert all(map(lambda v: v == v, losses)), losses  # no NaN
    assert moved == total, f"only {moved}/{total} trainable tensors changed"
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(base_before[n], p.detach()), n


LEARNABLE_HERE = [n for n in CONVERTIBLE_HERE if get_scheme(n).learnable_scales]


@pytest.mark.parametrize(
    ("name", "learn_scales"), [(n, False) for n in CONVERTIBLE_HERE] + [(n, True) for n in LEARNABLE_HERE]
)
def test_prepare_train_merge_convert_save_reload(name, learn_scales, tiny_model_dir, tmp_path):
    model = load(tiny_model_dir)
    recipe = recipe_for(name, "merged")
    spec = dataclasses.replace(QuantSpec.named(name), learn_scales=learn_scales)
    plan = prepare(model, spec)
    peft_model = attach_lora(recipe, model)
    scales = learned_scales(peft_model)
    assert bool(scales) == learn_scales
    for p in scales.values():
        p.requires_grad_(True)
    _, moved, total = train_steps(peft_model)
    assert moved == total  # adapters and, when learned, every scale
    x = batch(1)
    with torch.no_grad():
        as_trained = peft_model(x).logits
    merged = peft_model.merge_and_unload()
    with torch.no_grad():
        fake_quant = merged(x).logits
    converted = convert(merged, spec)
    assert set(converted) == {m.fqn for m in plan.quantized}
    assert all(type(merged.get_submodule(f).weight).__name__ != "Parameter" for f in converted)
    for fqn, scale in scales.items():  # the deployed weights are quantized with the learned scales (as rounded)
        deployed_scale = merged.get_submodule(fqn).weight.scale
        assert torch.equal(deployed_scale.reshape(scale.shape), scale.detach().to(deployed_scale.dtype))

    with torch.no_grad():
        deployed = merged(x).logits
    # the same weights fake-quantized and converted: bit for bit (scales rounded alike, integers alike)
    assert torch.equal(fake_quant, deployed)
    # merged-LoRA QAT: the trained forward is the deployed forward (up to the merge's float rounding)
    assert sqnr_db(as_trained, deployed) > 60
    attach_hf_quantizer(merged, converted)
    merged.save_pretrained(tmp_path / "ckpt")
    torch.save({"x": x, "logits": deployed}, tmp_path / "ref.pt")
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}); r = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        "with torch.no_grad(): out = m(r['x']).logits\n"
        "print(torch.equal(out, r['logits']), type(m.model.layers[0].self_attn.q_proj.weight).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    equal, wtype = out.stdout.split()[-2:]
    assert equal == "True", out.stdout
    assert wtype != "Parameter"


@pytest.mark.parametrize("name", LEARNABLE_HERE)
def test_mse_scale_init_lowers_every_groups_weight_error(name, tiny_model_dir):
    """qat.scale_init=mse: each learned scale starts at the clip ratio with the least error for its group, so no
    group quantizes worse than with absmax scales, and clipping an outlier-heavy row does better overall."""
    errors, scales = {}, {}
    for init in ("absmax", "mse"):
        model = load(tiny_model_dir)
        torch.manual_seed(0)
        with torch.no_grad():  # trained weights have outliers; the tiny model's init has none
            for mod in model.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.copy_(torch.distributions.StudentT(3.0).sample(mod.weight.shape) * 0.02)
        prepare(model, dataclasses.replace(QuantSpec.named(name), learn_scales=True, scale_init=init))
        learned = learned_scales(model)
        assert learned
        with torch.no_grad():
            errors[init] = {
                fqn: (model.get_submodule(fqn).weight_fake_quantizer(w) - w).pow(2).reshape(*s.shape, -1).sum(-1)
                for fqn, s in learned.items()
                for w in [model.get_submodule(fqn).weight]
            }
        scales[init] = {fqn: s.detach().clone() for fqn, s in learned.items()}
    for fqn, err in errors["mse"].items():
        assert (err <= errors["absmax"][fqn]).all(), fqn
        ratio = scales["mse"][fqn] / scales["absmax"][fqn]
        assert ratio.min() >= min(MSE_CLIP_RATIOS) - 1e-6 and ratio.max() <= 1 + 1e-6
    total = {init: sum(e.sum().item() for e in errs.values()) for init, errs in errors.items()}
    # 8-bit rounding error is small next to what clipping an outlier costs: absmax is close to the best there (with
    # Q8_0's blocks of 32 it is the best for every group of this weight)
    if name == "q8_0":
        assert total["mse"] <= total["absmax"], total
    else:
        assert total["mse"] < (1.0 if name == "int8" else 0.95) * total["absmax"], total


@pytest.mark.parametrize("name", [n for n in CUDA_CONVERT if n not in CONVERTIBLE_HERE])
def test_cuda_only_convert_fails_cleanly_on_cpu(name, tiny_model_dir):
    model = load(tiny_model_dir)
    spec = QuantSpec.named(name)
    scheme = spec.scheme
    prepare(model, spec)
    with pytest.raises(EnvError, match=r"needs a CUDA GPU|needs mslk") as e:
        convert(model, spec)
    assert e.value.exit_code == 3
    if scheme.cpu_alternatives and not hardware_ok(scheme.convert_on):
        assert "on CPU use" in str(e.value)


def test_convert_refused_when_a_kernel_package_is_missing(tiny_model_dir):
    """int4 and fp8-int4 convert through mslk's CUDA kernels: without the package, exit 3 before anything runs."""
    assert {s.name for s in list_schemes() if "mslk" in s.convert_packages} == {"int4", "fp8-int4"}
    scheme = dataclasses.replace(get_scheme("int8"), convert_packages=("qatkit_test_absent_kernels",))
    spec = dataclasses.replace(QuantSpec.named("int8"), scheme=scheme)
    model = load(tiny_model_dir)
    prepare(model, spec)
    with pytest.raises(EnvError, match=r"int8 convert needs qatkit_test_absent_kernels, which is not installed") as e:
        convert(model, spec)
    assert e.value.exit_code == 3 and not can_convert_here(scheme)


def test_group_size_constraint_skips_with_reason(tiny_model_dir):
    model = load(tiny_model_dir)
    plan = plan_modules(model, dataclasses.replace(QuantSpec.named("int4"), group_size=256))  # hidden 128 < 256
    skipped = {m.fqn: m.reason for m in plan.skipped}
    assert "group size 256" in skipped["model.layers.0.self_attn.q_proj"]
    assert "model.layers.0.mlp.down_proj" in {m.fqn for m in plan.quantized}  # in_features 256


def test_int8_int4_unties_and_quantizes_embedding_and_lm_head(tiny_model_dir):
    model = load(tiny_model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    plan = prepare(model, QuantSpec.named("int8-int4"))
    assert plan.untie_embeddings
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    quantized = {m.fqn for m in plan.quantized}
    assert {"lm_head", "model.embed_tokens"} <= quantized


def test_convert_matches_plain_ptq(tiny_model_dir):
    """QAT convert without training == torchao PTQ with the same base config (bit-identical)."""
    from torchao.quantization import quantize_

    x = batch(2)
    spec = QuantSpec.named("int8-int4")
    a = load(tiny_model_dir)
    quantize_ptq(a, spec)
    b = load(tiny_model_dir)
    untie_embeddings(b)
    quantize_(b, spec.linear_config(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
    quantize_(b, spec.embedding_config(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Embedding))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


@pytest.mark.parametrize("learn_scales", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_int4_converts_to_bf16_scales_equal_to_the_fake_quantizer(tiny_model_dir, dtype, learn_scales):
    """The Qwen3-4B card's weight_scale_dtype=bfloat16: converted linears store bf16 scales, and their dequantized
    weights (and the model's logits) are the fake-quantized ones bit for bit. Learned scales train in float32 and are
    rounded to bf16 in the forward and in convert alike."""
    from torchao.quantization.qat import FakeQuantizedLinear

    model = load(tiny_model_dir, dtype)
    spec = dataclasses.replace(QuantSpec.named("int8-int4"), learn_scales=learn_scales)
    prepare(model, spec)
    scales = learned_scales(model)
    assert bool(scales) == learn_scales
    with torch.no_grad():
        for p in scales.values():  # as training leaves them: off the bf16 grid
            assert p.dtype == torch.float32
            p.mul_(1 + 3e-3 * torch.rand_like(p))
        linears = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)}
        fake_quant = {n: m.weight_fake_quantizer(m.weight) for n, m in linears.items()}
        fake_logits = model(batch(4)).logits
    convert(model, spec)
    for fqn, want in fake_quant.items():
        weight = model.get_submodule(fqn).weight
        assert weight.scale.dtype == torch.bfloat16, fqn
        assert torch.equal(weight.dequantize(), want), fqn
    with torch.no_grad():
        assert torch.equal(model(batch(4)).logits, fake_logits)


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_frozen_weight_fake_quant_cache_changes_nothing(tiny_model_dir, mode):
    """The fq(W) cache for frozen weights: same logits and same training trajectory, and an in-place
    weight update (LoRA merge) invalidates it."""
    runs = []
    for cache in (False, True):
        torch.manual_seed(0)
        model = load(tiny_model_dir)
        prepare(model, QuantSpec.named("int8-int4"))
        model = attach_lora(recipe_for("int8-int4", mode), model)
        if cache:
            assert cache_frozen_weight_fake_quant(model) > 0
        losses, _, _ = train_steps(model, steps=3)
        with torch.no_grad():
            logits = model(batch(3)).logits
        merged = model.merge_and_unload()
        with torch.no_grad():
            after_merge = merged(batch(3)).logits
        runs.append((losses, logits, after_merge))
    (l0, g0, m0), (l1, g1, m1) = runs
    assert l0 == l1
    assert torch.equal(g0, g1)
    assert torch.equal(m0, m1)  # a stale cache would still use the pre-merge weights


def test_frozen_weight_fake_quant_cache_is_not_filled_while_fake_quant_is_off(tiny_model_dir):
    """A forward with the quantizers off (fake_quant_off, as AWQ's search and diagnostics run) passes W through;
    the next forward with them on is fake-quantized again, not served the unquantized W from the cache."""
    model = load(tiny_model_dir)
    prepare(model, QuantSpec.named("int8-int4"))
    model = attach_lora(recipe_for("int8-int4", "unmerged"), model)
    with torch.no_grad():
        want = model(batch(3)).logits
        assert cache_frozen_weight_fake_quant(model) > 0
        with fake_quant_off(fq for _, _, fq in each_fake_quantizer(model)):
            off = model(batch(3)).logits
        assert not torch.equal(off, want)
        assert torch.equal(model(batch(3)).logits, want)
