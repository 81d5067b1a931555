"""How far the converted int8-int4 model moves when its group scales are rounded to bf16, as XNNPACK stores them.

python benchmarks/smollm2-135m-executorch/bf16_scales.py RUN_DIR  (a run with a finished convert stage)
"""

import json
import sys
from pathlib import Path

import torch

from qatkit.core.metrics import sqnr_db
from qatkit.export.executorch import load_converted, parity_sequences
from qatkit.recipe import Recipe
from qatkit.run.rundir import RunDir

run = RunDir(Path(sys.argv[1]).resolve())
recipe = Recipe.model_validate(run.manifest()["recipe"])
model, tokenizer = load_converted(run.convert.root)
sequences = parity_sequences(tokenizer, run, recipe, 1024)  # the export's parity texts


def logits():
    with torch.no_grad():
        return torch.cat([model(torch.tensor([s])).logits[0].float() for s in sequences])


ref = logits()
n = 0
for p in model.parameters():
    if hasattr(p, "qdata") and p.qdata.shape[1] != p.block_size[1]:  # group-wise (linears), not the per-row embedding
        p.scale.copy_(p.scale.to(torch.bfloat16).float())
        n += 1
bf16 = logits()
top1 = (ref.argmax(-1) == bf16.argmax(-1)).float().mean().item()
print(
    json.dumps(
        {"groupwise_tensors": n, "sqnr_bf16_scales_vs_fp32": sqnr_db(ref, bf16), "top1": top1, "tokens": ref.shape[0]}
    )
)
