"""`qatkit bench perf`: what QAT costs in training and what convert buys at deployment, as ratios.

Every figure is a ratio measured inside one run (variants interleaved A, B, A, B, ... and medians
taken), because absolute times on a shared machine mean little. Sections:

- step_time        s/step of a LoRA training step (forward + backward + AdamW), plain vs QAT per
                   scheme and `qat.lora` mode, with and without the frozen-weight fake-quant cache,
                   plus a parity check that the cache leaves logits bit-identical;
- train_memory     peak memory of the same training step, each variant in its own process;
- checkpoint_size  converted checkpoint bytes vs bf16 and vs the scheme's theoretical floor;
- decode_latency   greedy `generate` speed and peak memory, converted vs original model;
- cli_startup      `python -m qatkit --help` vs `python -c pass`.

Modules: training (step_time, cache_parity, train_memory), checkpoint, decode, host (machine, load,
CLI start-up), suite (run_all, markdown), recovery (`qatkit bench recovery`), render (what both commands
print). Heavy libraries are imported inside the functions. Worker processes run
`python -m qatkit.bench _memory|_decode <json>`.
"""

from qatkit.bench.common import TINY_TEXTS
from qatkit.bench.suite import run_all

__all__ = ["TINY_TEXTS", "run_all"]
