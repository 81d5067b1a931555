"""Generate tests/data/arith_mc.jsonl: our own small multiple-choice set (MMLU shape) for smoke runs."""

import json
import random
from pathlib import Path

rng = random.Random(0)
rows = []
for _ in range(400):
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    answer = a + b
    wrong = rng.sample([x for x in range(2, 41) if x != answer], 3)
    choices = [answer, *wrong]
    rng.shuffle(choices)
    rows.append(
        {"question": f"What is {a} plus {b}?", "choices": [str(c) for c in choices], "answer": choices.index(answer)}
    )
out = Path(__file__).resolve().parents[1] / "tests" / "data" / "arith_mc.jsonl"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("".join(json.dumps(r) + "\n" for r in rows))
print(f"wrote {len(rows)} rows to {out}")
