"""hf backend: transformers + peft + trl, with torchao fake quantization inserted before LoRA."""

from __future__ import annotations

import functools
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qatkit.backends.general_text import GeneralBatches, general_batches, general_sequences, pad_id, right_padded
from qatkit.backends.trainer import qat_trainer_class, sft_trainer, train_and_save
from qatkit.core import distributed
from qatkit.core.cache import file_digest
from qatkit.models.assembly import attach_lora, load_finetuned
from qatkit.models.loading import load_model_and_tokenizer, model_fingerprint, require_chat_template
from qatkit.quant.apply import prepare
from qatkit.quant.patches import cache_frozen_weight_fake_quant, signature
from qatkit.quant.plan import non_language_modules
from qatkit.quant.scales import learned_scales
from qatkit.run.layout import AWQ_SCALES, CONTROL_ADAPTER, GPTQ_WEIGHTS, FinetuneDir
from qatkit.run.records import QatPlanRecord, TrainResult

if TYPE_CHECKING:
    from qatkit.recipe import Recipe
    from qatkit.recipe.schema import CalibratedStart

log = logging.getLogger(__name__)


def load_teacher(recipe: Recipe, control: Path | None, general: bool = False):
    """distill.teacher, or with `general` distill.general's teacher: the base model or the control."""
    if (recipe.distill.general_teacher if general else recipe.distill.teacher) == "base":
        return load_model_and_tokenizer(recipe.model)[0]
    setting = "distill.general.teacher" if general else "distill.teacher"
    return load_finetuned(recipe, _control_output(control, setting))[0]


@dataclass(frozen=True)
class GeneralText:
    """distill.general as a run reads it: its text, or the teacher's own samples (path: teacher), cached under what
    identifies the teacher (the base model, plus the control's trained files when it is the teacher) and kept in the
    run directory (`kept`), where a resumed run on a fresh machine (`qatkit unpack`) finds them."""

    recipe: Recipe
    teacher: object
    tokenizer: object
    control: Path | None = None
    kept: Path | None = None

    @functools.cached_property
    def identity(self) -> dict:
        teacher = self.recipe.distill.general_teacher
        identity = {"model": model_fingerprint(self.recipe.model.name_or_path), "teacher": teacher}
        if teacher == "control":
            identity["control"] = {f.name: file_digest(f) for f in sorted(Path(self.control).glob("*.safetensors"))}
        return identity

    def sequences(self, seed: int) -> list[list[int]]:
        spec = self.recipe.distill.general
        return general_sequences(spec, self.teacher, self.tokenizer, seed, self.identity, self.kept)

    def batches(self) -> GeneralBatches:
        """The training stream; each process draws its own (seed + rank)."""
        seed = self.recipe.train.seed + distributed.rank()
        spec, batch_size = self.recipe.distill.general, self.recipe.train.batch_size
        return general_batches(spec, self.teacher, self.tokenizer, batch_size, seed, self.identity, self.kept)


def _starting_point(recipe: Recipe, control: Path | None) -> Path | None:
    """What the QAT run starts from besides the base model: the control's adapters or weights (qat.init_from)."""
    return _control_output(control, "qat.init_from") if recipe.qat.init_from != "base" else None


def _keep_merged_control(adapter: Path, trained: Path) -> None:
    """qat.init_from: control-merged: a copy of the control's adapter beside the one QAT trains, for load_trained."""
    if distributed.is_main():
        shutil.copytree(adapter, trained / CONTROL_ADAPTER, dirs_exist_ok=True)


