"""Adapters on the factors, as torch parametrizations: merging = removing the parametrization,
exact, and the rank stays the planned r (see :mod:`lowrank.stages.recover` for training).

- LoRA: each factor F (A: out × r, B: r × in) gets F + (alpha/q)·up·down, up zero-initialized;
  written as a PEFT adapter on the parameters (``LoraConfig(target_parameters=...)``, PEFT >=
  0.18.1) that ``PeftModel.from_pretrained`` loads over the factored model before recovery.
- Orthogonal: B gets B·R with R block-diagonal orthogonal (OFT-style, Cayley map).
"""

from __future__ import annotations

import math
import re
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


ATTACHED = ("lora", "orthogonal", "factors")  # the recovery methods add_adapters_ attaches


def add_adapters_(model: nn.Module, settings: RecoverSettings) -> list[nn.Parameter]:
    """Freeze ``model``, attach the adapters of ``settings.method`` (resolved: not "auto");
    return what to train."""
    if settings.method not in ATTACHED:
        raise ValueError(f"adapters of method {settings.method!r}: resolve it first (distill)")
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


def peft_key(module: str, attr: str) -> str:
    """Where a PeftModel keeps the LoRA on factor ``attr`` of ``module`` (``<key>.lora_A.weight``).

    PEFT wraps each targeted parameter in a ``ParamWrapper``; the two of one module nest in its
    parameter order (A, then B), so B's wrapper is the outer one, A's adapter sits one
    ``base_layer`` deeper and the module's own tensors (bias) two."""
    return f"base_model.model.{module}" + (".base_layer" if attr == "A" else "")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA adapters as PEFT saves LoRA on parameters: ``<peft_key>.lora_A.weight`` (q × cols)
    and ``<peft_key>.lora_B.weight`` (rows × q), delta = (alpha/q)·lora_B·lora_A as LoRADelta;
    plus the biases and norms that trained with them (``train_norms``)."""
    state = {}
    wrapped = set()
    for name, module in lowrank_modules(model).items():
        for attr, plist in (getattr(module, "parametrizations", None) or {}).items():
            for p in plist:
                if isinstance(p, LoRADelta):
                    wrapped.add(name)
                    prefix = peft_key(name, attr)
                    state[f"{prefix}.lora_A.weight"] = p.lora_A.detach().clone().contiguous()
                    state[f"{prefix}.lora_B.weight"] = p.lora_B.detach().clone().contiguous()
    if not state:
        return state
    # Without the trained biases and norms, PEFT would rebuild a different model from the one
    # merged. They go in whole, under the PeftModel's parameter names: PeftModel.from_pretrained
    # loads such keys into the base model (as it does biases saved with bias="all").
    for name, p in model.named_parameters():
        if p.requires_grad and ".parametrizations." not in f".{name}":  # trained, not LoRA
            module, _, leaf = name.rpartition(".")
            module += ".base_layer.base_layer" if module in wrapped else ""
            state[f"base_model.model.{module}.{leaf}" if module else f"base_model.model.{leaf}"] \
                = p.detach().clone().contiguous()
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
    """PEFT's ``adapter_config.json`` for :func:`adapter_state`'s adapters: LoRA on the
    parameters ``<module>.A`` and ``<module>.B`` (``target_parameters``; ``target_modules`` name
    modules and would wrap the low-rank module itself)."""
    ranks = {}
    for name, module in lowrank_modules(model).items():
        for attr, plist in (getattr(module, "parametrizations", None) or {}).items():
            ranks.update({f"{name}.{attr}": p.lora_A.shape[0] for p in plist
                          if isinstance(p, LoRADelta)})
    # A factor narrower than q gets a smaller adapter (LoRADelta: min(q, rows, cols)): PEFT's
    # per-target rank, matched against the parameter's full name. The scale stays alpha/rank, so
    # no alpha_pattern. (PEFT 0.21 warns that these keys "did not match any targeted module": its
    # check looks at modules only; the ranks are applied.)
    pattern = {f"^{re.escape(name)}$": r for name, r in ranks.items() if r != settings.rank}
    return {"peft_type": "LORA", "r": settings.rank, "lora_alpha": settings.alpha,
            "rank_pattern": pattern, "alpha_pattern": {}, "lora_dropout": 0.0, "bias": "none",
            "target_modules": [], "target_parameters": sorted(ranks),
            "base_model_name_or_path": base_model, "inference_mode": True,
            "fan_in_fan_out": False, "init_lora_weights": True}


def save_adapters(state: dict[str, torch.Tensor], config: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / "adapter_model.safetensors", state, {})
    write_json(directory / "adapter_config.json", config)
