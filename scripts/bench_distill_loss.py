"""Time of the distillation KL (forward + backward) as qatkit computes it against the formulation it replaced
(a boolean gather of the scored positions' logits, then a float32 copy of them), interleaved in one process, on the
logits shapes of a SmolLM2-135M step (8 x 256, vocabulary 49,152) and of a Gemma 3 270M step (8 x 128, 262,144).
Checks that both give the same loss and gradient, bit for bit.

  python scripts/bench_distill_loss.py benchmarks/distill-loss/bench.json
"""

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qatkit.backends.trainer import distill_loss

SHAPES = {"SmolLM2-135M (8 x 256 x 49,152)": (8, 256, 49152), "Gemma 3 270M (8 x 128 x 262,144)": (8, 128, 262144)}
ROUNDS = 3


def gathered(student_logits, teacher_logits, scored, temperature=1.0, num_items=None):
    """The previous formulation: every scored position's logits gathered, then copied to float32."""
    student = F.log_softmax(student_logits[:, :-1][scored].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1][scored].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="sum") * temperature**2
    return kl / (num_items if num_items is not None else scored.sum().clamp(min=1))


def masks(batch: int, length: int) -> dict[str, torch.Tensor]:
    packed = torch.ones(batch, length - 1, dtype=torch.bool)
    padded = packed.clone()
    padded[:, int(0.58 * length) :] = False  # BoolQ passages unpacked at 256 tokens: 42% padding
    answers = torch.zeros_like(packed)
    answers[:, length // 4 : length // 4 + 15] = True  # a task's answer tokens only
    return {"every position (packed text)": packed, "42% padding": padded, "answers only": answers}


def timed(fn, student, teacher, scored):
    s = student.clone().requires_grad_()
    start = time.perf_counter()
    loss = fn(s, teacher, scored)
    loss.backward()
    return time.perf_counter() - start, loss.detach(), s.grad


def main(out: str) -> None:
    torch.manual_seed(0)
    rows = []
    for shape_name, (batch, length, vocab) in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            student = (torch.randn(batch, length, vocab) * 3).to(dtype)
            teacher = (student.float() + torch.randn(batch, length, vocab) * 0.3).to(dtype)
            for mask_name, scored in masks(batch, length).items():
                times = {"gathered": [], "qatkit": []}
                for _ in range(ROUNDS):
                    for name, fn in (("gathered", gathered), ("qatkit", distill_loss)):
                        seconds, loss, grad = timed(fn, student, teacher, scored)
                        times[name].append(seconds)
                        if name == "gathered":
                            want = (loss, grad)
                        else:
                            same = torch.equal(loss, want[0]) and torch.equal(grad, want[1])
                del want, grad
                before, now = statistics.median(times["gathered"]), statistics.median(times["qatkit"])
                row = {
                    "logits": shape_name,
                    "dtype": str(dtype).removeprefix("torch."),
                    "scored": mask_name,
                    "gathered_s": round(before, 3),
                    "qatkit_s": round(now, 3),
                    "speedup": round(before / now, 2),
                    "bit_identical": same,
                }
                print(row, flush=True)
                rows.append(row)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"rounds": ROUNDS, "meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
