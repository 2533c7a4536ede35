"""Adapters on the factors, as torch parametrizations: merging = removing the parametrization,
exact, and the rank stays the planned r (see :mod:`lowrank.stages.recover` for training).

- LoRA: each factor F (A: out × r, B: r × in) gets F + (alpha/q)·up·down, up zero-initialized.
- Orthogonal: B gets B·R with R block-diagonal orthogonal (OFT-style, Cayley map).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..io.files import write_json
from ..io.safetensors import save_tensors
from .layers import Factored, TiedLowRankLinear

if TYPE_CHECKING:  # settings are the recover stage's; nn never imports a stage at run time
    from ..stages.recover import RecoverSettings


class LoRADelta(nn.Module):
    """F ↦ F + scale·(up @ down) for a factor F viewed as a linear map (rows × cols)."""

    def __init__(self, rows: int, cols: int, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        rank = min(rank, rows, cols)
        self.scale = alpha / rank
        # PEFT's names and initialization: lora_A (rank × cols) Kaiming-uniform, lora_B zero.
        bound = 1 / math.sqrt(cols)
        self.lora_A = nn.Parameter(torch.empty(rank, cols).uniform_(-bound, bound, generator=generator))
        self.lora_B = nn.Parameter(torch.zeros(rows, rank))

    def forward(self, factor: torch.Tensor) -> torch.Tensor:
        return factor + self.scale * (self.lora_B @ self.lora_A).to(factor.dtype)


class BlockRotation(nn.Module):
    """B ↦ B·R, R block-diagonal orthogonal; each block is a Linear's weight kept orthogonal."""

    def __init__(self, cols: int, block_size: int):
        super().__init__()
        sizes = [block_size] * (cols // block_size) + ([cols % block_size] if cols % block_size else [])
        self.blocks = nn.ModuleList()
        for size in sizes:
            block = nn.Linear(size, size, bias=False)
            nn.init.eye_(block.weight)
            # Cayley map: starts exactly at the identity and stays orthogonal.
            nn.utils.parametrizations.orthogonal(block, orthogonal_map="cayley")
            self.blocks.append(block)

    def rotation(self) -> torch.Tensor:
        return torch.block_diag(*(b.weight for b in self.blocks))

    def forward(self, factor: torch.Tensor) -> torch.Tensor:
        return factor @ self.rotation().to(factor.dtype)


def lowrank_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The factored modules that own their factors (a tied alias reads its source's)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, Factored) and not isinstance(m, TiedLowRankLinear)}


def add_adapters_(model: nn.Module, settings: RecoverSettings) -> list[nn.Parameter]:
    """Freeze ``model``, attach the adapters of ``settings.method``; return what to train."""
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(settings.seed)
    trainable: list[nn.Parameter] = []
    for module in lowrank_modules(model).values():
        if settings.method == "factors":
            trainable += [module.A, module.B]
            continue
        if settings.method == "lora":
            for attr in ("B", "A"):
                rows, cols = getattr(module, attr).shape
                parametrize.register_parametrization(
                    module, attr, LoRADelta(rows, cols, settings.rank, settings.alpha, generator))
        else:
            parametrize.register_parametrization(
                module, "B", BlockRotation(module.B.shape[1], settings.block_size))
        trainable += [p for n, p in module.parametrizations.named_parameters()
                      if n not in ("A.original", "B.original")]
    if settings.train_norms:
        for module in model.modules():
            if isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"):
                trainable += [p for p in module.parameters(recurse=False)]
            elif isinstance(module, (nn.Linear, Factored)) and getattr(module, "bias", None) is not None:
                trainable.append(module.bias)
    unique = list({id(p): p for p in trainable}.values())
    for p in unique:
        p.requires_grad_(True)
    return unique


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA adapters in PEFT's layout: ``base_model.model.<module>.<A|B>.lora_<A|B>.weight``."""
    state = {}
    for name, module in lowrank_modules(model).items():
        if not parametrize.is_parametrized(module):
            continue
        for attr, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, LoRADelta):
                    prefix = f"base_model.model.{name}.{attr}" if name else f"base_model.model.{attr}"
                    state[f"{prefix}.lora_A.weight"] = p.lora_A.detach().clone().contiguous()
                    state[f"{prefix}.lora_B.weight"] = p.lora_B.detach().clone().contiguous()
    return state


def merge_adapters_(model: nn.Module) -> nn.Module:
    """Fold every adapter into its factor (exact; shapes and ranks unchanged)."""
    for module in lowrank_modules(model).values():
        for attr in list(getattr(module, "parametrizations", {}) or {}):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def adapter_config(model: nn.Module, settings: RecoverSettings, base_model: str | None) -> dict:
    """PEFT's ``adapter_config.json`` for :func:`adapter_state`'s adapters."""
    state = adapter_state(model)
    ranks = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): t.shape[0]
             for k, t in state.items() if k.endswith(".lora_A.weight")}
    # A factor narrower than the LoRA rank gets a smaller adapter: PEFT's per-module override.
    pattern = {f"^{name}$": r for name, r in ranks.items() if r != settings.rank}
    return {"peft_type": "LORA", "r": settings.rank, "lora_alpha": settings.alpha,
            "rank_pattern": pattern, "alpha_pattern": {p: settings.alpha for p in pattern},
            "lora_dropout": 0.0, "bias": "none", "target_modules": sorted(ranks),
            "base_model_name_or_path": base_model, "inference_mode": True,
            "fan_in_fan_out": False, "init_lora_weights": True,
            "lowrank_note": "LoRA on the low-rank factors <module>.A (r -> out) and <module>.B "
                            "(in -> r) of the lowrank checkpoint; already merged into its "
                            "model.safetensors"}


def save_adapters(state: dict[str, torch.Tensor], config: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / "adapter_model.safetensors", state, {})
    write_json(directory / "adapter_config.json", config)
