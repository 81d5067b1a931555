"""Build a tiny model dir for smoke runs: python scripts/make_tiny_model.py OUT_DIR [--arch llama|qwen3|gemma3_text]."""

import argparse
import json
from pathlib import Path

from qatkit.data import MCItem
from qatkit.testing import build_tiny_model

p = argparse.ArgumentParser()
p.add_argument("out", type=Path)
p.add_argument("--arch", default="llama")
p.add_argument("--untied", action="store_true")
args = p.parse_args()
data = Path(__file__).resolve().parents[1] / "tests" / "data" / "arith_mc.jsonl"
items = [
    MCItem(r["question"], tuple(r["choices"]), r["answer"]) for r in map(json.loads, data.read_text().splitlines())
]
texts = [it.prompt() + "\n" + it.completion() for it in items]
print(build_tiny_model(args.out, texts, arch=args.arch, tie=not args.untied))
