"""Where does PTQ damage come from? Gold-answer NLL/token of held-out items for the base model and for
PTQ with parts of the int8-int4 module set left out (lm_head, embeddings), plus w4-channel.

  python scripts/ptq_damage_by_module.py MODEL_DIR RUN_DIR/eval/tasks/heldout.jsonl 150 out.json

MODEL_DIR: an HF model dir (e.g. the GGUF dequantized into the qatkit cache); the held-out file is the
one a recovery run's eval stage writes (context, choices, gold).
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qatkit.core.io import read_jsonl
from qatkit.evaluation.nll import heldout_gold_nll
from qatkit.quant.apply import quantize_ptq
from qatkit.quant.spec import QuantSpec


def main(model_dir: str, heldout: str, n: int, out: str) -> None:
    docs = read_jsonl(Path(heldout))[:n]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    int8_int4 = QuantSpec.named("int8-int4")
    no_embeddings = dataclasses.replace(int8_int4.scheme, embedding_config=None)
    variants = {
        "base fp32": None,
        "int8-int4 all (linears int4+int8 act, lm_head int4, embeddings int8)": int8_int4,
        "without lm_head": dataclasses.replace(int8_int4, quantize_lm_head=False),
        "without lm_head and embeddings": dataclasses.replace(int8_int4, quantize_lm_head=False, scheme=no_embeddings),
        "w4-channel": QuantSpec.named("w4-channel"),
    }
    results = {}
    for name, spec in variants.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        converted = quantize_ptq(model, spec) if spec is not None else None
        results[name] = {
            "gold_nll": heldout_gold_nll(model, tokenizer, docs),
            "modules": None if converted is None else len(converted),
        }
        print(name, results[name], flush=True)
    Path(out).write_text(json.dumps({"items": n, "variants": results}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
