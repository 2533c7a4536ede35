"""Fisher statistics from one backward pass per batch: the sampled objective whose gradients
estimate the distillation loss to second order (used by :mod:`lowrank.stages.scores`), and the
output-gradient Grams G_g = Σ g gᵀ of every Linear for two-sided (KFAC) whitening
(:mod:`lowrank.weighting`, ``kfac``; collected by :mod:`lowrank.stages.calibrate`).

The distillation loss to the dense model is zero with zero gradient at the dense weights, so
the gradients of that loss say nothing; the gradients of a *sampled* objective do: for causal
LMs the NLL of next tokens drawn from the model's own distribution (E[ggᵀ] is the true Fisher,
the Hessian of the KL), for encoders and other models Gaussian noise projected on the hidden
states or outputs (E[ggᵀ] is the Gauss-Newton matrix of the normalized MSE). An encoder thus
gets a real output-side weighting, not a fallback to one-sided whitening.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models import output_head, output_tensor
from ..naming import weight_name
from ..nn.layers import is_transposed

# Output Grams are out × out: a Linear with more outputs than this (an LM head, 49k × 49k for
# SmolLM2) keeps one-sided whitening.
MAX_OUTPUTS = 8192


def sampled_objective(out, mask, kind: str, gen: torch.Generator,
                      input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """(sampled scalar objective, scale): Σ_s (scale·⟨∂objective/∂w, δ⟩_s)² estimates the
    distillation loss of a weight change δ on this batch to second order. ``input_ids`` (logits
    only): the real next tokens instead of sampled ones (the empirical Fisher)."""
    if kind == "logits":
        logits = out.logits.float()
        real = mask if mask is not None else torch.ones(logits.shape[:-1], dtype=torch.bool)
        logp = logits.log_softmax(-1)
        if input_ids is not None:  # position t predicts token t + 1 (when that one is real)
            real = real.clone()
            real[:, -1] = False
            real[:, :-1] &= mask[:, 1:] if mask is not None else True
            labels = input_ids[:, 1:][real[:, :-1]]
        else:
            with torch.no_grad():
                labels = torch.multinomial(logp[real].exp(), 1, generator=gen).squeeze(-1)
        # KL per real token (batchmean) ≈ ½ δᵀFδ / tokens, F = E[ggᵀ] for sampled labels.
        return (-logp[real].gather(-1, labels[:, None]).sum(),
                math.sqrt(0.5 / max(int(real.sum()), 1)))
    # MSE / mean square: Gauss-Newton 2·JᵀJ·w, sampled by noise ε: E[(εᵀJδ)²] = ‖Jδ‖².
    tensors = (list(out.hidden_states) if kind == "hidden" else [output_tensor(out)])
    total = 0.0
    for t in tensors:
        t = t.float()
        rows = t[mask] if mask is not None and kind == "hidden" else t
        weight = 1 / (len(tensors) * rows.numel() * float(rows.detach().pow(2).mean()) + 1e-30)
        noise = torch.randn(t.shape, generator=gen)
        if mask is not None and kind == "hidden":
            noise = noise * mask[..., None]
        total = total + math.sqrt(weight) * (noise * t).sum()
    return total, 1.0


class OutputGradients:
    """Forward hooks on the Linear (and Conv1D) modules named in ``only`` (None: all) that make
    their outputs part of the autograd graph and, on backward, add Σ g gᵀ over the real tokens
    (``self.mask``) to ``grams[name]``, float64 on ``device``. The model's output embedding and
    layers with more than ``max_outputs`` outputs are skipped."""

    def __init__(self, model: nn.Module, grams: dict[str, torch.Tensor],
                 only: set[str] | None = None, device: str = "cpu",
                 max_outputs: int = MAX_OUTPUTS):
        self.grams, self.device, self.mask, self.handles = grams, device, None, []
        head = output_head(model)
        for fqn, module in model.named_modules():
            name = weight_name(fqn)
            if module is head or only is not None and name not in only:
                continue
            if isinstance(module, nn.Linear) and module.out_features <= max_outputs or \
                    is_transposed(module) and module.weight.shape[1] <= max_outputs:
                self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args, out):
            if not torch.is_grad_enabled() or not isinstance(out, torch.Tensor) \
                    or not out.is_floating_point():
                return None
            if not out.requires_grad:  # nothing upstream needs a gradient: start the graph here
                out = out.detach().requires_grad_()
            mask = self.mask
            out.register_hook(lambda g: self._accumulate(name, g, mask))
            return out
        return hook

    def _accumulate(self, name: str, g: torch.Tensor, mask) -> None:
        if mask is not None and g.shape[:-1] == mask.shape:
            g = g[mask]
        rows = g.detach().reshape(-1, g.shape[-1]).float()
        # A float32 GEMM per batch (half the float64 time), summed in float64 across batches.
        gram = (rows.T @ rows).to(self.device, torch.float64)
        if name in self.grams:
            self.grams[name] += gram
        else:
            self.grams[name] = gram

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
