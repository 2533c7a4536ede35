"""Recovery: train small adapters on the factors by distillation from the dense model, then merge.

No labels: the dense model is the teacher, unlabeled text the data. The loss compares hidden
states (every layer, real tokens only, each layer's MSE normalized by the teacher's mean square)
for encoders, or the logits (KL divergence) when the model has an LM head. A model that is not
a transformers model (``--model-factory``) is compared on its output tensor (MSE normalized
by the teacher's mean square: ``outputs``).

Adapters act on the factors, never on A·B, so merging is exact and the rank stays the planned r:

- ``lora``: each factor F (A: out × r, B: r × in) gets F + (alpha/q)·up·down with up zero-init, so
  training starts at the compressed model. Stored in PEFT's layout, one adapter per factor viewed
  as a linear map (``<module>.B`` maps in → r, ``<module>.A`` maps r → out).
- ``orthogonal``: B gets B·R with R a block-diagonal orthogonal matrix (OFT-style, blocks of
  ``block_size``; ``torch.nn.utils.parametrizations.orthogonal``, starting at the identity).
  A rotation keeps each factor's singular values: a gentler, norm-preserving correction.
- ``factors``: A and B themselves are trained (no adapter files).

Biases and LayerNorm weights are trained too when ``train_norms`` is set (few parameters, no
change in size).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from .calibrate import model_batches, num_samples
from .errors import InputError
from .layers import LowRankConv, LowRankEmbedding, LowRankFactors, LowRankLinear

METHODS = ("lora", "orthogonal", "factors")
# Learning rates measured on MiniLM at 50% (reports/quality-minilm.md): adapters start at zero
# change and take a larger step; the factors themselves need a smaller one.
DEFAULT_LR = {"lora": 3e-3, "orthogonal": 3e-3, "factors": 3e-4}
LOWRANK_TYPES = (LowRankLinear, LowRankEmbedding, LowRankConv, LowRankFactors)
LOSSES = ("auto", "hidden", "logits", "outputs")


@dataclass(frozen=True)
class RecoverSettings:
    method: str = "lora"  # lora | orthogonal | factors
    rank: int = 32  # LoRA rank q
    alpha: float = 32.0  # LoRA scale alpha/q
    block_size: int = 32  # orthogonal: size of R's diagonal blocks
    lr: float | None = None  # None: the measured default of the method (DEFAULT_LR)
    steps: int = 300
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0
    train_norms: bool = True  # also train biases and LayerNorm weights
    # hidden | logits | outputs | auto (logits for LMs, hidden for other transformers models,
    # outputs for any other nn.Module)
    loss: str = "auto"
    # hidden: add this weight × (1 − cosine) of mean-pooled last hidden states (what sentence
    # embeddings compare).
    pooled_weight: float = 0.0
    # Training text, one sample per line; None = the calibration text shipped with lowrank.
    calibration_file: str | None = None
    samples: int = 1024

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"recovery method must be one of {', '.join(METHODS)}, "
                             f"got {self.method!r}")
        if self.loss not in LOSSES:
            raise InputError(f"recovery loss must be one of {', '.join(LOSSES)}, "
                             f"got {self.loss!r}")
        if min(self.rank, self.block_size, self.steps, self.batch_size, self.samples,
               self.max_length) < 1 or (self.lr is not None and self.lr <= 0):
            raise InputError("recovery rank, block_size, steps, batch_size, samples, max_length "
                             "and lr must be positive")


# --------------------------------------------------------------------------------------------
# Adapters as parametrizations of the factors: merging = removing the parametrization.


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
    return {n: m for n, m in model.named_modules() if isinstance(m, LOWRANK_TYPES)}


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
            elif isinstance(module, (nn.Linear, *LOWRANK_TYPES)) and getattr(module, "bias", None) is not None:
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


# --------------------------------------------------------------------------------------------
# Distillation


def distillation_loss(student_out, teacher_out, mask: torch.Tensor | None, kind: str,
                      pooled_weight: float = 0.0) -> torch.Tensor:
    """Hidden states: mean over layers of masked MSE / teacher mean square (+ pooled_weight ×
    (1 − cosine of mean-pooled last hidden states)). Logits: KL(teacher ‖ student). Outputs:
    MSE / teacher mean square of the models' output tensors."""
    def real(x):  # real tokens only; every position when there is no mask (tensor inputs)
        return (x[mask] if mask is not None else x.reshape(-1, x.shape[-1])).float()

    if kind == "outputs":
        from .evaluate import output_tensor

        s, t = output_tensor(student_out).float(), output_tensor(teacher_out).float()
        return (s - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-12)

    if kind == "logits":
        s, t = real(student_out.logits).log_softmax(-1), real(teacher_out.logits).log_softmax(-1)
        return nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")
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


