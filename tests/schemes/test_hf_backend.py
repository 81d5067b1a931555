"""The hf backend through the real pipeline (SFTTrainer, peft, torchao) on the tiny model."""

import json
import os
import signal

import pytest
import torch

from qatkit.core.errors import GateError, RecipeError
from qatkit.pipeline import run_recipe
from qatkit.recipe import load_recipe

from ..conftest import TINY_RECIPE


def tiny_recipe(model_dir, *overrides):
    return load_recipe(TINY_RECIPE, [f"model.name_or_path={model_dir}", "train.max_steps=2", *overrides])


def test_lm_head_fake_quant_runs_inside_the_trainer(tiny_model_dir, tmp_path):
    """TRL fuses lm_head into a chunked log-prob kernel; with a quantized lm_head (int8-int4) qatkit must
    keep the lm_head's fake quantizers in the training forward, or training and deployment differ."""
    shapes = []

    def hook(mod, args, out):
        if type(mod).__name__ == "IntxFakeQuantizer" and args and args[0].dim() == 2:
            shapes.append(tuple(args[0].shape))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        run_recipe(tiny_recipe(tiny_model_dir), tmp_path / "run", only=["finetune"])
    finally:
        handle.remove()
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    lm_head_shape = (cfg.vocab_size, cfg.hidden_size)
    assert shapes.count(lm_head_shape) >= 2 * 2  # lm_head and embedding share the shape; both, every step


def test_convert_with_another_scheme_is_caught(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_recipe(tiny_recipe(tiny_model_dir), out, only=["finetune"])
    mismatched = tiny_recipe(tiny_model_dir, "qat.scheme=w4-intx")
    with pytest.raises(GateError, match="quantizer mismatch") as e:
        run_recipe(mismatched, out, only=["convert"])
    assert e.value.exit_code == 4
    assert not (out / "convert" / "DONE").exists()


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_parity_figures_per_lora_mode(tiny_model_dir, tmp_path, mode):
    """merged: the trained forward is the deployed one (exact); unmerged: close but not exact."""
    out = tmp_path / mode
    recipe = tiny_recipe(tiny_model_dir, f"qat.lora={mode}", "train.lr=0.05", "convert.parity_min_sqnr=0")
    run_recipe(recipe, out, only=["finetune", "convert"])
    parity = json.loads((out / "convert" / "parity.json").read_text())
    a = parity["as_trained_vs_converted"]["sqnr_db"]
    assert parity["fake_quant_merged_vs_converted"]["sqnr_db"] == float("inf")
    assert parity["reloaded_vs_in_memory"]["max_abs_diff"] == 0
    if mode == "merged":
        assert a == float("inf")
    else:
        assert 0 < a < float("inf")


def test_parity_gate_fails_when_trained_forward_is_not_the_deployed_one(tiny_model_dir, tmp_path):
    """unmerged LoRA with a large update: q(W + s·BA) drifts from fq(W) + s·BA -> gate, exit 4, no DONE."""
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_model_dir, "qat.lora=unmerged", "train.lr=0.05", "convert.parity_min_sqnr=60")
    with pytest.raises(GateError, match="parity gate failed") as e:
        run_recipe(recipe, out, only=["finetune", "convert"])
    assert e.value.exit_code == 4
    assert not (out / "convert" / "DONE").exists()
    assert json.loads((out / "manifest.json").read_text())["parity"]["as_trained_vs_converted"]["sqnr_db"] < 60


