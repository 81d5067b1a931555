"""The training loop both backends share: TRL's SFTTrainer with what QAT needs of it (lm_head fake quant in the
loss, learned scales in their own optimizer group, distillation), checkpoints with learned scales, resume, and
saving what was trained."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qatkit.backends.general_text import leading_bos, packed
from qatkit.core import distributed, interrupts, progress
from qatkit.core.errors import Interrupted, RecipeError
from qatkit.quant.patches import fake_quantizers, weight_fake_quant_once
from qatkit.quant.scales import learned_scales, load_learned_scales, save_learned_scales
from qatkit.run.layout import LEARNED_SCALES, FinetuneDir, last_checkpoint
from qatkit.run.records import TrainResult

if TYPE_CHECKING:
    from qatkit.recipe import Recipe

log = logging.getLogger(__name__)

# The distillation loss's terms, unweighted, logged beside it: cross-entropy, KL on the task tokens, KL on general text
LOSS_TERMS = ("ce", "kl_task", "kl_general")


def _distill_compute_loss(teacher, distill, general=None, general_teacher=None):
    """Trainer.compute_loss mixing the cross-entropy with KL(teacher || student) on the same tokens, plus, with a
    `general` stream (distill.general), the KL to `general_teacher` (default: the teacher) on every token of a batch
    of general text."""
    import torch
    from transformers import Trainer

    from qatkit.backends.distill import distill_loss

    general_teacher = general_teacher or teacher
    for frozen in (teacher, general_teacher):
        frozen.eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unlabelled = {k: v for k, v in inputs.items() if k != "labels"}
        if distill.weight == 1.0:  # no cross-entropy in the loss: skip its full-vocabulary softmax and backward
            ce, outputs = 0.0, model(**unlabelled)
        else:
            ce, outputs = Trainer.compute_loss(self, model, inputs, True, num_items_in_batch)
        # the teacher in the student's precision (the student's forward is autocast by accelerate)
        with torch.no_grad(), self.accelerator.autocast():
            teacher_logits = teacher.to(outputs.logits.device)(**unlabelled, use_cache=False).logits
        # normalized like Trainer normalizes the cross-entropy: per token of the accumulated batch when the model
        # takes num_items_in_batch (Trainer then leaves the loss as is), else per token of this batch (Trainer
        # divides it by the accumulation steps)
        per_accumulated_batch = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if distill.tokens == "completion":
            scored = inputs["labels"][:, 1:] != -100
            kd = distill_loss(
                outputs.logits,
                teacher_logits,
                scored,
                distill.temperature,
                num_items_in_batch if per_accumulated_batch else None,
            )
            if per_accumulated_batch and self.args.average_tokens_across_devices:
                kd = kd * self.accelerator.num_processes  # num_items counts every process's tokens
        else:  # every real token: num_items_in_batch counts only the answers', so average over this batch
            scored = inputs["attention_mask"][:, 1:].bool()
            kd = distill_loss(outputs.logits, teacher_logits, scored, distill.temperature)
            if per_accumulated_batch:
                kd = kd / self.current_gradient_accumulation_steps
        loss = (1 - distill.weight) * ce + distill.weight * kd
        terms = {"ce": ce, "kl_task": kd} if distill.weight < 1.0 else {"kl_task": kd}
        if general is not None:
            text = general.next(outputs.logits.device)
            with torch.no_grad(), self.accelerator.autocast():
                teacher_text = general_teacher.to(outputs.logits.device)(**text, use_cache=False).logits
            kd_text = distill_loss(
                model(**text, use_cache=False).logits,
                teacher_text,
                text["attention_mask"][:, 1:].bool(),
                distill.temperature,
            )
            if per_accumulated_batch:  # an average over this micro-batch, like tokens: all above
                kd_text = kd_text / self.current_gradient_accumulation_steps
            loss = loss + distill.general.weight * kd_text
            terms["kl_general"] = kd_text
        # logged beside the loss (loss.json), averaged over the processes and, like the loss, the accumulated batch
        per_step = self.current_gradient_accumulation_steps if per_accumulated_batch else 1
        values = torch.stack([v.detach().float() for v in terms.values()])[None]  # one gather, one sync a step
        values = self.accelerator.gather_for_metrics(values).mean(0) * per_step
        for name, value in zip(terms, values.tolist(), strict=True):
            self._metrics["train"][name].append(value)
        return (loss, outputs) if return_outputs else loss

    def compute_loss_fake_quantizing_once(self, model, *args, **kwargs):
        with weight_fake_quant_once(model):  # with a general batch the student runs twice on the same weights
            return compute_loss(self, model, *args, **kwargs)

    return compute_loss_fake_quantizing_once


def _model_lm_head_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
    """Trainer's own loss (the model's forward, its lm_head included), not TRL's fused one."""
    from transformers import Trainer

    return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