@dataclass
class RecoveryLog:
    """What training did: the loss curve, the held-back loss before/after, adapter sizes."""

    settings: RecoverSettings
    losses: list[float] = field(default_factory=list)  # per step, training batches
    heldout_before: float | None = None  # distillation loss on held-back samples
    heldout_after: float | None = None
    trainable_params: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        every = max(1, len(self.losses) // 50)  # a readable curve, not every step
        return {"method": self.settings.method, "settings": asdict(self.settings),
                "trainable_params": self.trainable_params,
                "heldout_loss_before": self.heldout_before, "heldout_loss_after": self.heldout_after,
                "loss_curve": [round(x, 6) for x in self.losses[::every]],
                "seconds": round(self.seconds, 2)}


def loss_kind(settings: RecoverSettings, model: nn.Module) -> str:
    if settings.loss != "auto":
        return settings.loss
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):  # no hidden_states to ask for: compare outputs
        return "outputs"
    return "logits" if hasattr(model, "get_output_embeddings") and \
        model.get_output_embeddings() is not None else "hidden"


def distill(student: nn.Module, teacher: nn.Module, tokenizer, data,
            settings: RecoverSettings = RecoverSettings(),
            on_step: Callable[[str], None] | None = None) -> RecoveryLog:
    """Attach adapters to ``student`` and train them to match ``teacher`` on ``data`` (text
    lines, or input tensors stacked on dim 0: see :func:`lowrank.calibrate.read_calibration`).

    One batch in eight (at least one) is held back to measure the loss before and after.
    The adapters stay attached: read them with :func:`adapter_state`, then
    :func:`merge_adapters_`.
    """
    import time

    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    if isinstance(data, list):
        data = list(data)
        random.Random(settings.seed).shuffle(data)
    else:
        perm = torch.randperm(num_samples(data), generator=torch.Generator().manual_seed(settings.seed))
        data = {k: v[perm] for k, v in data.items()}
    batches = list(model_batches(data, tokenizer, settings.batch_size, settings.max_length))
    held = batches[:max(1, len(batches) // 8)] if len(batches) > 1 else batches
    train = batches[len(held):] or batches
    kind = loss_kind(settings, teacher)
    teacher.eval()
    student.eval()  # no dropout: the target is the deterministic dense model

    def run(model, inputs, grad):
        extra = {"output_hidden_states": True} if kind == "hidden" else {}
        with torch.set_grad_enabled(grad):
            return model(**inputs, **extra)

    def heldout_loss() -> float:
        with torch.no_grad():
            return float(sum(distillation_loss(run(student, b, False), run(teacher, b, False),
                                               mask, kind, settings.pooled_weight)
                             for b, mask in held) / len(held))

    trainable = add_adapters_(student, settings)
    log = RecoveryLog(settings, trainable_params=sum(p.numel() for p in trainable))
    log.heldout_before = heldout_loss()
    lr = settings.lr or DEFAULT_LR[settings.method]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    warmup = max(1, settings.steps // 10)  # linear warm-up, then cosine decay to zero
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * step / settings.steps)))
    order = random.Random(settings.seed + 1)
    for step in range(settings.steps):
        batch, mask = train[order.randrange(len(train))] if step >= len(train) else train[step]
        with torch.no_grad():
            target = run(teacher, batch, False)
        loss = distillation_loss(run(student, batch, True), target, mask, kind,
                                 settings.pooled_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        log.losses.append(loss.item())
        if on_step:
            on_step(f"loss {log.losses[-1]:.4f}")
    log.heldout_after = heldout_loss()
    log.seconds = time.perf_counter() - start
    return log


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
    from .checkpoint import save_tensors, write_json

    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / "adapter_model.safetensors", state, {})
    write_json(directory / "adapter_config.json", config)
