import pytest

from qatkit.bench.recovery import figures, render


def _run():
    # issue #8's plain-script baseline (SmolLM2-135M, w4 per-channel, PIQA): acc / gold NLL per token
    table = {
        "bf16": (0.595, 3.90),
        "ptq": (0.565, 4.84),
        "ft-bf16": (0.610, 3.11),
        "ft-ptq": (0.500, 3.91),
        "qat": (0.565, 3.40),
    }
    variants = {
        k: {"acc": a, "stderr": 0.035, "gold_nll": nll, "text_nll": None, "n": 200} for k, (a, nll) in table.items()
    }
    return {
        "scheme": "w4-channel",
        "lora_mode": "unmerged",
        "seconds": 1.0,
        "metric": "acc",
        "variants": variants,
        "parity_as_trained_sqnr_db": 30.0,
    }


def test_recovery_figures_match_the_issue_baseline():
    f = figures(_run())
    assert 1 + f["nll_nd_vs_ft"] == pytest.approx(0.64, abs=0.005)  # "naive QAT recovers 64% of the NLL"
    assert f["acc_nd_vs_ft"] == pytest.approx((0.565 - 0.610) / (0.610 - 0.500))
    assert f["qat_minus_ft_ptq_in_stderr"] == pytest.approx(0.065 / (2 * 0.035**2) ** 0.5)


def test_render_has_every_variant():
    md = render({"base_recipe": "r.yaml", "overrides": [], "runs": {"w4-channel-unmerged": _run()}})
    for v in ("bf16", "ptq", "ft-bf16", "ft-ptq", "qat"):
        assert f"| {v} |" in md
    assert "recovery +63.8%" in md


def test_paired_difference_uses_the_per_item_differences():
    from qatkit.bench.recovery import paired_difference_in_stderr

    # differences 1, 0, 0, 1: mean 0.5, sample stdev sqrt(1/3), stderr sqrt(1/3)/2
    assert paired_difference_in_stderr([1, 1, 0, 1], [0, 1, 0, 0]) == pytest.approx(0.5 / (3**-0.5 / 2))
    assert paired_difference_in_stderr([1, 0, 1], [1, 0, 1]) is None  # no difference anywhere
    assert paired_difference_in_stderr([1, 0], None) is None
    # the same items, one answer apart: the paired test sees it, unpaired stderrs drown it
    a, b = [1.0] * 50 + [0.0] * 50, [1.0] * 45 + [0.0] * 55
    run = _run()
    for name, items in (("qat", a), ("ft-ptq", b)):
        run["variants"][name].update(acc=sum(items) / 100, stderr=0.05, per_item=items)
    f = figures(run)
    assert f["qat_minus_ft_ptq_in_stderr"] < 1 < f["qat_minus_ft_ptq_paired_in_stderr"]


def test_a_mixed_run_is_also_compared_per_data_source():
    from qatkit.bench.recovery import by_source

    run = _run()
    qat, ft_ptq = [1.0] * 6 + [0.0, 1.0, 1.0, 0.0], [1.0, 0.0] * 3 + [0.0] * 4
    for name, items in (("qat", qat), ("ft-ptq", ft_ptq)):
        run["variants"][name].update(per_item=items)
    run["eval_sources"] = [{"path": "piqa.jsonl", "eval_rows": 6}, {"path": "siqa.jsonl", "eval_rows": 4}]
    piqa, siqa = by_source(run)
    assert (piqa["n"], piqa["qat_acc"], piqa["ft_ptq_acc"]) == (6, 1.0, 0.5)
    assert (siqa["n"], siqa["qat_acc"], siqa["ft_ptq_acc"]) == (4, 0.5, 0.0)
    # differences 1,1,1 on half the piqa items, 0 on the rest: mean 1/2, stdev sqrt(0.3)
    assert piqa["qat_minus_ft_ptq_paired_in_stderr"] == pytest.approx(0.5 / (0.3**0.5 / 6**0.5))
    md = render({"base_recipe": "r.yaml", "overrides": [], "runs": {"int8-int4-merged": run}})
    assert "`siqa.jsonl` (4 items): QAT 50.00, fine-tuned-then-PTQ 0.00" in md
    run["eval_sources"] = run["eval_sources"][:1]  # one source: nothing to break down
    assert "piqa.jsonl" not in render({"base_recipe": "r.yaml", "overrides": [], "runs": {"r": run}})


def test_general_text_recovery_matches_the_issue_table():
    """Issue #30's table: the committed SIQA run wins back 10.0% of the held-out XSum NLL that PTQ adds."""
    import json

    from ..conftest import ROOT

    summary = json.loads((ROOT / "benchmarks" / "recovery-smollm2-siqa" / "recovery.json").read_text())
    run = summary["runs"]["int8-int4-merged"]
    f = figures(run)
    assert 1 + f["text_nll_nd_vs_ft"] == pytest.approx(0.100, abs=0.0005)
    assert 1 + f["nll_nd_vs_ft"] == pytest.approx(0.835, abs=0.0005)
    assert "held-out general text (never trained on)" in render(summary) and "(recovery +10.0%)" in render(summary)
    assert figures(_run())["text_nll_nd_vs_ft"] is None  # a run without held-out text
