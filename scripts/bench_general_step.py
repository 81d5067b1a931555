"""Time of a QAT training step with distill.general (the task batch and a general batch, two student forwards) as
qatkit trains it now, against the same step with each linear fake-quantizing its input activations itself (q/k/v_proj
read one tensor), with torchao's own fake quantize ops instead of qatkit.quant.fused's (same values, autograd's pass
per op, each linear on its own), and against that with each weight fake-quantized once per forward instead of
once per step (qatkit.quant.patches.weight_fake_quant_once): interleaved in one process, on a recovery run's own
recipe, data and control, with the trainer the hf backend trains with, forward + backward
(Trainer.training_step, under the run's autocast) on the same batches.

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
import types
from pathlib import Path

import torch

from qatkit.backends import trainer as trainer_module
from qatkit.backends.hf import HFBackend
from qatkit.core.io import read_jsonl
from qatkit.quant import rounded_scales
from qatkit.quant.fused import GroupFakeQuantize, LastCall
from qatkit.quant.patches import each_fake_quantizer, weight_fake_quant_once
from qatkit.recipe import load_recipe
from qatkit.run.layout import FinetuneDir, RunLayout


@contextlib.contextmanager
def activations_per_linear(model):
    """qatkit.quant.fused's ops, but each linear fake-quantizes its input itself (q/k/v_proj and gate/up_proj
    each their own copy)."""
    fused_activations = [fq for _, _, fq in each_fake_quantizer(model) if "_per_token_forward" in fq.__dict__]
    shared = {fq: fq._qatkit_last_call for fq in fused_activations}
    for fq in fused_activations:
        fq._qatkit_last_call = LastCall()
    try:
        yield
    finally:
        for fq, last_call in shared.items():
            fq._qatkit_last_call = last_call


@contextlib.contextmanager
def torchao_ops(model):
    """torchao's fake quantize ops in place of qatkit.quant.fused's: the weights' (learned scales) and the
    activations' (dynamic per token)."""
    from torchao.quantization.qat.utils import _fake_quantize_per_channel_group

    fused_activations = [fq for _, _, fq in each_fake_quantizer(model) if "_per_token_forward" in fq.__dict__]
    own = {fq: fq.__dict__.pop("_per_token_forward") for fq in fused_activations}
    rounded_scales.GroupFakeQuantize = types.SimpleNamespace(apply=_fake_quantize_per_channel_group)
    try:
        yield
    finally:
        rounded_scales.GroupFakeQuantize = GroupFakeQuantize
        for fq, forward in own.items():
            fq._per_token_forward = forward


@contextlib.contextmanager
def torchao_ops_once_per_forward(model):
    with torchao_ops(model):
        trainer_module.weight_fake_quant_once = lambda model: contextlib.nullcontext()
        try:
            yield
        finally:
            trainer_module.weight_fake_quant_once = weight_fake_quant_once


VARIANTS = {
    "now": lambda model: contextlib.nullcontext(),
    "each linear fake-quantizes its input itself": activations_per_linear,
    "torchao's fake quant ops": torchao_ops,
    "torchao's ops, fake quant once per forward": torchao_ops_once_per_forward,
}


def main(run_dir: Path, out: Path, rounds: int) -> None:
    run = RunLayout(run_dir)
    recipe = load_recipe(run.resolved_recipe)
    examples = read_jsonl(run.train_data)
    control = FinetuneDir(run.stage_so_far("finetune")).control.trained(recipe.train.full_finetuning)
    if not control.exists():
        raise SystemExit(f"{run_dir}: no trained control ({control})")
    with tempfile.TemporaryDirectory() as work:
        trainer, model, _ = HFBackend().trainer(recipe, examples, Path(work), False, True, control)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop
        model = trainer.accelerator.prepare_model(model)  # as Trainer.train does: the forward under autocast
        batches = iter(trainer.get_train_dataloader())
        seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for round_ in range(rounds + 1):  # round 0 warms up (the learned scales' first call), not counted
            inputs = next(batches)
            order = list(VARIANTS) if round_ % 2 else list(reversed(VARIANTS))
            for name in order:
                with VARIANTS[name](model):
                    model.zero_grad()
                    start = time.perf_counter()
                    trainer.training_step(model, inputs)
                    if round_:
                        seconds[name].append(time.perf_counter() - start)
    now = statistics.median(seconds["now"])
    result = {
        "recipe": recipe.name,
        "scheme": recipe.qat.scheme,
        "lora": recipe.qat.lora,
        "task_batch": recipe.train.batch_size,
        "rounds": rounds,
        "median_step_s": {name: round(statistics.median(s), 3) for name, s in seconds.items()},
        "over_now": {name: round(statistics.median(s) / now, 3) for name, s in seconds.items()},
        "step_s": {name: [round(x, 3) for x in s] for name, s in seconds.items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_step_s", "over_now")}, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a recovery run's variant dir (recipe.resolved.yaml, data/, control)")
    parser.add_argument("out", type=Path, help="the JSON file to write")
    parser.add_argument("--rounds", type=int, default=6, help="timed steps per variant (default 6)")
    args = parser.parse_args()
    main(args.run, args.out, args.rounds)
