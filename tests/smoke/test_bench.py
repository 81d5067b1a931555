"""`qatkit bench perf --tiny --quick` end to end through the CLI: every section present, numbers positive, parity holds.

No timed assertions: on a shared CI machine only the presence and sanity of the figures is checked.
"""

import importlib.util
import json
import math

import pytest

from ..conftest import ROOT, run_cli

SCHEMES = ("int8-int4", "int8")


def positive(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny"
    every = "cli_startup,step_time,train_memory,checkpoint_size,decode_latency,executorch"  # gguf: tests/export
    proc = run_cli("bench", "perf", "--tiny", "--quick", "--sections", every, "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "bench.json").read_text()), proc


def test_every_section_has_positive_figures(bench_run):
    _, r, _ = bench_run
    assert r["schemes"] == list(SCHEMES)
    st = r["step_time"]
    expected = {"plain"} | {
        f"{s}/{m}/{c}" for s in SCHEMES for m in ("merged", "unmerged") for c in ("cache", "nocache")
    }
    assert set(st["variants"]) == expected
    for name, v in st["variants"].items():
        assert positive(v["median_s_per_step"]) and positive(v["ratio_vs_plain"]), name
        assert all(positive(t) for t in v["times_s"]), name
        assert math.isfinite(v["loss_last"]), name
        if v["scheme"]:
            assert v["fake_quantized_modules"] > 0, name
            if not v["fq_cache"]:
                assert v["cached_fake_quantizers"] == 0, name
            elif v["lora_mode"] == "unmerged":  # merged: W + s·BA changes every step, only lm_head can be cached
                assert v["cached_fake_quantizers"] >= v["lora_layers"], name

    for key, c in st["cache_speedup"].items():
        assert positive(c["nocache_over_cache"]), key

    mem = r["train_memory"]["variants"]
    assert "plain" in mem and {f"{s}/merged/cache" for s in SCHEMES} <= set(mem)
    for name, v in mem.items():
        assert positive(v["peak_rss_mb"]) and positive(v["peak_above_baseline_mb"]) and positive(v["ratio_vs_plain"])
        assert v["peak_rss_mb"] >= v["baseline_rss_mb"], name

    for s in SCHEMES:
        c = r["checkpoint_size"][s]
        for key in ("weights_bytes", "bf16_bytes", "floor_bytes", "ratio_vs_bf16", "ratio_vs_floor"):
            assert positive(c[key]), (s, key)
        assert c["floor_bytes"] < c["bf16_bytes"]  # both schemes quantize to at most 8 bits
        assert c["breakdown"]["quantized_data"]["bytes"] > 0

        d = r["decode_latency"][s]
        for key in ("latency_ratio", "score_ratio", "tokens_per_s_ratio", "memory_ratio"):
            assert positive(d[key]), (s, key)
        assert positive(d["original"]["tokens_per_s"]) and positive(d["converted"]["tokens_per_s"])
        assert 0 <= d["greedy_tokens_matching_original"] <= d["new_tokens"]
        assert (d["original"]["cuda_peak_reserved_gb"] is None) == (d["memory_measure"] != "cuda_peak_mb")

    e = r["executorch"]
    if importlib.util.find_spec("executorch") is None:
        assert "pip install 'qatkit[executorch]'" in e["skipped"]
    else:
        assert positive(e["pte_bytes"]) and e["ratio_vs_floor"] < 2, e
        for key in ("original", "converted", "pte"):
            assert positive(e["ms_per_token"][key]), key
        assert positive(e["pte_time_ratio_vs_original"]) and positive(e["pte_time_ratio_vs_converted"])
        assert 0 <= e["greedy_tokens_matching_converted"] <= e["new_tokens"]

    cs = r["cli_startup"]
    assert positive(cs["python_s"]) and positive(cs["qatkit_help_s"]) and positive(cs["ratio"])

    m = r["machine"]
    assert m["cores"] >= 1 and m["cpu_model"] and m["versions"]["torch"] and m["versions"]["torchao"] and m["date"]
    assert len(r["load"]["before"]["loadavg"]) == 3 and len(r["load"]["after"]["loadavg"]) == 3
    assert isinstance(r["load"]["shared_with_other_jobs"], bool)
    assert r["threads"]["timed_sections"] >= 1


def test_fake_quant_cache_keeps_logits_identical(bench_run):
    _, r, _ = bench_run
    parity = r["step_time"]["parity"]
    assert set(parity) == {f"{s}/{m}" for s in SCHEMES for m in ("merged", "unmerged")}
    for key, p in parity.items():
        # merged LoRA: W + s·BA changes every step, so only quantizers outside LoRA (lm_head) are cached
        assert p["cached_fake_quantizers"] > 0 or key.endswith("/merged"), key

        assert p["train_forward_identical"], f"{key}: fq cache changed the training forward: {p}"
        assert p["eval_forward_identical"], f"{key}: fq cache changed a no_grad eval forward (stale cache): {p}"
        assert p["identical"], key


def test_markdown_report(bench_run):
    out, r, proc = bench_run
    md = (out / "bench.md").read_text()
    assert r["command"] in md and "--tiny" in r["command"] and "--quick" in r["command"]
    for heading in (
        "Training step time",
        "Training memory",
        "checkpoint size",
        "Decode latency",
        "ExecuTorch",
        "CLI start-up",
    ):
        assert heading in md
    assert "×" in md
    assert "bench.json" in proc.stdout


@pytest.mark.parametrize("command", [(), ("perf",), ("recovery",)])
def test_bench_help_has_an_example(command):
    out = run_cli("bench", *command, "--help")
    assert out.returncode == 0, out.stderr
    assert "Example" in out.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ((), 2, "--model"),
        (("--tiny", "--model", "x.gguf"), 2, "--model"),
        (("--tiny", "--arch", "configs/arch/qwen3-8b.json"), 2, "--arch"),
        (("--arch", "README.md"), 2, "not a model config.json"),
        (("--tiny", "--schemes", "int9"), 2, "unknown scheme"),
        (("--model", "/does/not/exist"), 2, "does not exist"),
        (("--tiny", "--schemes", "int4"), 3, "needs a CUDA GPU"),
    ],
)
def test_bad_input_exits_cleanly(args, code, message, tmp_path):
    import torch

    if code == 3 and torch.cuda.is_available():
        pytest.skip("int4 converts on CUDA")
    out = run_cli("bench", "perf", *args, "--out", str(tmp_path / "b"))
    assert out.returncode == code, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "b").exists()


