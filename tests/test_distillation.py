"""The distillation loss's logits KL (one fused pass, its own gradient) against autograd's
log_softmax + kl_div, and the attention kernel of trained passes."""

import pytest
import torch
from torch import nn

from lowrank.device import trained_attention
from lowrank.stages import distillation
from lowrank.stages.distillation import logits_kl


def reference_kl(student, teacher, mask):
    def real(x):
        return (x[mask] if mask is not None else x.reshape(-1, x.shape[-1])).float()

    return nn.functional.kl_div(real(student).log_softmax(-1), real(teacher).log_softmax(-1),
                                log_target=True, reduction="batchmean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [True, False])
def test_logits_kl_matches_autograd_in_value_and_gradient(dtype, masked):
    g = torch.Generator().manual_seed(0)
    # 3 × 13 positions: more rows than one chunk, and not a multiple of it
    student = (torch.randn(3, 13, 50, generator=g) * 3).to(dtype)
    teacher = (torch.randn(3, 13, 50, generator=g) * 3).to(dtype)
    mask = torch.rand(3, 13, generator=g) > 0.3 if masked else None
    weight = torch.randn(3, 13, 50, generator=g).to(dtype)  # a non-trivial upstream gradient
    grads, values = [], []
    for loss_fn in (logits_kl, reference_kl):
        s = student.clone().requires_grad_(True)
        loss = loss_fn(s * weight, teacher, mask) * 2.5
        loss.backward()
        values.append(loss.detach())
        grads.append(s.grad)
    assert grads[0].dtype == dtype
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-6)
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {}
    torch.testing.assert_close(grads[0], grads[1], **tolerance)
    if masked:  # padding positions get no gradient
        assert not grads[0][~mask].any()


def test_logits_kl_without_gradient_and_of_a_model_against_itself():
    student, teacher = torch.randn(2, 5, 40), torch.randn(2, 5, 40)
    with torch.no_grad():
        value = logits_kl(student, teacher, None)
    torch.testing.assert_close(value, reference_kl(student, teacher, None))
    assert logits_kl(teacher, teacher, None).abs() < 1e-6  # a distribution against itself


def test_logits_kl_chunk_size_does_not_change_the_result(monkeypatch):
    student, teacher = torch.randn(4, 9, 30), torch.randn(4, 9, 30)
    results = []
    for rows in (1, 7, 1000):
        monkeypatch.setattr(distillation, "KL_ROWS", rows)
        s = student.clone().requires_grad_(True)
        logits_kl(s, teacher, None).backward()
        results.append(s.grad)
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(results[0], results[2])


def attention_backward_kernel(device):
    q = torch.randn(2, 3, 8, 16, requires_grad=True)
    with trained_attention(device):
        out = nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    return out.grad_fn.name()


def test_trained_passes_use_the_math_attention_kernel_on_cpu():
    # CPU flash attention's backward is slow on short lines: recovery trains through the math
    # kernel (plain matmuls and softmax); accelerators keep their default kernels.
    assert "Flash" not in attention_backward_kernel("cpu")
    assert "Flash" not in attention_backward_kernel(None)
    assert "Flash" in attention_backward_kernel("cuda")  # untouched: torch's own choice
