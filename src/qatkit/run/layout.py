"""Where everything in a run directory lives. Stages, report and benchmarks take paths from here, never by hand.

<out>/
  recipe.resolved.yaml  manifest.json  report.md  report.json  loss.png  accuracy.png
  data/{train,eval}.jsonl              the split, made once per run dir
  finetune/  adapter/ (or model/ with full fine-tuning), control/ (the no-QAT fine-tune), qat_plan.json,
             train_summary.json, loss.json, trainer_state.json, teacher_samples/ (distill.general.path: teacher)
  convert/   the quantized checkpoint (safetensors, config.json with quantization_config, tokenizer),
             README.md (model card), parity.json, qat_plan.json
  export/    (export.formats or `qatkit export`) model.gguf (llama.cpp) and gguf.json (what it holds, its llama.cpp
             parity); model.pte (ExecuTorch, XNNPACK), executorch.json (its runtime parity and size), the tokenizer
  eval/      results.json, variants/<name>.json (each variant's scores as soon as they exist), tasks/
  .<stage>.partial/                    a stage in progress (DONE is written into a stage dir before it is renamed)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LEARNED_SCALES = "learned_scales.safetensors"  # beside a trained adapter / model (and in each trainer checkpoint)
GPTQ_WEIGHTS = "gptq_weights.safetensors"  # beside a trained adapter: the base weights GPTQ started it from (qat.gptq)
AWQ_SCALES = "awq_scales.safetensors"  # beside a trained adapter: the MLP channel scales of its base (qat.awq)
CONTROL_ADAPTER = "control_adapter"  # beside a trained adapter: the control's, merged into its base (control-merged)


@dataclass(frozen=True)
class FinetuneDir:
    root: Path

    def trained(self, full_finetuning: bool) -> Path:
        """What the fine-tune trained: the LoRA adapter, or the full weights."""
        return self.root / ("model" if full_finetuning else "adapter")

    @property
    def control(self) -> FinetuneDir:
        """The no-QAT control fine-tune (same data, seed and steps), kept beside the QAT run."""
        return FinetuneDir(self.root / "control")

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def teacher_samples(self) -> Path:
        """The teacher's own samples trained on (distill.general.path: teacher), as cached: read by a resumed run."""
        return self.root / "teacher_samples"

    @property
    def qat_plan(self) -> Path:
        return self.root / "qat_plan.json"

    @property
    def train_summary(self) -> Path:
        return self.root / "train_summary.json"

    @property
    def qat_result(self) -> Path:
        """The QAT run's result, written as soon as it finishes (a resumed stage does not train it again)."""
        return self.root / "qat_result.json"

    @property
    def loss(self) -> Path:
        return self.root / "loss.json"

    @property
    def trainer_state(self) -> Path:
        return self.root / "trainer_state.json"


@dataclass(frozen=True)
class ConvertDir:
    root: Path

    @property
    def parity(self) -> Path:
        return self.root / "parity.json"

    @property
    def qat_plan(self) -> Path:
        return self.root / "qat_plan.json"

    @property
    def model_card(self) -> Path:
        return self.root / "README.md"

    def weights_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.glob("*.safetensors"))


@dataclass(frozen=True)
class ExportDir:
    root: Path

    @property
    def gguf(self) -> Path:
        return self.root / "model.gguf"

    @property
    def gguf_record(self) -> Path:
        return self.root / "gguf.json"

    @property
    def pte(self) -> Path:
        return self.root / "model.pte"

    @property
    def executorch(self) -> Path:
        return self.root / "executorch.json"


@dataclass(frozen=True)
class EvalDir:
    root: Path

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def variants(self) -> Path:
        return self.root / "variants"

    @property
    def tasks(self) -> Path:
        return self.root / "tasks"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def stage(self, name: str) -> Path:
        return self.root / name

    def partial(self, name: str) -> Path:
        return self.root / f".{name}.partial"

    def stage_so_far(self, name: str) -> Path:
        """The stage's dir if it finished, else the one it is still being written in."""
        return self.stage(name) if self.stage(name).exists() else self.partial(name)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def resolved_recipe(self) -> Path:
        return self.root / "recipe.resolved.yaml"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def accuracy_plot(self) -> Path:
        return self.root / "accuracy.png"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def train_data(self) -> Path:
        return self.data / "train.jsonl"

    @property
    def eval_data(self) -> Path:
        return self.data / "eval.jsonl"

    @property
    def finetune(self) -> FinetuneDir:
        return FinetuneDir(self.stage("finetune"))

    @property
    def convert(self) -> ConvertDir:
        return ConvertDir(self.stage("convert"))

    @property
    def export(self) -> ExportDir:
        return ExportDir(self.stage("export"))

    @property
    def eval(self) -> EvalDir:
        return EvalDir(self.stage("eval"))


def last_checkpoint(ckpt_dir: Path, needs: tuple[str, ...] = ()) -> Path | None:
    """The newest complete trainer checkpoint (transformers' checkpoint-<step> folders). A process killed while
    writing one leaves it without trainer_state.json (the Trainer writes it last, in place: a kill inside that write
    leaves it cut short) or without the files `needs` names (written after it, by callbacks, atomically)."""
    steps = {}
    for ckpt in ckpt_dir.glob("checkpoint-*"):
        step = ckpt.name.rsplit("-", 1)[1]
        if step.isdigit() and _whole_json(ckpt / "trainer_state.json") and all((ckpt / n).exists() for n in needs):
            steps[int(step)] = ckpt
    return steps[max(steps)] if steps else None


def _whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return False
    return True