@pytest.mark.parametrize("scheme", ["int8-int4", "int8", "w4-channel"])
def test_merged_lora_forward_is_exact_and_its_gradient_straight_through(tiny_model_dir, scheme):
    """merged mode: y = fq(W + s·BA) x bit for bit; LoRA gradients are the straight-through ones, computed
    without a full-size weight gradient."""
    import torch.nn.functional as F

    from qatkit.models.assembly import attach_lora, prepare_for_qat
    from qatkit.models.loading import load_model_and_tokenizer

    recipe = tiny_recipe(tiny_model_dir, f"qat.scheme={scheme}")
    model, _ = load_model_and_tokenizer(recipe.model)
    prepare_for_qat(recipe, model)
    model = attach_lora(recipe, model)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    base, a, b = layer.get_base_layer(), layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    torch.manual_seed(0)
    with torch.no_grad():
        b.normal_(std=0.05)
    x = torch.randn(2, 7, base.in_features)

    y = layer(x)
    y.square().sum().backward()
    grads = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None

    xq = base.activation_fake_quantizer(x) if base.activation_fake_quantizer is not None else x
    merged = base.weight + (b @ a) * s
    with torch.no_grad():
        assert torch.equal(y, F.linear(xq, base.weight_fake_quantizer(merged)))
    ste = merged + (base.weight_fake_quantizer(merged) - merged).detach()
    F.linear(xq, ste).square().sum().backward()
    for got, want in zip(grads, (a.grad, b.grad), strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_lm_head_can_be_left_unquantized(tiny_model_dir, tmp_path):
    """qat.quantize_lm_head: false keeps lm_head out of QAT, convert and the PTQ baseline alike."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run_recipe(tiny_recipe(tiny_model_dir, "qat.quantize_lm_head=false"), out, only=["finetune", "convert"])
    plan = json.loads((out / "finetune" / "qat_plan.json").read_text())
    assert "lm_head" not in plan["signature"] and any(k.endswith("down_proj") for k in plan["signature"])
    assert json.loads((out / "convert" / "parity.json").read_text())["as_trained_vs_converted"]["sqnr_db"] == float(
        "inf"
    )
    model = AutoModelForCausalLM.from_pretrained(out / "convert")
    assert type(model.lm_head.weight.data) is torch.Tensor
    assert type(model.model.layers[0].mlp.down_proj.weight).__name__ != "Parameter"


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_learned_scales_train_and_are_the_ones_convert_uses(tiny_model_dir, tmp_path, mode):
    """qat.learn_scales: the weight scales move during training, are saved beside the adapter, and the converted
    checkpoint quantizes with them (exact parity with the trained forward in merged mode)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qatkit.models.loading import load_model_and_tokenizer
    from qatkit.quant.apply import prepare
    from qatkit.quant.scales import learned_scales

    out = tmp_path / "run"
    recipe = tiny_recipe(
        tiny_model_dir, "qat.learn_scales=true", f"qat.lora={mode}", "train.lr=0.01", "convert.parity_min_sqnr=0"
    )
    run_recipe(recipe, out, only=["finetune", "convert"])
    trained = load_file(out / "finetune" / "adapter" / "learned_scales.safetensors")
    model, _ = load_model_and_tokenizer(recipe.model)
    prepare(model, recipe.quant)
    initial = learned_scales(model)
    assert trained.keys() == initial.keys() and len(trained) > 0
    moved = [k for k in trained if not torch.equal(trained[k], initial[k].detach())]
    assert len(moved) == len(trained)

    parity = json.loads((out / "convert" / "parity.json").read_text())
    assert parity["fake_quant_merged_vs_converted"]["sqnr_db"] == float("inf")
    if mode == "merged":
        assert parity["as_trained_vs_converted"]["sqnr_db"] == float("inf")
    deployed = AutoModelForCausalLM.from_pretrained(out / "convert")
    proj = "model.layers.0.mlp.down_proj"
    scale = deployed.get_submodule(proj).weight.scale  # the learned one, rounded to the scheme's bf16
    assert scale.dtype == torch.bfloat16
    assert torch.equal(scale.reshape(trained[proj].shape), trained[proj].to(scale.dtype))


def test_learned_scales_resume_from_a_checkpoint(tiny_model_dir, tmp_path, ctrl_c_enabled):
    """Checkpoints carry the learned scales (peft's hold only the adapter): Ctrl-C during step 3 stops training
    after it with a checkpoint there; resume, and the scales end where an uninterrupted run's do."""
    from safetensors.torch import load_file

    from qatkit.core.errors import Interrupted

    recipe = tiny_recipe(
        tiny_model_dir, "qat.learn_scales=true", "train.lr=0.01", "train.max_steps=4", "train.save_steps=2"
    )
    run_recipe(recipe, tmp_path / "straight", only=["finetune"])

    forwards = 0

    def interrupt_third_step(mod, args):
        nonlocal forwards
        if type(mod).__name__ == "PeftModelForCausalLM":
            forwards += 1
            if forwards == 3:
                os.kill(os.getpid(), signal.SIGINT)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(interrupt_third_step)
    try:
        with pytest.raises(Interrupted):
            run_recipe(recipe, tmp_path / "resumed", only=["finetune"])
    finally:
        handle.remove()
    run_recipe(recipe, tmp_path / "resumed", resume=True, only=["finetune"])

    summary = json.loads((tmp_path / "resumed" / "finetune" / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == 3
    straight, resumed = (
        load_file(tmp_path / d / "finetune" / "adapter" / "learned_scales.safetensors") for d in ("straight", "resumed")
    )
    for fqn, scale in straight.items():
        torch.testing.assert_close(resumed[fqn], scale, rtol=1e-5, atol=1e-7)


def test_ctrl_c_before_training_starts_stops_the_stage_without_training(
    tiny_model_dir, tmp_path, monkeypatch, ctrl_c_enabled
):
    """Ctrl-C while the trainer is being built (where a KeyboardInterrupt could land in a finalizer and be ignored)
    is acted on before the first step: the stage stops, marked interrupted, with nothing trained."""
    from qatkit.backends import hf
    from qatkit.core.errors import Interrupted

    original = hf.sft_trainer

    def sft_trainer_then_ctrl_c(*args, **kwargs):
        trainer = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return trainer

    monkeypatch.setattr(hf, "sft_trainer", sft_trainer_then_ctrl_c)
    out = tmp_path / "run"
    with pytest.raises(Interrupted, match="before training started"):
        run_recipe(tiny_recipe(tiny_model_dir), out, only=["finetune"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["finetune"]["status"] == "interrupted"
    assert not list((out / ".finetune.partial" / "checkpoints").glob("checkpoint-*"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the stage's handler is gone


def test_bf16_mixed_precision_refuses_a_model_loaded_in_float16(tiny_model_dir, tmp_path):
    """Unsloth picks float16 by itself on GPUs without bfloat16, which the recipe check cannot see: the Trainer
    would get fp16 and bf16 at once."""
    from qatkit.backends.trainer import sft_config
    from qatkit.models.loading import load_model_and_tokenizer

    recipe = tiny_recipe(tiny_model_dir, "train.mixed_precision=bf16")
    model, _ = load_model_and_tokenizer(recipe.model)
    assert sft_config(recipe, tmp_path, model, use_cpu=True, qat=True).bf16
    with pytest.raises(RecipeError, match="the model loaded in float16"):
        sft_config(recipe, tmp_path, model.to(torch.float16), use_cpu=True, qat=True)


def test_learned_scales_get_their_own_optimizer_group(tiny_model_dir, tmp_path):
    """qat.scale_lr sets the scales' learning rate; weight decay never applies to them (it would shrink them)."""
    from datasets import Dataset

    from qatkit.backends.trainer import qat_trainer_class, sft_config
    from qatkit.models.assembly import attach_lora, prepare_for_qat
    from qatkit.models.loading import load_model_and_tokenizer
    from qatkit.quant.scales import learned_scales

    recipe = tiny_recipe(tiny_model_dir, "qat.learn_scales=true", "qat.scale_lr=1e-5", "train.weight_decay=0.1")
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    prepare_for_qat(recipe, model)
    model = attach_lora(recipe, model)
    scales = {id(p) for p in learned_scales(model).values()}
    for p in learned_scales(model).values():
        p.requires_grad_(True)
    args = sft_config(recipe, tmp_path, model, use_cpu=True, qat=True)
    data = Dataset.from_list([{"prompt": "a", "completion": "b"}])
    trainer = qat_trainer_class(model, recipe.qat.scale_lr)(
        model=model, args=args, train_dataset=data, processing_class=tokenizer
    )
    groups = trainer.create_optimizer().param_groups
    scale_groups = [g for g in groups if any(id(p) in scales for p in g["params"])]
    assert len(scale_groups) == 1 and {id(p) for p in scale_groups[0]["params"]} == scales
    assert scale_groups[0]["lr"] == 1e-5 and scale_groups[0]["weight_decay"] == 0.0
    adapters = [p for g in groups if g is not scale_groups[0] for p in g["params"]]
    assert adapters and all("lora" in n for n, p in model.named_parameters() if any(p is a for a in adapters))


def test_log_space_step_is_the_optimizers_step_on_log_magnitude():
    """step_in_log_space: under a constant gradient Adam's step is lr; in log space each scale, from 1e-4 to 1e-1,
    shrinks by exactly exp(-lr) a step and keeps its sign, where the plain step flips the smallest one."""
    from qatkit.backends.trainer import step_in_log_space

    start = torch.tensor([1e-4, -1e-3, 1e-2, -1e-1])
    lr, steps = 1e-2, 3
    plain, log = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    plain_opt, log_opt = torch.optim.Adam([plain], lr=lr), torch.optim.Adam([log], lr=lr)
    step_in_log_space(log_opt, [log])
    for _ in range(steps):
        for p, opt in ((plain, plain_opt), (log, log_opt)):
            p.grad = torch.sign(start)  # every |scale| pushed down
            opt.step()
    torch.testing.assert_close(plain.detach(), start - steps * lr * torch.sign(start))
    assert plain[0] < 0 < start[0]
    torch.testing.assert_close(log.detach(), start * torch.exp(torch.tensor(-steps * lr)))


@pytest.mark.parametrize("space", ["linear", "log"])
def test_scale_space_in_training(tiny_model_dir, tmp_path, space):
    """qat.scale_space through the trainer: two steps at scale_lr 1e-2 on int8-int4 scales of about 1e-3 to 1e-2
    flip signs in linear space; in log space every scale keeps its sign and moves by at most a few lr of itself."""
    from datasets import Dataset

    from qatkit.backends.trainer import qat_trainer_class, sft_config
    from qatkit.models.assembly import attach_lora, prepare_for_qat
    from qatkit.models.loading import load_model_and_tokenizer
    from qatkit.quant.scales import learned_scales

    recipe = tiny_recipe(tiny_model_dir, "qat.learn_scales=true", "qat.scale_lr=1e-2", f"qat.scale_space={space}")
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    prepare_for_qat(recipe, model)
    model = attach_lora(recipe, model)
    for p in learned_scales(model).values():
        p.requires_grad_(True)
    before = torch.cat([p.detach().flatten() for p in learned_scales(model).values()])
    args = sft_config(recipe, tmp_path, model, use_cpu=True, qat=True)
    data = Dataset.from_list([{"prompt": "a b c", "completion": "d e f"}] * 8)
    trainer_class = qat_trainer_class(model, recipe.qat.scale_lr, scale_space=recipe.qat.scale_space)
    trainer_class(model=model, args=args, train_dataset=data, processing_class=tokenizer).train()
    after = torch.cat([p.detach().flatten() for p in learned_scales(model).values()])
    flipped = (torch.sign(after) != torch.sign(before)).sum().item()
    if space == "linear":
        assert flipped > 0
    else:
        assert flipped == 0
        moved = (after / before).log().abs()
        assert moved.max() <= 3 * 2 * 1e-2 and moved.median() > 1e-3


@pytest.mark.parametrize("learn_scales", [False, True])
def test_full_finetuning_trains_every_weight_and_deploys_exactly(tiny_model_dir, tmp_path, learn_scales):
    """train.full_finetuning: no adapters; every language-model weight moves under fake quantization, the
    full weights are saved, convert deploys exactly the trained forward, and the no-QAT control is full too."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    overrides = ["train.full_finetuning=true", "train.lr=1e-3", "eval.baselines=[ft-bf16,ft-ptq]"]
    recipe = tiny_recipe(tiny_model_dir, *overrides, f"qat.learn_scales={learn_scales}")
    run_recipe(recipe, out)
    trained = out / "finetune" / "model"
    assert not (out / "finetune" / "adapter").exists() and not (trained / "adapter_config.json").exists()
    assert (trained / "learned_scales.safetensors").is_file() == learn_scales
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(trained / "model.safetensors")
    proj = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(before[proj], after[proj])
    assert (out / "finetune" / "control" / "model" / "model.safetensors").is_file()

    parity = json.loads((out / "convert" / "parity.json").read_text())
    assert parity["as_trained_vs_converted"]["sqnr_db"] == float("inf") and parity["qat_lora_mode"] == "full"
    assert parity["reloaded_vs_in_memory"]["max_abs_diff"] == 0
    variants = json.loads((out / "eval" / "results.json").read_text())["variants"]
    assert set(variants) == {"ft-bf16", "ft-ptq", "qat"}
    assert variants["ft-bf16"]["tasks"]["heldout"]["gold_nll"] != variants["ft-ptq"]["tasks"]["heldout"]["gold_nll"]
    assert "fully fine-tuned" in (out / "convert" / "README.md").read_text()


def test_distill_loss_is_the_kl_on_the_scored_tokens():
    from qatkit.backends.distill import distill_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 4]])
    scored = labels[:, 1:] != -100
    want, n = 0.0, 0
    for b in range(2):
        for t in range(4):  # position t predicts labels[:, t + 1]
            if labels[b, t + 1] != -100:
                p = torch.softmax(teacher[b, t] / 2.0, -1)
                want += (p * (p.log() - torch.log_softmax(student[b, t] / 2.0, -1))).sum() * 4.0
                n += 1
    torch.testing.assert_close(distill_loss(student, teacher, scored, temperature=2.0), want / n)
    torch.testing.assert_close(distill_loss(student, teacher, scored, 2.0, num_items=10), want / 10)
    assert distill_loss(student, student, scored) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("every_position", [True, False])
def test_distill_loss_gradient_is_autograds(monkeypatch, dtype, every_position):
    """The blockwise KL's hand-written gradient equals autograd's through log-softmax and kl_div, whatever the
    block size, times the weight the loss is given."""
    import torch.nn.functional as F

    from qatkit.backends import distill

    torch.manual_seed(0)
    student, teacher = (torch.randn(3, 9, 50) * 3).to(dtype), (torch.randn(3, 9, 50) * 3).to(dtype)
    scored = torch.ones(3, 8, dtype=torch.bool)
    if not every_position:
        scored[0, :5] = scored[2, 3:] = False

    def reference(s):
        s, t = s[:, :-1][scored].float() / 2.0, teacher[:, :-1][scored].float() / 2.0
        kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
        return kl * 4.0 / scored.sum()

    want = student.clone().requires_grad_()
    reference(want).backward()
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-4}
    for block_rows in (1, 3, 100):  # blocks of one row, blocks that do not divide a sequence, whole sequences
        monkeypatch.setattr(distill, "BLOCK_ELEMENTS", block_rows * 50)
        for weight in (1.0, 0.5):  # the KL alone, or a share of the loss
            s = student.clone().requires_grad_()
            loss = distill.distill_loss(s, teacher, scored, temperature=2.0)
            (weight * loss).backward()
            torch.testing.assert_close(loss, reference(student.float()), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(s.grad.float(), weight * want.grad.float(), **tolerance)


def _distill_trainer(recipe, tmp_path, teacher):
    """A QAT trainer distilling from `teacher(student)`, its student and its first batch."""
    from qatkit.backends.trainer import qat_trainer_class, sft_trainer
    from qatkit.data import load_splits, training_examples
    from qatkit.models.assembly import attach_lora, prepare_for_qat
    from qatkit.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(recipe.model)
    prepare_for_qat(recipe, model)
    model = attach_lora(recipe, model)
    rows = training_examples(load_splits(recipe.data), recipe.data.answer_style)
    trainer_class = qat_trainer_class(model, None, teacher(model), recipe.distill)
    trainer = sft_trainer(trainer_class, recipe, model, tokenizer, rows, tmp_path / "ckpt", True, True)
    inputs = next(iter(trainer.get_train_dataloader()))
    return trainer, model, inputs


def test_distillation_mixes_cross_entropy_and_kl_to_the_teacher(tiny_model_dir, tmp_path):
    """weight 0: the plain cross-entropy; weight 1 with the student as its own teacher: zero; with the unquantized
    model as teacher: the KL that fake quantization opens, positive (the cross-entropy not even computed); in
    between: the mix of the two."""
    import copy

    from transformers import Trainer

    from qatkit.backends.hf import load_teacher

    losses, given_labels = {}, {}
    for weight, teacher in [(0.0, "base"), (1.0, "self"), (1.0, "base"), (0.25, "base")]:
        r = tiny_recipe(tiny_model_dir, "distill.teacher=base", f"distill.weight={weight}")
        make_teacher = copy.deepcopy if teacher == "self" else (lambda _, r=r: load_teacher(r, None))
        trainer, model, inputs = _distill_trainer(r, tmp_path, make_teacher)
        calls = []
        hook = model.register_forward_pre_hook(
            lambda mod, args, kwargs, calls=calls: calls.append("labels" in kwargs), with_kwargs=True
        )
        with torch.no_grad():
            losses[weight, teacher] = trainer.compute_loss(model, inputs).item()
        hook.remove()
        given_labels[weight] = calls == [True]
        if weight == 0.0:
            with torch.no_grad():
                ce = Trainer.compute_loss(trainer, model, inputs).item()
    assert losses[0.0, "base"] == pytest.approx(ce)
    # the cross-entropy is computed only where it is part of the loss
    assert given_labels == {0.0: True, 1.0: False, 0.25: True}
    assert losses[1.0, "self"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < losses[1.0, "base"] < 0.1 * ce
    assert losses[0.25, "base"] == pytest.approx(0.75 * ce + 0.25 * losses[1.0, "base"], rel=1e-5)


def test_distilling_on_every_token_scores_the_prompt_too(tiny_model_dir, tmp_path):
    """distill.tokens=all: the KL covers every real token (prompt and answer, not padding), averaged over the
    batch; under gradient accumulation each micro-batch's average is divided by the accumulation steps, as Trainer
    does for a loss it does not normalize itself."""
    from qatkit.backends.distill import distill_loss
    from qatkit.backends.hf import load_teacher

    recipe = tiny_recipe(tiny_model_dir, "distill.teacher=base", "distill.tokens=all")
    teacher = load_teacher(recipe, None)
    trainer, model, inputs = _distill_trainer(recipe, tmp_path, lambda _: teacher)
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    real = inputs["attention_mask"][:, 1:].bool()
    answers = inputs["labels"][:, 1:] != -100
    assert real.sum() > answers.sum() and trainer.model_accepts_loss_kwargs
    with torch.no_grad():
        want = distill_loss(model(**forward).logits, teacher(**forward).logits, real)
        assert want > 0
        assert trainer.compute_loss(model, inputs).item() == pytest.approx(want.item(), rel=1e-5)
        trainer.current_gradient_accumulation_steps = 2
        accumulated = trainer.compute_loss(model, inputs, num_items_in_batch=answers.sum())
    assert accumulated.item() == pytest.approx(want.item() / 2, rel=1e-5)


@pytest.mark.parametrize("precision", [None, "bf16"])
def test_mixed_precision_runs_student_and_teacher_in_one_precision(tiny_model_dir, tmp_path, precision):
    """train.mixed_precision=bf16: the student's forward (autocast by accelerate) and the teacher's run their linears
    in bfloat16, so a teacher identical to the student gives a first-step KL of exactly zero; a float32 teacher
    beside a bfloat16 student would not. Without it both stay float32."""
    import copy

    mixed = [f"train.mixed_precision={precision}"] if precision else []
    recipe = tiny_recipe(tiny_model_dir, "distill.teacher=base", "train.max_steps=1", *mixed)
    teachers = []

    def copy_of_student(student):
        teachers.append(copy.deepcopy(student))
        return teachers[0]

    trainer, model, _ = _distill_trainer(recipe, tmp_path, copy_of_student)
    (teacher,) = teachers
    dtypes = {"student": set(), "teacher": set()}
    for name, net in (("student", model), ("teacher", teacher)):
        linear = next(m for n, m in net.named_modules() if n.endswith("layers.0.mlp.down_proj"))
        linear.register_forward_hook(lambda mod, args, out, name=name: dtypes[name].add(out.dtype))
    trainer.train()
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert dtypes == {"student": {want}, "teacher": {want}}
    assert trainer.state.log_history[0]["loss"] == 0.0


def test_distill_from_the_control_trains_it_first_and_learns_from_it(tiny_model_dir, tmp_path):
    """distill.teacher=control: the no-QAT control is trained (or reused) before the QAT run, which then fits its
    predictions (weight 1: a KL far below the cross-entropy the control started from); the model card says so."""
    out = tmp_path / "run"
    overrides = ["distill.teacher=control", "distill.tokens=all", "eval.baselines=[ft-bf16]", "train.lr=1e-3"]
    run_recipe(tiny_recipe(tiny_model_dir, *overrides), out, only=["finetune", "convert"])
    summary = json.loads((out / "finetune" / "train_summary.json").read_text())
    card = (out / "convert" / "README.md").read_text()
    assert "distilling from the same fine-tune without fake quantization on every token, prompt included" in card

    assert (out / "finetune" / "control" / "adapter" / "adapter_config.json").is_file()
    assert summary["control"]["steps"] == summary["steps"] == 2
    assert 0 < summary["first_loss"] < 0.5 * summary["control"]["first_loss"]
    control_mtime = (out / "finetune" / "control" / "train_summary.json").stat().st_mtime
    assert control_mtime <= (out / "finetune" / "adapter" / "adapter_config.json").stat().st_mtime


@pytest.mark.parametrize(("full", "control"), [(False, "control"), (True, "control"), (False, "control-merged")])
def test_qat_starting_from_the_control_starts_where_it_ended(tiny_model_dir, tmp_path, full, control):
    """qat.init_from=control: the QAT run continues from the control's adapters (or weights), so distilling from
    the control starts at the small KL fake quantization opens, not at the gap between the base and the control.
    control-merged: the same from the control's adapters merged into the weights, with new adapters on them."""
    first_kl = {}
    for start in ["base", control]:
        out = tmp_path / f"{full}-{start}"
        lr = 0.002 if full else 0.05  # moves the control far from the base in 2 steps, in either mode
        overrides = ["distill.teacher=control", f"train.lr={lr}", "train.warmup_steps=0", f"qat.init_from={start}"]
        overrides += ["train.full_finetuning=true"] if full else []
        run_recipe(tiny_recipe(tiny_model_dir, *overrides), out, only=["finetune", "convert"])
        summary = json.loads((out / "finetune" / "train_summary.json").read_text())
        assert summary["steps"] == summary["control"]["steps"] == 2
        first_kl[start] = summary["first_loss"]
    assert 0 < first_kl[control] < 0.1 * first_kl["base"]
    merged = "its adapters merged into the weights, then new adapters trained"
    how = merged if control == "control-merged" else "then trained further"
    assert f"without fake quantization, {how} under quantization-aware" in (out / "convert" / "README.md").read_text()


def test_qat_lr_sets_the_qat_runs_learning_rate_only(tiny_model_dir, tmp_path):
    """qat.lr: the QAT run (here a second phase from the control) trains at it; the control keeps train.lr."""
    out = tmp_path / "run"
    overrides = ["qat.init_from=control", "qat.lr=0.01", "train.lr=0.001", "train.warmup_steps=0"]
    run_recipe(tiny_recipe(tiny_model_dir, *overrides), out, only=["finetune", "convert"])

    def first_lr(work):
        state = json.loads((work / "trainer_state.json").read_text())
        return next(h["learning_rate"] for h in state["log_history"] if "learning_rate" in h)

    assert first_lr(out / "finetune") == pytest.approx(0.01)
    assert first_lr(out / "finetune" / "control") == pytest.approx(0.001)
    assert "lr 0.001 (under quantization-aware training: 0.01)" in (out / "convert" / "README.md").read_text()


def test_qat_max_steps_sets_the_length_of_the_qat_run_only(tiny_model_dir, tmp_path):
    """qat.max_steps: a second phase of its own length; the control trains train.max_steps."""
    out = tmp_path / "run"
    overrides = ["qat.init_from=control", "qat.max_steps=3", "train.max_steps=2"]
    run_recipe(tiny_recipe(tiny_model_dir, *overrides), out, only=["finetune", "convert"])

    summary = json.loads((out / "finetune" / "train_summary.json").read_text())
    assert (summary["steps"], summary["control"]["steps"]) == (3, 2)
    assert "2 steps (under quantization-aware training: 3)" in (out / "convert" / "README.md").read_text()


def test_distill_from_the_control_needs_it(tiny_model_dir, tmp_path):
    from qatkit.backends.hf import load_teacher

    with pytest.raises(RuntimeError, match="control run's output"):
        load_teacher(tiny_recipe(tiny_model_dir, "distill.teacher=control"), tmp_path / "missing")


def test_distillation_is_normalized_like_the_cross_entropy_under_gradient_accumulation(tiny_model_dir, tmp_path):
    """One step on 2 items as one batch or as 2 accumulated micro-batches moves the adapters alike: the KL is
    divided by the tokens of the whole accumulated batch, like the cross-entropy."""
    from safetensors.torch import load_file

    adapters = []
    for batch, accum in [(2, 1), (1, 2)]:
        out = tmp_path / f"b{batch}"
        overrides = ["distill.teacher=base", "distill.weight=0.5", "train.max_steps=1", "train.warmup_steps=0"]
        overrides += ["train.optim=sgd", "train.lr=1.0"]  # SGD: the update is the gradient (Adam's is scale-free)
        recipe = tiny_recipe(tiny_model_dir, *overrides, f"train.batch_size={batch}", f"train.grad_accum={accum}")
        run_recipe(recipe, out, only=["finetune"])
        adapters.append(load_file(out / "finetune" / "adapter" / "adapter_model.safetensors"))
    for name, tensor in adapters[0].items():  # LoRA B starts at zero: after one step it holds the update
        if "lora_B" in name:
            assert tensor.abs().max() > 0, name
            torch.testing.assert_close(adapters[1][name], tensor, rtol=1e-3, atol=1e-5)


def test_gold_nll_batched_equals_each_item_scored_alone(tiny_model_dir):
    """Items are batched by length with right padding; the figure must be the per-token NLL of each gold answer
    given its own prompt, as if every item were scored alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qatkit.evaluation.nll import gold_nll

    from ..conftest import arith_texts

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = arith_texts()[:7]
    contexts = [t[: len(t) // 2 + 3 * i] for i, t in enumerate(texts)]  # prompts and answers of varied lengths
    golds = [t[len(c) :] for t, c in zip(texts, contexts, strict=True)]
    total, count = 0.0, 0
    for c, g in zip(contexts, golds, strict=True):
        ctx, gold = (tokenizer(x, add_special_tokens=False).input_ids for x in (c, g))
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ctx + gold])).logits[0].float(), dim=-1)
        total -= sum(logprobs[len(ctx) - 1 + j, token].item() for j, token in enumerate(gold))
        count += len(gold)
    assert gold_nll(model, tokenizer, contexts, golds, batch_size=3) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_is_what_the_recipe_says(tiny_model_dir, tmp_path, checkpointing):
    """TRL's SFTConfig turns gradient checkpointing on by default; the recipe's train.gradient_checkpointing
    (default false: faster steps) decides, and the trained model really recomputes (or not)."""
    from qatkit.backends.trainer import sft_config
    from qatkit.models.loading import load_model_and_tokenizer

    recipe = tiny_recipe(tiny_model_dir, f"train.gradient_checkpointing={str(checkpointing).lower()}")
    model, _ = load_model_and_tokenizer(recipe.model)
    assert sft_config(recipe, tmp_path, model, use_cpu=True, qat=True).gradient_checkpointing is checkpointing
    import transformers.modeling_utils

    calls = []
    original = transformers.modeling_utils.checkpoint  # what gradient_checkpointing_enable binds

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    transformers.modeling_utils.checkpoint = counting
    try:
        run_recipe(recipe, tmp_path / "run", only=["finetune"])
    finally:
        transformers.modeling_utils.checkpoint = original
    assert bool(calls) is checkpointing
