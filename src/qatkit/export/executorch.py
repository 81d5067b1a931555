"""ExecuTorch export: a converted int8-int4 (8da4w) run as a `.pte` for the XNNPACK delegate (phones), checked in the
ExecuTorch runtime against the converted model.

The converted checkpoint is loaded as it was saved, so the linears keep the trained int4 integers and scales
(torch.export traces torchao's intx tensors; XNNPACK takes the int8-dynamic-activation / int4-weight pattern) and the
int8 embedding becomes ExecuTorch's `quantized_decomposed::embedding_byte` with the same int8 rows. The program has a
static KV cache of `max_seq_len` tokens: `forward(input_ids[1, n], cache_position[n]) -> logits[1, n, vocab]`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from qatkit.core.errors import EnvError, GateError, RecipeError
from qatkit.core.metrics import sqnr_db
from qatkit.recipe import Recipe
from qatkit.recipe.export import export_refusal
from qatkit.run.records import ExecutorchExport
from qatkit.run.rundir import RunDir

log = logging.getLogger(__name__)

FORMAT = "executorch"
INSTALL = "pip install 'qatkit[executorch]' (executorch==1.5.1)"


def require_executorch() -> None:
    try:
        import executorch  # noqa: F401
    except ImportError:
        raise EnvError(f"the ExecuTorch export and runtime need the executorch package: {INSTALL}") from None


def check_scheme(scheme: str) -> None:
    """Exit 2 unless the scheme's converted model is one ExecuTorch's XNNPACK delegate runs."""
    if why := export_refusal(scheme, FORMAT):
        raise RecipeError(why)


def load_converted(model_dir: Path):
    """The converted checkpoint exactly as saved (torchao intx tensors), ready to trace."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval().requires_grad_(False)
    # padding_idx only shapes gradients; without it the embedding lookup is the 2-argument
    # aten.embedding that ExecuTorch fuses with torchao's dequantize into embedding_byte
    model.get_input_embeddings().padding_idx = None
    return model, AutoTokenizer.from_pretrained(str(model_dir))


def kv_cache_module(model, max_seq_len: int):
    """transformers' static-cache export wrapper, with the cache layers reading and writing the registered buffers
    (as is, torch.export lifts the cache tensors as constants beside the buffers and cannot lower the result)."""
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    class KVCacheLM(TorchExportableModuleWithStaticCache):
        def forward(self, input_ids, cache_position):
            for i, layer in enumerate(self.static_cache.layers):
                layer.keys = self.get_buffer(f"key_cache_{i}")
                layer.values = self.get_buffer(f"value_cache_{i}")
                layer.cumulative_length = self.get_buffer(f"cumulative_length_{i}")
            return super().forward(input_ids=input_ids, cache_position=cache_position)

    model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static")
    return KVCacheLM(model, batch_size=1, max_cache_len=max_seq_len)


def lower(model, max_seq_len: int, eos_ids: list[int]) -> bytes:
    """torch.export with a dynamic prompt length -> XNNPACK partition -> the .pte bytes."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    seq = torch.export.Dim("seq", min=1, max=max_seq_len - 1)
    example = {"input_ids": torch.tensor([[1, 2]]), "cache_position": torch.arange(2)}
    with torch.no_grad():
        program = torch.export.export(
            kv_cache_module(model, max_seq_len),
            (),
            example,
            dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}},
            strict=False,
        )
        metadata = {  # what ExecuTorch's LLM runners read from a .pte
            "get_max_seq_len": max_seq_len,
            "get_vocab_size": model.config.get_text_config().vocab_size,
            "use_kv_cache": True,
            "enable_dynamic_shape": True,
            "get_eos_ids": eos_ids,
        }
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()], constant_methods=metadata)
        # quant fusion turns torchao's dequantize + embedding into embedding_byte (the runtime has no dequantize)
        return edge.to_executorch(ExecutorchBackendConfig(do_quant_fusion_and_const_prop=True)).buffer


@dataclass
class PteModel:
    """A .pte loaded in the ExecuTorch runtime (its quantized kernels registered)."""

    path: Path

    def __post_init__(self):
        require_executorch()
        import executorch.kernels.quantized  # noqa: F401  (embedding_byte's kernel)
        from executorch.runtime import Runtime

        program = Runtime.get().load_program(str(self.path))
        self.forward_method = program.load_method("forward")
        self.max_seq_len = int(program.load_method("get_max_seq_len").execute([])[0])
        self.vocab_size = int(program.load_method("get_vocab_size").execute([])[0])
        self.eos_ids = (
            set(program.load_method("get_eos_ids").execute([])) if "get_eos_ids" in program.method_names else set()
        )

    def logits(self, ids: list[int], start: int):
        """Logits [len(ids), vocab] of `ids` placed at positions start.. (the cache keeps positions < start)."""
        import torch

        return self.forward_method.execute([torch.tensor([ids]), torch.arange(start, start + len(ids))])[0][0]


def runtime_parity(model, pte: PteModel, sequences: list[list[int]]) -> dict:
    """Logits of the .pte in the runtime vs the converted model on the same tokens: each sequence's first half as
    one prompt (prefill), the rest one token at a time (KV-cache decode)."""
    import torch

    ours, theirs = [], []
    for ids in sequences:
        half = max(1, len(ids) // 2)
        steps = [pte.logits(ids[:half], 0)] + [pte.logits([t], half + i) for i, t in enumerate(ids[half:])]
        theirs.append(torch.cat([s.reshape(-1, s.shape[-1]) for s in steps]).float())
        with torch.no_grad():
            ours.append(model(torch.tensor([ids])).logits[0].float())
    ref, got = torch.cat(ours), torch.cat(theirs)
    return {
        "sqnr_db": sqnr_db(ref, got),
        "max_abs_diff": (ref - got).abs().max().item(),
        "top1_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
        "tokens": int(ref.shape[0]),
        "sequences": len(sequences),
    }


def size_floor(model) -> dict:
    """The scheme's floor for the .pte: every quantized weight at its bit width with one 16-bit scale per group or
    row, every other parameter fp32 (as the program stores them)."""
    quantized = scales = other = 0
    for p in model.parameters():
        if hasattr(p, "qdata"):
            bits = int(str(p.target_dtype).removeprefix("torch.int"))
            quantized += p.qdata.numel() * bits // 8
            scales += p.scale.numel() * 2
        else:
            other += p.numel() * 4
    return {"bytes": quantized + scales + other, "quantized_weight_bytes": quantized, "scale_bytes": scales}


def export_executorch(run: RunDir, recipe: Recipe, work: Path, max_seq_len: int, min_sqnr: float) -> ExecutorchExport:
    """Write `work/model.pte` (+ the tokenizer) from the run's converted checkpoint and check it in the runtime."""
    from qatkit.export import parity_sequences

    model, tokenizer = load_converted(run.convert.root)
    started = time.time()
    eos = model.generation_config.eos_token_id
    pte_path = work / "model.pte"
    pte_path.write_bytes(lower(model, max_seq_len, [eos] if isinstance(eos, int) else list(eos or [])))
    seconds = time.time() - started
    tokenizer.save_pretrained(str(work))
    sequences = parity_sequences(tokenizer, run, recipe, max_seq_len - 1)
    record = ExecutorchExport(
        scheme=recipe.quant.describe(),
        max_seq_len=max_seq_len,
        pte_bytes=pte_path.stat().st_size,
        floor=size_floor(model),
        parity=runtime_parity(model, PteModel(pte_path), sequences),
        threshold_db=min_sqnr,
        lower_seconds=round(seconds, 1),
    )
    record.save(work / "executorch.json")
    return record


