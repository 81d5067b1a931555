"""What llama.cpp's 8-bit activations cost a Q4_0 / Q8_0 export, and so what training with them could win (issue #28:
"decide, by measurement, whether also fake-quantizing activations as Q8_0 blocks during training helps").

llama.cpp's CPU matmul quantizes a Q4_0 / Q8_0 linear's input to Q8_0 blocks of 32 (ggml's x86 `quantize_row_q8_0`:
d = fp16(max|x| / 127), q = round half to even (x · 127 / max|x|)); the F16 path does not. For a finished GGUF run
(its export and `qatkit bench gguf-recovery` done) this measures, on the run's held-out text:
  - held-out NLL/token of the plain Q4_0 model (PTQ of the base) and of the QAT model, in PyTorch with weights only,
    in PyTorch with llama.cpp's Q8_0 inputs simulated, and (from gguf-recovery.json) in llama.cpp itself;
  - llama.cpp's logits on the convert stage's parity batch against the converted model, without and with the
    simulated Q8_0 inputs (SQNR, top-1 agreement, median per-position error).

  python scripts/gguf_activation_cost.py runs/recovery-smollm2-general-q4_0-gptq \
      benchmarks/recovery-smollm2-general-q4_0-gptq/gguf-recovery.json benchmarks/gguf-activations/smollm2.json
"""

import json
import sys
from pathlib import Path

import torch

from qatkit.core.metrics import compare
from qatkit.evaluation.nll import load_texts, text_nll
from qatkit.export import parity_sequences
from qatkit.export.gguf_engine import llama_cpp_logits, open_llama
from qatkit.models.loading import load_model_and_tokenizer
from qatkit.quant.apply import quantize_ptq
from qatkit.recipe import Recipe
from qatkit.run.rundir import RunDir


def q8_0_blocks(x: torch.Tensor) -> torch.Tensor:
    """x as llama.cpp's Q8_0 matmul input sees it, dequantized, in x's dtype."""
    b = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = b.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax == 0, 0.0, 127.0 / amax)
    d = (amax / 127.0).to(torch.float16).float()
    return (torch.round(b * inverse) * d).reshape(x.shape).to(x.dtype)


def simulate_q8_0_inputs(model) -> list:
    """Forward pre-hooks giving every quantized linear (intx weight) llama.cpp's Q8_0 input."""
    return [
        m.register_forward_pre_hook(lambda _, args: (q8_0_blocks(args[0]), *args[1:]))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and hasattr(m.weight, "qdata")
    ]


def main(run_path: str, gguf_recovery: str, out: str) -> None:
    torch.set_num_threads(2)
    run = RunDir(Path(run_path).resolve())
    recipe = Recipe.model_validate(run.manifest()["recipe"])
    texts = load_texts(recipe.eval)
    engine = json.loads(Path(gguf_recovery).read_text())["nll"]

    def nll(model, tokenizer) -> float:
        with torch.no_grad():
            return round(text_nll(model, tokenizer, texts, recipe.eval.text_max_tokens, recipe.eval.batch_size), 4)

    result = {"run": run_path, "text_path": recipe.eval.text_path, "docs": len(texts), "nll": {}}
    for variant, path in (("plain", None), ("QAT", str(run.convert.root))):
        model, tokenizer = load_model_and_tokenizer(recipe.model, path)
        model.eval()
        if path is None:
            quantize_ptq(model, recipe.quant)
        weights_only = nll(model, tokenizer)
        hooks = simulate_q8_0_inputs(model)
        simulated = nll(model, tokenizer)
        for h in hooks:
            h.remove()
        result["nll"][variant] = {
            "torch_weights_only": weights_only,
            "torch_q8_0_inputs": simulated,
            "llama_cpp": round(engine[variant], 4),
            "quantized_linears": len(hooks),
        }
        print(variant, result["nll"][variant], flush=True)
    result["nll"]["F16_llama_cpp"] = round(engine["F16"], 4)
    rise = engine["plain"] - engine["F16"]
    result["activation_cost_share_of_q4_0_rise"] = {
        v: round((result["nll"][v]["llama_cpp"] - result["nll"][v]["torch_weights_only"]) / rise, 4)
        for v in ("plain", "QAT")
    }

    model, tokenizer = load_model_and_tokenizer(recipe.model, str(run.convert.root))
    sequences = parity_sequences(tokenizer, run, recipe)
    llm = open_llama(run.export.gguf, max(map(len, sequences)) + 8)
    theirs = torch.cat([torch.from_numpy(llama_cpp_logits(llm, s)) for s in sequences])
    llm.close()
    result["parity"] = {}
    for reference in ("converted", "converted + simulated Q8_0 inputs"):
        if reference != "converted":
            simulate_q8_0_inputs(model)
        with torch.no_grad():
            ours = torch.cat([model(torch.tensor([s])).logits[0].float() for s in sequences])
        per_position = ((ours - theirs) ** 2).mean(-1) / (ours**2).mean(-1)
        result["parity"][reference] = {
            "sqnr_db": round(compare(ours, theirs)["sqnr_db"], 2),
            "top1_agreement": round((ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(), 4),
            "median_position_error_db": round(10 * torch.log10(per_position.median()).item(), 2),
            "tokens": int(ours.shape[0]),
        }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