def step_in_log_space(optimizer, params: list) -> None:
    """Make each optimizer step on `params` a step on log|p| (Madam's multiplicative update, Bernstein et al. 2020):
    the optimizer moves p by delta, the hooks turn that into p_before * exp(sign(p_before) * delta). With Adam
    (|delta| about lr) every p then moves by about lr of itself, whatever its size, and never changes sign.
    Stateless: the optimizer's own state, checkpoints and --resume are unchanged."""
    import torch

    before: list = []

    def keep(*_):
        before[:] = [p.detach().clone() for p in params]

    def to_log_space(*_):
        with torch.no_grad():
            for p, old in zip(params, before, strict=True):
                p.copy_(old * torch.exp(torch.sign(old) * (p - old)))

    optimizer.register_step_pre_hook(keep)
    optimizer.register_step_post_hook(to_log_space)


def _scales_create_optimizer(scales: list, scale_lr: float | None, scale_space: str | None):
    """SFTTrainer.create_optimizer with the learned scales in their own group, never weight-decayed, stepped in
    log space with qat.scale_space: log."""
    from trl import SFTTrainer

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        optimizer = SFTTrainer.create_optimizer(self, model)
        ids = {id(p) for p in scales}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer.add_param_group({"params": scales, "lr": scale_lr or self.args.learning_rate, "weight_decay": 0.0})
        if scale_space == "log":
            step_in_log_space(optimizer, scales)
        return optimizer

    return create_optimizer


def qat_trainer_class(
    model,
    scale_lr: float | None = None,
    teacher=None,
    distill=None,
    general=None,
    scale_space: str | None = None,
    general_teacher=None,
):
    """SFTTrainer, or a subclass with what QAT needs of it:

    - a fake-quantized lm_head: the loss runs the model's own lm_head. TRL fuses lm_head into a chunked
      log-prob kernel that reads `lm_head.weight` directly, which would silently skip the lm_head's fake
      quantizers (int8-int4 quantizes lm_head): train and deploy would differ.
    - learned scales: they get their own optimizer group, at `scale_lr` (default: the adapters' lr) and
      without weight decay (decay would shrink every scale toward zero), stepped in log space with
      `scale_space` "log".
    - distillation (`teacher` model, the recipe's `distill` section): the loss mixes cross-entropy with
      KL(teacher || student) on the same tokens, plus the KL on the `general` stream's text (distill.general) to
      `general_teacher` (default: the teacher).
    """
    from trl import SFTTrainer

    overrides = {}
    if teacher is not None:
        overrides["compute_loss"] = _distill_compute_loss(teacher, distill, general, general_teacher)
    elif getattr(model.get_output_embeddings(), "weight_fake_quantizer", None) is not None:
        overrides["compute_loss"] = _model_lm_head_compute_loss
    if scales := list(learned_scales(model).values()):
        overrides["create_optimizer"] = _scales_create_optimizer(scales, scale_lr, scale_space)
    return type("QatSFTTrainer", (SFTTrainer,), overrides) if overrides else SFTTrainer