def _calibration_batch(
    recipe: Recipe,
    spec: CalibratedStart,
    examples: list[dict],
    tokenizer,
    device=None,
    general: GeneralText | None = None,
) -> dict:
    """qat.gptq's or qat.awq's calibration batch (`spec`), cut to its max_tokens and right-padded, with
    the attention mask: the first training examples as the model reads them (chat examples through the chat
    template), or with calibration: general the first sequences of `general`, as training reads them (rank 0's,
    so every process calibrates alike): its text, or the teacher's own samples (drawn now, reused by training)."""

    def text(example: dict) -> str:
        if "text" in example:
            return example["text"]
        if isinstance(example["prompt"], list):
            return tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
        return example["prompt"] + example["completion"]

    if spec.calibration == "general":
        sequences = general.sequences(recipe.train.seed)
    else:
        sequences = [tokenizer(text(x)).input_ids for x in examples[: spec.samples]]
    return right_padded([s[: spec.max_tokens] for s in sequences[: spec.samples]], pad_id(tokenizer), device)


def _start_from_gptq(
    recipe: Recipe, model, tokenizer, examples: list[dict], saved: Path, resume: bool, general: GeneralText | None
) -> None:
    """qat.gptq: GPTQ the prepared model's learned-scale linears (or, resuming, put back the saved result) and
    keep the weights in `saved`, beside the adapter, for convert."""
    from qatkit.quant.gptq import gptq_, load_gptq_weights, save_gptq_weights

    if resume and saved.is_file():
        load_gptq_weights(model, saved)
        return
    spec = recipe.qat.gptq
    batch = _calibration_batch(recipe, spec, examples, tokenizer, model.device, general)
    t0 = time.time()
    names = gptq_(model, batch["input_ids"], batch["attention_mask"], spec.damp, spec.targets)
    tokens = int(batch["attention_mask"].sum())
    log.info("GPTQ: %d linears on %d calibration tokens in %.0f s", len(names), tokens, time.time() - t0)
    if distributed.is_main():
        saved.parent.mkdir(parents=True, exist_ok=True)
        save_gptq_weights(model, names, saved)


def _start_from_awq(
    recipe: Recipe,
    model,
    tokenizer,
    examples: list[dict],
    saved: Path,
    resume: bool,
    adapter: Path | None,
    general: GeneralText | None,
) -> dict:
    """qat.awq: scale the prepared model's MLPs as AWQ's search picks (or, resuming, as it picked), keep the scales
    in `saved`, beside the adapter, for convert, and return them. With the control's `adapter` to start from
    (qat.init_from: control), the search runs on the control (the base with that adapter merged, prepared alike):
    the model the QAT run quantizes; the adapter is scaled with the weights once attached (scale_lora_like_awq)."""
    from qatkit.quant.awq import apply_awq_scales, awq_, load_awq_scales, save_awq_scales
    from qatkit.quant.scales import has_learned_scale, init_learned_scale

    spec = recipe.qat.awq
    if resume and saved.is_file():
        return load_awq_scales(model, saved, spec.channels)
    searched = model
    if adapter is not None:
        searched = load_finetuned(recipe, adapter)[0]
        prepare(searched, recipe.quant)
    batch = _calibration_batch(recipe, spec, examples, tokenizer, searched.device, general)
    t0 = time.time()
    quant = recipe.quant
    mse = quant.scale_init == "mse"
    scales = awq_(
        searched, batch["input_ids"], batch["attention_mask"], quant.group_size, spec.grid, mse, spec.channels
    )
    if searched is not model:
        for linear in apply_awq_scales(model, scales, spec.channels):
            if has_learned_scale(linear):  # from the scaled weights, as awq_ does
                init_learned_scale(linear, mse)
    tokens = int(batch["attention_mask"].sum())
    log.info("AWQ: %d channel pairs scaled on %d calibration tokens in %.0f s", len(scales), tokens, time.time() - t0)
    if distributed.is_main():
        saved.parent.mkdir(parents=True, exist_ok=True)
        save_awq_scales(scales, saved)
    return scales


def _control_output(control: Path | None, setting: str) -> Path:
    if control is None or not control.exists():
        raise RuntimeError(f"{setting}: control, but the control run's output {control} is missing")
    return control