def gate(record: ExecutorchExport) -> None:
    """Exit 4 when the .pte's logits in the runtime are further from the converted model than XNNPACK's arithmetic."""
    sqnr = record.parity["sqnr_db"]
    if sqnr < record.threshold_db:
        raise GateError(
            f"ExecuTorch parity gate failed: .pte vs converted logits SQNR {sqnr:.1f} dB "
            f"< export.executorch.parity_min_sqnr={record.threshold_db} dB"
        )


def generate(pte_path: Path, prompt: str, max_new_tokens: int, chat: bool = True) -> dict:
    """Greedy generation with the .pte in the ExecuTorch runtime and the tokenizer saved beside it (KV-cache decode)."""
    from transformers import AutoTokenizer

    if not pte_path.is_file():
        raise RecipeError(f"{pte_path}: no such .pte file (qatkit export RUN_DIR --format executorch writes one)")
    if not (pte_path.parent / "tokenizer_config.json").exists():
        raise RecipeError(f"{pte_path.parent}: no tokenizer beside the .pte")
    tokenizer = AutoTokenizer.from_pretrained(str(pte_path.parent))
    pte = PteModel(pte_path)
    if chat and tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    else:
        ids = tokenizer(prompt)["input_ids"]
    if len(ids) >= pte.max_seq_len:
        raise RecipeError(f"the prompt has {len(ids)} tokens; the .pte holds {pte.max_seq_len} (export --max-seq-len)")
    started = time.perf_counter()
    token = int(pte.logits(ids, 0)[-1].argmax())
    prefill = time.perf_counter() - started
    new, started = [token], time.perf_counter()
    while len(new) < max_new_tokens and token not in pte.eos_ids and len(ids) + len(new) < pte.max_seq_len:
        token = int(pte.logits([token], len(ids) + len(new) - 1)[-1].argmax())
        new.append(token)
    decode = time.perf_counter() - started
    return {
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "prompt_tokens": len(ids),
        "new_tokens": len(new),
        "prefill_ms": round(prefill * 1000, 1),
        "decode_ms_per_token": round(decode * 1000 / max(1, len(new) - 1), 1),
    }


def export(run: RunDir, recipe: Recipe, max_seq_len: int | None = None, parity_min_sqnr: float | None = None) -> dict:
    """<run>/export/model.pte and executorch.json (parity, size); the manifest gets the record; exit 4 (nothing
    published) when the runtime's logits miss export.executorch.parity_min_sqnr."""
    from qatkit.export import export_work

    settings = recipe.export.executorch
    check_scheme(recipe.quant.name)
    require_executorch()
    with export_work(run, owned=("model.pte", "executorch.json")) as work:
        gate_db = settings.parity_min_sqnr if parity_min_sqnr is None else parity_min_sqnr
        record = export_executorch(run, recipe, work, max_seq_len or settings.max_seq_len, gate_db)
        run.update_manifest(export={FORMAT: record.to_dict()})
        gate(record)
    return {"format": FORMAT, "pte": str(run.export.pte), **record.to_dict()}