def _learned_scales_callback():
    """Writes the learned scales into each trainer checkpoint (peft checkpoints hold only the adapter)."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class SaveLearnedScales(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
                save_learned_scales(model, ckpt / LEARNED_SCALES)

    return SaveLearnedScales()


def sft_config(recipe: Recipe, ckpt_dir: Path, model, use_cpu: bool, qat: bool):
    """The trainer settings both backends share, from the recipe's `train` section (and qat.lr / qat.max_steps for
    a QAT run)."""
    import torch
    from trl import SFTConfig

    t = recipe.train
    if t.mixed_precision == "bf16" and model.dtype == torch.float16:  # the recipe check sees model.dtype, not this
        raise RecipeError(
            "train.mixed_precision: bf16, but the model loaded in float16 (Unsloth's choice where the GPU has no "
            "bfloat16): set model.dtype: float32, or leave train.mixed_precision unset"
        )
    return SFTConfig(
        output_dir=str(ckpt_dir),
        max_steps=(recipe.qat.max_steps or t.max_steps) if qat else t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=(recipe.qat.lr or t.lr) if qat else t.lr,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        optim=t.optim,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=2,
        max_length=recipe.model.max_seq_length,
        completion_only_loss=True,  # loss on the answer only, like Unsloth's train_on_responses_only
        packing=t.packing,
        packing_strategy="wrapped",  # no padding-free attention on CPU: plain fixed-length blocks
        bf16=t.mixed_precision == "bf16" or (not use_cpu and model.dtype == torch.bfloat16),
        fp16=not use_cpu and model.dtype == torch.float16,
        use_cpu=use_cpu,
        report_to="none",
        dataloader_num_workers=0,
        gradient_checkpointing=t.gradient_checkpointing,  # TRL's SFTConfig turns it on unless told
    )


def sft_trainer(
    trainer_class, recipe: Recipe, model, tokenizer, examples: list[dict], ckpt_dir: Path, use_cpu: bool, qat: bool
):
    """`trainer_class` (SFTTrainer or a qat_trainer_class) on the training examples, with sft_config's settings.

    train.packing, for a tokenizer that starts every text with BOS (Gemma): packed here, every sequence started by
    BOS as every text the model saw was (the documents lose their own), because TRL's wrapped packing starts most
    sequences inside a document, with no BOS; for other tokenizers TRL packs."""
    from datasets import Dataset

    args = sft_config(recipe, ckpt_dir, model, use_cpu, qat)
    bos = leading_bos(tokenizer) if args.packing else None
    if bos is None:
        dataset = Dataset.from_list(examples)
    else:
        documents = [tokenizer(x["text"]).input_ids for x in examples]
        sequences = packed(documents, args.max_length, tokenizer.eos_token_id, recipe.train.seed, bos)
        dataset = Dataset.from_list([{"input_ids": s} for s in sequences])  # tokenized: TRL only adds labels
        args.packing = False  # TRL would pack them again
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    check_train_dataset(trainer, len(examples), recipe.train.packing)
    return trainer


def check_train_dataset(trainer, given: int, packing: bool) -> None:
    """TRL truncates each example to max_length and drops those with no answer token left: refuse a run that would
    train on nothing, and say how many examples were lost. Packed running text (train.packing) loses none."""
    kept, max_length = len(trainer.train_dataset), trainer.args.max_length
    if packing:
        log.info("%d documents packed into %d sequences of %d tokens", given, kept, max_length)
        return
    if kept == 0:
        raise RecipeError(f"model.max_seq_length {max_length} cuts off the answer of every training example: raise it")
    if kept < given:
        log.warning(
            "%d of %d training examples dropped: their answers start beyond model.max_seq_length %d",
            given - kept,
            given,
            max_length,
        )


def train_and_save(trainer, model, tokenizer, work: Path, out: Path, resume: bool, t0: float) -> TrainResult:
    """Train (resuming from the last checkpoint when asked), save what was trained (adapter or full weights)
    into `out`, and the trainer state + loss history into `work`.

    Ctrl-C or SIGTERM (inside `interrupts.deferred()`, as the finetune stage runs) ends training at the step boundary
    with a checkpoint, so `--resume` continues from exactly there.
    """
    ckpt_dir = Path(trainer.args.output_dir)
    learns_scales = bool(learned_scales(model))
    resume_from = last_checkpoint(ckpt_dir, (LEARNED_SCALES,) if learns_scales else ()) if resume else None

    if learns_scales:
        trainer.add_callback(_learned_scales_callback())
    if resume_from:
        log.info("resuming training from %s", resume_from)
        if learns_scales:
            load_learned_scales(model, resume_from / LEARNED_SCALES)
    interrupts.stop_if_requested("before training started")  # while the model and trainer were being built
    trainer.add_callback(interrupts.stop_at_step_end_callback())
    with progress.training(trainer, qat=bool(fake_quantizers(model))):  # a bar instead of raw dicts
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if interrupts.requested() and trainer.state.global_step < trainer.state.max_steps:
        raise Interrupted(f"interrupted at step {trainer.state.global_step}; checkpoint saved in {ckpt_dir}")
    losses = [
        {"step": h["step"], "loss": h["loss"], **{k: h[k] for k in LOSS_TERMS if k in h}}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    # Every process calls save_model (under FSDP it gathers the full state dict); the main one writes.
    trainer.save_model(str(out))
    distributed.barrier()  # every process is done with the checkpoints
    if distributed.is_main():
        if learns_scales:
            save_learned_scales(model, out / LEARNED_SCALES)
        (out / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(str(out))
        trainer.state.save_to_json(str(FinetuneDir(work).trainer_state))
        FinetuneDir(work).loss.write_text(json.dumps(losses))

        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return TrainResult(
        steps=trainer.state.global_step,
        first_loss=losses[0]["loss"] if losses else None,
        final_loss=losses[-1]["loss"] if losses else None,
        seconds=round(time.time() - t0, 2),
        loss_history=losses,
        fake_quantized_modules=len(fake_quantizers(model)),
        lora_layers=sum(1 for n, _ in model.named_modules() if n.endswith("lora_A")),
        resumed_from_step=int(resume_from.name.rsplit("-", 1)[1]) if resume_from else None,
    )