def test_bench_recovery_on_the_tiny_recipe(tiny_model_dir, tmp_path):
    """The recovery benchmark's path (a 20-item version of the real one): every variant, both LoRA modes."""
    import json

    from ..conftest import TINY_RECIPE, run_cli

    out = tmp_path / "recovery"
    res = run_cli(
        "bench",
        "recovery",
        "--recipe",
        str(TINY_RECIPE),
        "--schemes",
        "int8-int4",
        "--out",
        str(out),
        "--set",
        f"model.name_or_path={tiny_model_dir}",
        "--set",
        "train.max_steps=2",
        "--set",
        "data.eval_size=20",
        "--set",
        "convert.parity_min_sqnr=0",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "recovery.json").read_text())
    assert set(summary["runs"]) == {"int8-int4-merged", "int8-int4-unmerged"}
    for run in summary["runs"].values():
        assert set(run["variants"]) == {"bf16", "ptq", "ft-bf16", "ft-ptq", "qat"}
        assert all(v["n"] == 20 and v["gold_nll"] > 0 for v in run["variants"].values())
    assert (out / "recovery.md").exists() and (out / "recovery.png").exists()


def test_a_subset_of_sections_and_modes(tmp_path):
    out = tmp_path / "subset"
    args = ("--sections", "step_time,checkpoint_size", "--lora-modes", "merged", "--schemes", "int8")
    proc = run_cli("bench", "perf", "--tiny", "--quick", *args, "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "bench.json").read_text())
    assert r["sections"] == ["step_time", "checkpoint_size"]
    assert {"step_time", "checkpoint_size"} <= set(r) and not {"train_memory", "decode_latency", "cli_startup"} & set(r)
    assert set(r["step_time"]["variants"]) == {"plain", "int8/merged/cache", "int8/merged/nocache"}
    md = (out / "bench.md").read_text()
    assert "Training step time" in md and "checkpoint size" in md and "Decode latency" not in md
    assert "--sections step_time,checkpoint_size --lora-modes merged" in r["command"]


def test_an_architecture_with_random_weights(tmp_path):
    """--arch: the Qwen3-8B config as committed, scaled down (the GPU run uses it as is), built with random weights."""
    config = json.loads((ROOT / "configs" / "arch" / "qwen3-8b.json").read_text())
    small = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
    small |= {"num_key_value_heads": 2, "head_dim": 32, "vocab_size": 8192}
    (tmp_path / "qwen3-small.json").write_text(json.dumps(config | small))
    out = tmp_path / "arch"
    args = ("--sections", "checkpoint_size", "--schemes", "int8-int4", "--out", str(out))
    proc = run_cli("bench", "perf", "--arch", str(tmp_path / "qwen3-small.json"), "--quick", *args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "bench.json").read_text())
    assert "with random weights" in r["model"] and "--arch" in r["command"]
    c = r["checkpoint_size"]["int8-int4"]
    params = 2 * 8192 * 128 + 2 * (128 * (4 * 32 + 2 * 2 * 32 + 4 * 32) + 3 * 128 * 256)  # untied lm_head
    assert c["params"] == params + 2 * (2 * 128 + 2 * 32) + 128  # + RMSNorm weights (q/k norms too)
    assert c["ratio_vs_bf16"] < 0.6  # int8 embedding, int4 g32 lm_head and linears (intx keeps a byte a weight)
