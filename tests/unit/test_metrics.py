import pytest

from qatkit.core.metrics import normalized_degradation


@pytest.mark.parametrize(
    ("acc", "bf16", "ptq", "expected"),
    [
        (71.12, 73.02, 69.91, -0.611),  # Qwen3-8B QAT INT4 card: fine-tuned with QAT
        (69.50, 73.02, 69.91, -1.132),  # Qwen3-8B card: fine-tuned without QAT, int4
        (74.16, 73.02, 69.91, 0.367),  # Qwen3-8B card prints +137% here; (74.16-73.02)/3.11 is +36.7%
        (70.18, 71.51, 69.48, -0.655),  # Gemma-3-12B card: fine-tuned with QAT
        (69.58, 71.51, 69.48, -0.951),  # Gemma-3-12B card: fine-tuned without QAT, int4 (-95%)
    ],
)
def test_normalized_degradation_matches_the_cards(acc, bf16, ptq, expected):
    assert normalized_degradation(acc, bf16, ptq) == pytest.approx(expected, abs=5e-4)


def test_extremes():
    assert normalized_degradation(0.7, 0.7, 0.6) == 0
    assert normalized_degradation(0.6, 0.7, 0.6) == pytest.approx(-1)
    assert normalized_degradation(0.6, 0.7, 0.7) is None


def _results(accs: dict[str, float]) -> dict:
    return {"tasks": ["heldout"], "variants": {v: {"tasks": {"heldout": {"acc": a}}} for v, a in accs.items()}}


def test_the_table_has_the_control_column_whenever_the_control_ran():
    from qatkit.report.tables import quality_rows, quality_table

    tie = quality_table(quality_rows(_results({"bf16": 0.6, "ptq": 0.5, "ft-bf16": 0.7, "ft-ptq": 0.7, "qat": 0.7})))
    assert "vs fine-tuned without QAT" in tie.splitlines()[0]
    assert tie.splitlines()[-1].endswith("| — |")  # QAT row: no PTQ gap to normalize by
    gap = quality_table(quality_rows(_results({"bf16": 0.6, "ptq": 0.5, "ft-bf16": 0.7, "ft-ptq": 0.6, "qat": 0.65})))
    assert gap.splitlines()[-1].endswith("| -50.0% |")
    assert "vs fine-tuned" not in quality_table(quality_rows(_results({"bf16": 0.6, "ptq": 0.5, "qat": 0.55})))


def test_the_loss_plot_says_what_a_distilled_run_minimized():
    from qatkit.report.tables import qat_loss_label

    assert qat_loss_label(None) == "with QAT"
    assert qat_loss_label({"teacher": "control", "weight": 1.0, "temperature": 1.0}) == "with QAT: KL to the teacher"
    assert qat_loss_label({"teacher": "base", "weight": 0.25, "temperature": 2.0}).startswith(
        "with QAT: 0.75·CE + 0.25"
    )
    with_general = {"teacher": "control", "weight": 1.0, "temperature": 1.0, "general": {"weight": 2.0}}
    assert qat_loss_label(with_general) == "with QAT: KL to the teacher + 2·KL on general text"


def test_the_report_names_the_license_of_every_data_source():
    from qatkit.report.tables import data_licenses

    data = {"path": "piqa", "license": "AFL-3.0", "mix": [{"path": "siqa", "license": "CC-BY-4.0"}, {"path": "x"}]}
    assert data_licenses(data) == "AFL-3.0, CC-BY-4.0"
    assert data_licenses({"path": "x", "mix": [{"path": "y", "license": "MIT"}]}) == "MIT"
    assert data_licenses(None) is None


def test_general_text_table_gives_what_qat_wins_back():
    from qatkit.evaluation import variants as variant_info
    from qatkit.report.tables import text_nll_table

    # the committed SIQA run (benchmarks/recovery-smollm2-siqa): QAT wins back 10% of what PTQ adds to the fine-tune
    nll = {"qat": 3.8301, "bf16": 3.3459, "ptq": 3.7796, "ft-bf16": 3.3845, "ft-ptq": 3.8796}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text_nll_table(nll).splitlines()[2:]}
    assert list(rows) == [variant_info.label(v) for v in ("bf16", "ptq", "ft-bf16", "ft-ptq", "qat")]
    assert rows[variant_info.label("qat")].endswith("| 3.8301 | -111.6% | -90.0% |")
    assert rows[variant_info.label("bf16")].endswith("| 3.3459 |  |  |")
    assert text_nll_table({"qat": 3.0, "bf16": 2.0}).splitlines()[-1].endswith("| 3.0000 |  |  |")  # no PTQ to compare
