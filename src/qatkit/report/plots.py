"""The report's plots: training loss (QAT run and its no-QAT control) and accuracy per variant."""

from __future__ import annotations

from pathlib import Path

from qatkit.evaluation import variants

# A distillation loss's terms (loss.json), drawn unweighted beside it when there are several
LOSS_TERM_STYLES = {
    "ce": ("cross-entropy", "#aa3377"),
    "kl_task": ("KL on the task", "#cc7722"),
    "kl_general": ("KL on general text", "#339955"),
}


def plot_loss(losses: list[dict], control: list[dict], path: Path, qat_label: str) -> bool:
    if not losses:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot([p["step"] for p in losses], [p["loss"] for p in losses], lw=1.4, color="#3366aa", label=qat_label)
    terms = [(term, *style) for term, style in LOSS_TERM_STYLES.items() if term in losses[-1]]
    for term, label, color in terms if len(terms) > 1 else ():
        points = [p for p in losses if term in p]
        ax.plot([p["step"] for p in points], [p[term] for p in points], lw=0.9, ls="--", color=color, label=label)
    if control:
        ax.plot(
            [p["step"] for p in control], [p["loss"] for p in control], lw=1.2, color="#999999", label="without QAT"
        )
    ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (per token)")
    ax.set_title("QAT fine-tuning loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_accuracy(rows: list[dict], path: Path) -> bool:
    rows = [r for r in rows if r["value"] is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(5, 3.5 * len(tasks)), 3.4), dpi=110, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        sub = [r for r in rows if r["task"] == task]
        xs = range(len(sub))
        ax.bar(
            xs,
            [100 * r["value"] for r in sub],
            yerr=[100 * (r["stderr"] or 0) for r in sub],
            color=[variants.colour(r["variant"]) for r in sub],
            capsize=3,
        )
        ax.set_xticks(list(xs), [r["variant"] for r in sub])
        lo = min(100 * r["value"] for r in sub)
        ax.set_ylim(max(0, lo - 10), min(100, max(100 * r["value"] for r in sub) + 8))
        ax.set_title(f"{task} ({sub[0]['metric']})")
        ax.set_ylabel("accuracy (%)")
        for x, r in zip(xs, sub, strict=False):
            ax.text(x, 100 * r["value"] + 0.5, f"{100 * r['value']:.1f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
