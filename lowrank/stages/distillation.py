"""What recovery minimizes and the probes measure: the distance of a compressed model's outputs
from the dense model's (:func:`distillation_loss`).

Causal LMs compare next-token distributions (KL from the logits, :class:`LogitsKL`); other
transformers every layer's hidden states; models without either (``--model-factory``) their
output tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import output_tensor

# Rows of logits LogitsKL works on at once: a few float32 rows of a large vocabulary stay in the
# CPU's cache (SmolLM2, 49,152 tokens: 16 rows are 3 MB).
KL_ROWS = 16


class LogitsKL(torch.autograd.Function):
    """Σ over rows of KL(softmax(teacher) ‖ softmax(student)) from logits (..., vocabulary),
    computed in float32 a few rows at a time, on the rows ``rows`` (flat indices). The
    gradient, softmax(student) − softmax(teacher) on those rows, comes out of the same pass and
    is kept for backward. Autograd's log_softmax + kl_div wrote several float32 copies of the
    logits and read them again backward: on SmolLM2 (32 lines, ~400 real tokens, bf16 logits)
    the loss and its backward took 0.35 s of a 2.6 s recovery step, this 0.1 s."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
        vocabulary = student.shape[-1]
        s, t = student.reshape(-1, vocabulary), teacher.reshape(-1, vocabulary)
        keep = ctx.needs_input_grad[0]
        grad = s.new_zeros(s.shape, dtype=torch.float32) if keep else None
        total = torch.zeros((), device=s.device)  # float32: MPS has no float64
        for i in range(0, len(rows), KL_ROWS):
            r = rows[i:i + KL_ROWS]
            log_q, log_p = s[r].float().log_softmax(-1), t[r].float().log_softmax(-1)
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum()
            if keep:
                grad[r] = log_q.exp_().sub_(p)
        if keep:
            ctx.save_for_backward(grad)
            ctx.shape, ctx.dtype = student.shape, student.dtype
        return total

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * upstream).view(ctx.shape).to(ctx.dtype), None, None


def logits_kl(student: torch.Tensor, teacher: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the real tokens (``mask``; None: all) of KL(teacher ‖ student), from logits."""
    rows = torch.arange(student[..., 0].numel(), device=student.device) if mask is None \
        else mask.reshape(-1).nonzero().squeeze(1)
    return LogitsKL.apply(student, teacher.detach(), rows) / len(rows)


def distillation_loss(student_out, teacher_out, mask: torch.Tensor | None, kind: str,
                      pooled_weight: float = 0.0) -> torch.Tensor:
    """Hidden states: mean over layers of masked MSE / teacher mean square (+ pooled_weight ×
    (1 − cosine of mean-pooled last hidden states)). Logits: KL(teacher ‖ student). Outputs:
    MSE / teacher mean square of the models' output tensors."""
    def real(x):  # real tokens only; every position when there is no mask (tensor inputs)
        return (x[mask] if mask is not None else x.reshape(-1, x.shape[-1])).float()

    if kind == "outputs":
        s, t = output_tensor(student_out).float(), output_tensor(teacher_out).float()
        return (s - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-12)

    if kind == "logits":
        return logits_kl(student_out.logits, teacher_out.logits, mask)
    losses = []
    for s, t in zip(student_out.hidden_states, teacher_out.hidden_states):
        s, t = real(s), real(t)
        losses.append((s - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-12))
    loss = torch.stack(losses).mean()
    if pooled_weight:
        s, t = student_out.hidden_states[-1].float(), teacher_out.hidden_states[-1].float()
        w = mask[..., None].float() if mask is not None else torch.ones_like(s[..., :1])
        cos = nn.functional.cosine_similarity((s * w).sum(1), (t * w).sum(1), dim=-1)
        loss = loss + pooled_weight * (1 - cos).mean()
    return loss
