"""Time of a QAT training step with distill.general (the task batch and a general batch, two student forwards) with
each weight fake-quantized once for both forwards (qatkit.quant.patches.weight_fake_quant_once, what training does)
against once per forward (what it did before), interleaved in one process, on a recovery run's own recipe, data and
control: the trainer the hf backend trains with, forward + backward (Trainer.training_step) on the same batches.

  python scripts/bench_general_step.py runs/recovery-smollm2-siqa-general-packed-1000/int8-int4-merged \
      benchmarks/general-step/smollm2-siqa-general.json
"""

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from qatkit.backends import trainer as trainer_module
from qatkit.backends.hf import HFBackend
from qatkit.core.io import read_jsonl
from qatkit.recipe import load_recipe
from qatkit.run.layout import FinetuneDir

VARIANTS = {
    "fake quant once per step": trainer_module.weight_fake_quant_once,
    "fake quant once per forward": lambda model: contextlib.nullcontext(),
}


def control_output(run: Path, full: bool) -> Path:
    """The control's trained output in a finished run (finetune/) or in one still training (.finetune.partial/)."""
    for work in (run / "finetune", run / ".finetune.partial"):
        trained = FinetuneDir(work).control.trained(full)
        if trained.exists():
            return trained
    raise SystemExit(f"{run}: no trained control (finetune/control or .finetune.partial/control)")


def main(run: Path, out: Path, rounds: int) -> None:
    recipe = load_recipe(run / "recipe.resolved.yaml")
    examples = read_jsonl(run / "data" / "train.jsonl")
    with tempfile.TemporaryDirectory() as work:
        control = control_output(run, recipe.train.full_finetuning)
        trainer, model, _ = HFBackend().trainer(recipe, examples, Path(work), False, True, control)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop
        model = trainer.accelerator.prepare_model(model)  # as Trainer.train does: the forward under autocast
        batches = iter(trainer.get_train_dataloader())
        seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for round_ in range(rounds + 1):  # round 0 warms up (the learned scales' first call), not counted
            inputs = next(batches)
            order = list(VARIANTS) if round_ % 2 else list(reversed(VARIANTS))
            for name in order:
                trainer_module.weight_fake_quant_once = VARIANTS[name]
                model.zero_grad()
                start = time.perf_counter()
                trainer.training_step(model, inputs)
                if round_:
                    seconds[name].append(time.perf_counter() - start)
    once, per_forward = (statistics.median(seconds[name]) for name in VARIANTS)
    result = {
        "recipe": recipe.name,
        "scheme": recipe.qat.scheme,
        "lora": recipe.qat.lora,
        "task_batch": recipe.train.batch_size,
        "rounds": rounds,
        "median_step_s": {name: round(statistics.median(s), 3) for name, s in seconds.items()},
        "per_forward_over_once": round(per_forward / once, 3),
        "step_s": {name: [round(x, 3) for x in s] for name, s in seconds.items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_step_s", "per_forward_over_once")}, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a recovery run's variant dir (recipe.resolved.yaml, data/, control)")
    parser.add_argument("out", type=Path, help="the JSON file to write")
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per variant (default 6)")
    args = parser.parse_args()
    main(args.run, args.out, args.rounds)
