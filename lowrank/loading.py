"""``lowrank.load``: an output directory back to a runnable model with low-rank layers in place."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .errors import InputError, LowrankError
from .factorize import module_name
from .layers import swap_lowrank_


def read_lowrank_config(path: Path) -> dict:
    file = Path(path) / "lowrank_config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise InputError(f"{path}: not a lowrank output (no lowrank_config.json)") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{file}: unreadable ({str(e).splitlines()[0]})") from e
    if config.get("format") != "lowrank" or not isinstance(config.get("layers"), dict):
        raise InputError(f"{file}: not a lowrank config (format {config.get('format')!r})")
    return config


def build_hf_model(model_dir: Path) -> nn.Module:
    """The transformers model named by ``config.json``'s ``architectures`` (AutoModel otherwise)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"{model_dir}/config.json: {str(e).splitlines()[0]}") from e
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    return model.eval()


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a lowrank output directory as a runnable model.

    Args:
        path: a directory written by ``lowrank compress``.
        model: the dense architecture to swap low-rank layers into (any ``nn.Module`` whose
            state-dict names match). Not needed for HF directories: the transformers model is
            built from the copied ``config.json``.

    Returns:
        The model in eval mode, factored layers replaced by :mod:`lowrank.layers` modules.

    Example:
        >>> model = lowrank.load("out/minilm-lowrank")  # doctest: +SKIP
        >>> model(**tokenizer("hello", return_tensors="pt")).last_hidden_state.shape  # doctest: +SKIP
        torch.Size([1, 3, 384])
    """
    path = Path(path)
    config = read_lowrank_config(path)
    try:
        state = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}/model.safetensors: {str(e).splitlines()[0]}") from e
    if model is None:
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: no config.json, so no architecture to build; pass "
                             f"model=<the dense nn.Module> to lowrank.load")
        model = build_hf_model(path)
    return instantiate(state, config["layers"], model, str(path))


def instantiate(state: dict[str, torch.Tensor], layers: dict, model: nn.Module,
                source: str = "checkpoint") -> nn.Module:
    """Swap low-rank modules into the dense ``model`` for ``layers`` (tensor name -> entry with
    ``rank``) and load the low-rank ``state``."""
    ranks = {module_name(n): (e["rank"] if isinstance(e, dict) else e.rank)
             for n, e in layers.items()}
    swap_lowrank_(model, {n: r for n, r in ranks.items() if r is not None})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise LowrankError(f"{source}: the checkpoint lacks {len(missing)} tensor(s) the model "
                           f"needs, e.g. {missing[0]!r} (was it made for another architecture?)")
    # Unexpected keys are tolerated as transformers does (e.g. non-persistent position_ids
    # saved by older versions), unless they are factors that found no module.
    stray = [k for k in unexpected if k.endswith((".A", ".B"))]
    if stray:
        raise LowrankError(f"{source}: factor {stray[0]!r} has no low-rank module to go into")
    return model.eval()


def load_dense(model_dir: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The dense HF model of a checkpoint directory, for comparisons (offline, no download)."""
    from .checkpoint import open_checkpoint

    model = dense_model(open_checkpoint(model_dir))
    return model.to(dtype) if dtype else model


def dense_model(ckpt) -> nn.Module:
    """The dense HF model of an open :class:`~lowrank.checkpoint.Checkpoint`."""
    if ckpt.model_dir is None:
        raise InputError(f"{ckpt.path}: not an HF model directory (no config.json)")
    model = build_hf_model(ckpt.model_dir)
    model.load_state_dict({n: ckpt.get(n) for n in ckpt.names()}, strict=False)
    return model
