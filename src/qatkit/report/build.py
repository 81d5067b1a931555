"""`qatkit report`: report.md, report.json, plots and the model card, from what the run dir holds (its records),
so a report is rebuilt without re-running anything."""

from __future__ import annotations

from qatkit.core.errors import RecipeError
from qatkit.core.io import read_json, write_json_atomic
from qatkit.report.model_card import render_model_card
from qatkit.report.plots import plot_accuracy, plot_loss
from qatkit.report.tables import data_licenses, qat_loss_label, quality_rows, render_markdown
from qatkit.run.records import EvalResults, ExecutorchExport, GGUFExportRecord, Parity, QatPlanRecord, TrainSummary
from qatkit.run.rundir import RunDir


def _plots(run_dir: RunDir, recipe: dict, rows: list[dict]) -> dict[str, str]:
    plots = {}
    losses = read_json(run_dir.finetune.loss) or []
    control = read_json(run_dir.finetune.control.loss) or []
    if plot_loss(losses, control, run_dir.loss_plot, qat_loss_label(recipe.get("distill"))):
        plots["loss"] = run_dir.loss_plot.name
    if plot_accuracy(rows, run_dir.accuracy_plot):
        plots["accuracy"] = run_dir.accuracy_plot.name
    return plots


def build_report(run_dir: RunDir) -> dict:
    """Write report.md, report.json, plots and convert/README.md from what the run dir holds."""
    manifest = run_dir.manifest()
    if not manifest:
        raise RecipeError(f"{run_dir.root} is not a qatkit run dir (no manifest.json)")
    recipe = manifest["recipe"]
    results = EvalResults.load(run_dir.eval.results)
    results = results.to_dict() if results else {}
    train, parity = TrainSummary.load(run_dir.finetune.train_summary), Parity.load(run_dir.convert.parity)
    plan = QatPlanRecord.load(run_dir.convert.qat_plan)
    gguf = GGUFExportRecord.load(run_dir.export.gguf_record)
    rows = quality_rows(results) if results else []
    weights = run_dir.convert.weights_bytes()  # 0 without a convert stage
    executorch = ExecutorchExport.load(run_dir.export.executorch)
    report = {
        "name": recipe["name"],
        "model": recipe["model"]["name_or_path"],
        "scheme": recipe["qat"]["scheme"],
        "quantization": manifest.get("quantization", {}).get("description", recipe["qat"]["scheme"]),
        "qat_lora_mode": "full" if recipe["train"].get("full_finetuning") else recipe["qat"]["lora"],
        "quality": rows,
        "text_nll": {v: d["text_nll"] for v, d in results.get("variants", {}).items() if "text_nll" in d},
        "training": train.to_dict() if train else None,
        "parity": parity.to_dict() if parity else None,
        "gguf": gguf.to_dict() if gguf else None,
        "checkpoint_mb": round(weights / 2**20, 2) if weights else None,
        "executorch": executorch.to_dict() if executorch else None,
        "original_bf16_mb": manifest.get("stages", {}).get("convert", {}).get("summary", {}).get("original_bf16_mb"),
        "data": manifest.get("data") and {**manifest["data"], "license": data_licenses(recipe.get("data"))},
        "quantized_modules": len(plan.quantized) if plan else None,
        "skipped_modules": plan.skipped if plan else None,
        "stages": {
            k: {"status": v.get("status"), "seconds": v.get("seconds")} for k, v in manifest.get("stages", {}).items()
        },
        "plots": _plots(run_dir, recipe, rows),
        "versions": manifest.get("versions"),
        "trust_remote_code": manifest.get("trust_remote_code", False),
    }
    write_json_atomic(run_dir.report_json, report)
    run_dir.report_md.write_text(render_markdown(report, results))
    if run_dir.is_done("convert"):
        run_dir.convert.model_card.write_text(render_model_card(report, recipe))
    return report
