"""How far have a run's learned weight scales moved from where they started, by the size they started at? For a run
with qat.learn_scales (round-to-nearest or qat.awq start): the start is rebuilt as training built it (the model, its
fake quantizers, the AWQ scaling, absmax or MSE scales), the end read from a checkpoint or the finished adapter dir.
Per bin of starting |scale|: blocks, median |change|, median and 90th-percentile change relative to the start, and how
many changed sign.

  python scripts/learned_scale_drift.py RUN_DIR checkpoint-100 out.json   # or `trained`: the finished run's
"""

import itertools
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from qatkit.models.assembly import prepare_for_qat
from qatkit.models.loading import load_model_and_tokenizer
from qatkit.quant.awq import load_awq_scales
from qatkit.quant.scales import has_learned_scale, init_learned_scale, learned_scales
from qatkit.recipe import load_recipe
from qatkit.run.layout import RunLayout

EDGES = (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, float("inf"))
SAMPLE = 1_000_000  # quantiles on at most this many blocks per bin (torch.quantile's limit is 16M)


def _run_files(run: RunLayout, full: bool) -> tuple[Path, Path]:
    """The run's adapter dir (its AWQ scales) and its finished-or-partial finetune dir."""
    finished = run.finetune.trained(full)
    if finished.exists():
        return finished, finished.parent
    partial = run.partial("finetune")
    return partial / finished.name, partial


def start_scales(recipe, adapter_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model_and_tokenizer(recipe.model)
    prepare_for_qat(recipe, model)
    if recipe.qat.awq:
        load_awq_scales(model, adapter_dir / "awq_scales.safetensors", recipe.qat.awq.channels)
    for module in list(model.modules()):
        if has_learned_scale(module):
            init_learned_scale(module, recipe.quant.scale_init == "mse")
    return {name: p.detach().float().clone() for name, p in learned_scales(model).items()}


def _quantile(x: torch.Tensor, q: float) -> float:
    picked = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:SAMPLE]]
    return round(torch.quantile(picked, q).item(), 5)


def drift(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]) -> list[dict]:
    names = sorted(start)
    d0 = torch.cat([start[n].flatten() for n in names])
    d1 = torch.cat([end[n].float().flatten() for n in names])
    size, change = d0.abs(), (d1 - d0).abs()
    rows = []
    for lo, hi in itertools.pairwise(EDGES):
        held = (size >= lo) & (size < hi)
        if not held.any():
            continue
        relative = change[held] / size[held].clamp(min=1e-12)
        rows.append(
            {
                "start |scale|": [lo, hi],
                "blocks": int(held.sum()),
                "share": round(held.float().mean().item(), 4),
                "median |change|": float(f"{change[held].median().item():.3g}"),
                "median relative change": _quantile(relative, 0.5),
                "p90 relative change": _quantile(relative, 0.9),
                "sign changes": int((torch.sign(d1[held]) != torch.sign(d0[held])).sum()),
            }
        )
    return rows


def main(run_dir: str, checkpoint: str, out: str) -> None:
    run = RunLayout(Path(run_dir).resolve())
    recipe = load_recipe(run.resolved_recipe)
    adapter_dir, finetune_dir = _run_files(run, recipe.train.full_finetuning)
    end_dir = adapter_dir if checkpoint == "trained" else finetune_dir / "checkpoints" / checkpoint
    start = start_scales(recipe, adapter_dir)
    end = load_file(str(end_dir / "learned_scales.safetensors"))
    result = {"run": recipe.name, "checkpoint": checkpoint, "scale_lr": recipe.qat.scale_lr}
    result["scale_space"] = recipe.qat.scale_space or "linear"
    result["bins"] = drift(start, end)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    for row in result["bins"]:
        print(row)


if __name__ == "__main__":
    main(*sys.argv[1:4])
