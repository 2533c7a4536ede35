"""``lowrank.load``: an output directory back to a runnable model with low-rank layers in place."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .errors import InputError
from .io.checkpoint import open_checkpoint
from .models import Models, build_hf_model, checkpoint_renamer, load_dense, make_model
from .nn.swap import instantiate
from .stages.factored import read_lowrank_config


def load(path: str | Path, model: nn.Module | str | None = None) -> nn.Module:
    """Load a lowrank output directory (one ``model.safetensors`` or shards with an index) as a
    runnable model.

    Args:
        path: a directory written by ``lowrank compress``.
        model: the dense architecture to swap low-rank layers into (any ``nn.Module`` whose
            state-dict names match, or a ``package.module:function`` factory returning one).
            Not needed for HF directories: the transformers model is built from the copied
            ``config.json``.

    Returns:
        The model in eval mode, factored layers replaced by :mod:`lowrank.nn.layers` modules.

    Example:
        >>> model = lowrank.load("out/minilm-lowrank")  # doctest: +SKIP
        >>> model(**tokenizer("hello", return_tensors="pt")).last_hidden_state.shape  # doctest: +SKIP
        torch.Size([1, 3, 384])
    """
    path = Path(path)
    if isinstance(model, str):  # a model factory
        model = make_model(model)
    config = read_lowrank_config(path)
    ckpt = open_checkpoint(path)
    state = {name: ckpt.get(name) for name in ckpt.names()}
    if model is None:
        if not (path / "config.json").is_file():
            raise InputError(f"{path}: no config.json, so no architecture to build; pass "
                             f"model=<the dense nn.Module> to lowrank.load")
        model = build_hf_model(path)
    return instantiate(state, config["layers"], model, str(path), checkpoint_renamer(model))


def load_any(path: Path, factory=None) -> nn.Module:
    """A lowrank output directory (low-rank layers in place) or a dense HF model directory;
    with ``factory`` (see :data:`lowrank.models.ModelFactory`), also any checkpoint of the
    factory's architecture. What ``lowrank export`` and ``lowrank generate`` take."""
    path = Path(path)
    if (path / "lowrank_config.json").is_file():
        return load(path, make_model(factory) if factory is not None else None)
    if factory is not None:
        return Models(open_checkpoint(path), factory).dense()
    if (path / "config.json").is_file():
        return load_dense(path)
    raise InputError(f"{path}: not an HF model directory or a lowrank output (config.json not "
                     f"found); give a model factory for other checkpoints")
