"""The distillation loss: KL(teacher || student) over the full vocabulary, computed a block of positions at a time.

Autograd's formulation (two float32 log-softmaxes, `kl_div`, then its backward) materializes several float32 copies
of the logits and keeps two of them for the backward: at Gemma 3's 262k vocabulary, 1 GB each for a 1024-token batch,
and most of a CPU step's non-matmul time. Here each block of rows goes through the fused log-softmax kernels once;
the gradient with respect to the student's logits, (softmax(student) - softmax(teacher)) / temperature, is written
in the same pass (Liger Kernel's fused-loss pattern), so the backward is one multiply and the only saved tensor is
that gradient, in the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_ELEMENTS = 1 << 25  # logits per block (128 positions of a 262k vocabulary): float32 temporaries of 128 MB


def _row_blocks(x: torch.Tensor, rows: int):
    """Views of `x` ([positions, vocab], or [batch, positions, vocab] whose rows are contiguous) of at most `rows`
    rows each, in order."""
    for seq in [x] if x.dim() == 2 else x.unbind(0):
        for start in range(0, seq.shape[0], rows):
            yield seq[start : start + rows]


class _BlockwiseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature: float, scale: float):
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        rows = max(1, BLOCK_ELEMENTS // student.shape[-1])
        blocks = zip(_row_blocks(student, rows), _row_blocks(teacher, rows), _row_blocks(grad, rows), strict=True)
        for s, t, g in blocks:
            if temperature != 1.0:
                s, t = s.float() / temperature, t.float() / temperature
            log_s = F.log_softmax(s, dim=-1, dtype=torch.float32)
            log_t = F.log_softmax(t, dim=-1, dtype=torch.float32)
            p_t = log_t.exp()
            kl_rows = torch.linalg.vecdot(p_t, log_t.sub_(log_s))  # sum_v p_t (log p_t - log p_s), per row
            total += kl_rows.sum(dtype=torch.float64)
            g.copy_(log_s.exp_().sub_(p_t).mul_(scale / temperature))
        ctx.save_for_backward(grad)
        return (total * scale).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if grad_output.item() != 1.0:  # 1.0 when the KL is the whole loss: the saved gradient is final as is
            grad = grad * grad_output.to(grad.dtype)
        return grad, None, None, None


def distill_loss(student_logits, teacher_logits, scored, temperature: float = 1.0, num_items=None):
    """KL(teacher || student) summed over the positions `scored` marks (bool, one fewer than the logits along the
    sequence: position t predicts token t + 1, like the shifted cross-entropy), times temperature² (Hinton et al.),
    divided by `num_items` when given, else by the scored positions."""
    student, teacher = student_logits[:, :-1], teacher_logits[:, :-1]
    if not scored.all():  # else views: no copy of the full-vocabulary logits
        student, teacher = student[scored], teacher[scored]
    count = num_items if num_items is not None else scored.sum().clamp(min=1)
    return _BlockwiseKL.apply(student, teacher.detach(), temperature, temperature**2 / float(count))
