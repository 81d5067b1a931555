"""Time of the distillation KL (forward + backward) as qatkit computes it (blockwise, its gradient written in the
forward: qatkit.backends.distill) against the autograd formulation it replaced (two float32 log-softmaxes and
kl_div, their backward by autograd), interleaved in one process, on the logits shapes of a SmolLM2-135M step
(8 x 256, vocabulary 49,152) and of a Gemma 3 270M step (8 x 128, 262,144). Records how far apart the two losses
and gradients are (the summation order differs, and in bfloat16 the gradient is rounded once more).

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

from qatkit.backends.distill import distill_loss

SHAPES = {"SmolLM2-135M (8 x 256 x 49,152)": (8, 256, 49152), "Gemma 3 270M (8 x 128 x 262,144)": (8, 128, 262144)}
ROUNDS = 3


def autograd(student_logits, teacher_logits, scored, temperature=1.0, num_items=None):
    """The previous formulation (qatkit before the blockwise KL): log-softmaxes and kl_div, differentiated by
    autograd."""
    student, teacher = student_logits[:, :-1], teacher_logits[:, :-1]
    if not scored.all():
        student, teacher = student[scored], teacher[scored]
    kl = F.kl_div(
        F.log_softmax(student / temperature, dim=-1, dtype=torch.float32),
        F.log_softmax(teacher / temperature, dim=-1, dtype=torch.float32),
        log_target=True,
        reduction="sum",
    )
    return kl * temperature**2 / (num_items if num_items is not None else scored.sum().clamp(min=1))


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
                times = {"autograd": [], "blockwise": []}
                for _ in range(ROUNDS):
                    for name, fn in (("autograd", autograd), ("blockwise", distill_loss)):
                        seconds, loss, grad = timed(fn, student, teacher, scored)
                        times[name].append(seconds)
                        if name == "autograd":
                            want = (loss, grad.float())
                        else:
                            loss_diff = abs(loss.item() - want[0].item()) / want[0].item()
                            grad_diff = ((grad.float() - want[1]).norm() / want[1].norm()).item()
                del want, grad
                before, now = statistics.median(times["autograd"]), statistics.median(times["blockwise"])
                row = {
                    "logits": shape_name,
                    "dtype": str(dtype).removeprefix("torch."),
                    "scored": mask_name,
                    "autograd_s": round(before, 3),
                    "blockwise_s": round(now, 3),
                    "speedup": round(before / now, 2),
                    "loss_rel_diff": float(f"{loss_diff:.2g}"),
                    "grad_rel_diff": float(f"{grad_diff:.2g}"),
                }
                print(row, flush=True)
                rows.append(row)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"rounds": ROUNDS, "meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