class HFBackend:
    name = "hf"

    def finetune(
        self,
        recipe: Recipe,
        examples: list[dict],
        work: Path,
        resume: bool,
        qat: bool = True,
        control: Path | None = None,
    ) -> TrainResult:
        """Train LoRA adapters (or every weight) into `work`; `qat=False` is the control run (same everything, no
        fake quant). With the recipe's `distill` section the QAT run learns from a teacher: the model as loaded, or
        the control run trained into `control`; with qat.init_from: control it starts from that run's output."""
        t0 = time.time()
        trainer, model, tokenizer = self.trainer(recipe, examples, work, resume, qat, control)
        return train_and_save(
            trainer, model, tokenizer, work, FinetuneDir(work).trained(recipe.train.full_finetuning), resume, t0
        )

    def trainer(
        self,
        recipe: Recipe,
        examples: list[dict],
        work: Path,
        resume: bool,
        qat: bool = True,
        control: Path | None = None,
    ):
        """The trainer `finetune` trains with, and its model and tokenizer, ready to train (or to time its steps)."""
        import torch
        from transformers import set_seed

        # loaded first: AWQ or GPTQ may calibrate on its own samples (distill.general.path: teacher)
        teacher = load_teacher(recipe, control) if qat and recipe.distill else None
        general_teacher = teacher
        if teacher is not None and recipe.distill.general_teacher != recipe.distill.teacher:
            general_teacher = load_teacher(recipe, control, general=True)
        set_seed(recipe.train.seed)  # LoRA init draws from the global RNG: seed it so runs reproduce
        full = recipe.train.full_finetuning
        start = _starting_point(recipe, control) if qat else None
        if start and recipe.qat.init_from == "control-merged":  # the adapter below is a new one, on these weights
            model, tokenizer = load_finetuned(recipe, start)
            _keep_merged_control(start, FinetuneDir(work).trained(full))
            start = None
        else:
            model, tokenizer = load_model_and_tokenizer(recipe.model, path=str(start) if start and full else None)
        if examples and isinstance(examples[0].get("prompt"), list):
            require_chat_template(tokenizer, recipe.model)
        general = None
        if teacher is not None and recipe.distill.general:
            general = GeneralText(recipe, general_teacher, tokenizer, control, FinetuneDir(work).teacher_samples)
        if qat:
            plan = prepare(model, recipe.quant)
            trained = FinetuneDir(work).trained(full)
            if recipe.qat.awq:
                adapter = None if full else start
                awq_scales = _start_from_awq(
                    recipe, model, tokenizer, examples, trained / AWQ_SCALES, resume, adapter, general
                )
            if recipe.qat.gptq:
                _start_from_gptq(recipe, model, tokenizer, examples, trained / GPTQ_WEIGHTS, resume, general)
            if distributed.is_main():
                QatPlanRecord.from_plan(plan, recipe.training_mode, signature(model)).save(FinetuneDir(work).qat_plan)
        if full:  # text-only training: vision/audio towers stay frozen
            for fqn in non_language_modules(model):
                model.get_submodule(fqn).requires_grad_(False)
        else:
            model = attach_lora(recipe, model, start, trainable=True)
            if qat and recipe.qat.awq and start:  # the control's adapter was trained on the unscaled weights
                from qatkit.quant.awq import scale_lora_like_awq

                scale_lora_like_awq(model, awq_scales, recipe.qat.awq.channels)
            for scale in learned_scales(model).values():  # peft froze everything but the adapters
                scale.requires_grad_(True)

        on_cuda = torch.cuda.is_available()
        cache = recipe.qat.cache_frozen_fake_quant
        if not full and (cache or (cache is None and not on_cuda)):  # full finetuning has no frozen weights
            cache_frozen_weight_fake_quant(model)
        if recipe.train.gradient_checkpointing:
            model.enable_input_require_grads()

        stream = general.batches() if general else None
        trainer_class = qat_trainer_class(
            model, recipe.qat.scale_lr, teacher, recipe.distill, stream, recipe.qat.scale_space, general_teacher
        )
        ckpt_dir = FinetuneDir(work).checkpoints
        trainer = sft_trainer(trainer_class, recipe, model, tokenizer, examples, ckpt_dir, not on_cuda, qat)
        return trainer, model, tokenizer
