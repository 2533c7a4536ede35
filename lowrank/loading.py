"""``lowrank.load``: an output directory back to a runnable model with low-rank layers in place."""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .errors import InputError, LowrankError
from .factorize import module_name
from .layers import TiedLowRankLinear, _replace, swap_lowrank_

# ``package.module:function`` (imported from the current directory too), or the function itself:
# a zero-argument callable returning the dense nn.Module whose state-dict names match the
# checkpoint. It lets calibration, recovery, evaluation and export run non-HF models.
ModelFactory = str | Callable[[], nn.Module]


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


def load(path: str | Path, model: nn.Module | str | None = None) -> nn.Module:
    """Load a lowrank output directory as a runnable model.

    Args:
        path: a directory written by ``lowrank compress``.
        model: the dense architecture to swap low-rank layers into (any ``nn.Module`` whose
            state-dict names match, or a ``package.module:function`` factory returning one).
            Not needed for HF directories: the transformers model is built from the copied
            ``config.json``.

    Returns:
        The model in eval mode, factored layers replaced by :mod:`lowrank.layers` modules.

    Example:
        >>> model = lowrank.load("out/minilm-lowrank")  # doctest: +SKIP
        >>> model(**tokenizer("hello", return_tensors="pt")).last_hidden_state.shape  # doctest: +SKIP
        torch.Size([1, 3, 384])
    """
    path = Path(path)
    if isinstance(model, str):  # a factory, as --model-factory takes it
        model = make_model(model)
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


def _field(entry, key: str):
    return entry.get(key) if isinstance(entry, dict) else getattr(entry, key, None)


def model_ties(model: nn.Module) -> list[list[str]]:
    """Names of the parameters ``model`` shares (e.g. ``lm_head.weight`` and
    ``model.embed_tokens.weight`` under ``tie_word_embeddings``), one list per shared one."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def tied_module(alias: nn.Module, source: nn.Module, name: str) -> nn.Module:
    """What replaces module ``name`` whose weight was tied to the now low-rank ``source``."""
    shape = (source.A.shape[0], source.B.shape[1])
    if isinstance(alias, nn.Linear) and tuple(alias.weight.shape) == shape:
        return TiedLowRankLinear(source, alias.bias)  # logits = (h·Bᵀ)·Aᵀ, factors shared
    if type(alias) is type(source) or (isinstance(alias, nn.Embedding)
                                       and tuple(alias.weight.shape) == shape):
        return source  # the same table twice: share the module
    raise LowrankError(f"cannot keep {name} ({type(alias).__name__}) tied to a factored "
                       f"{type(source).__name__}")


def restore_ties_(model: nn.Module, ties: dict[str, str], factored: set[str]) -> set[str]:
    """Keep each tie {alias tensor: primary tensor} on the swapped ``model``: an alias of a
    factored primary becomes a module on the same factors, an alias of a dense primary gets
    its very parameter. Returns the alias names the state dict need not hold."""
    unneeded = set()
    for alias, primary in ties.items():
        alias_module, primary_module = module_name(alias), module_name(primary)
        if alias_module in factored:  # factored on its own (an untied checkpoint): keep
            continue
        if primary_module in factored:
            old = model.get_submodule(alias_module)
            _replace(model, alias_module,
                     tied_module(old, model.get_submodule(primary_module), alias_module))
        else:
            owner, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr,
                    model.get_parameter(primary))
        unneeded.add(alias)
    return unneeded


def instantiate(state: dict[str, torch.Tensor], layers: dict, model: nn.Module,
                source: str = "checkpoint") -> nn.Module:
    """Swap low-rank modules into the dense ``model`` for ``layers`` (tensor name -> entry with
    ``rank``, and ``tied_to`` for a tied name) and load the low-rank ``state``.

    Ties are kept: those recorded in ``layers`` and those of the model itself (an LM head
    tied to its input embedding): the alias of a factored embedding becomes a
    :class:`~lowrank.layers.TiedLowRankLinear` on the embedding's own A and B."""
    ranks = {module_name(n): _field(e, "rank") for n, e in layers.items()}
    ranks = {n: r for n, r in ranks.items() if r is not None}
    ties = {}
    for group in model_ties(model):
        primary = next((n for n in group if module_name(n) in ranks), group[0])
        ties.update({n: primary for n in group if n != primary})
    ties.update({n: _field(e, "tied_to") for n, e in layers.items() if _field(e, "tied_to")})
    swap_lowrank_(model, ranks)
    unneeded = restore_ties_(model, ties, set(ranks))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in unneeded]
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


def dense_model(ckpt, factory: ModelFactory | None = None) -> nn.Module:
    """The dense model of an open :class:`~lowrank.checkpoint.Checkpoint`: the HF model of its
    directory, or the ``factory``'s model with the checkpoint's tensors (names must match)."""
    model = architecture(ckpt, factory)
    result = model.load_state_dict({n: ckpt.get(n) for n in ckpt.names()}, strict=False)
    if factory is not None:
        tied = {n for group in model_ties(model) for n in group}
        missing = [k for k in result.missing_keys if k not in tied]
        extra = result.unexpected_keys
        if missing or extra:
            what = (f"lacks {missing[0]!r}, which the model needs" if missing
                    else f"holds {extra[0]!r}, which the model has no place for")
            raise InputError(f"{ckpt.path}: the checkpoint {what} (does --model-factory "
                             f"{factory_name(factory)} build the same architecture?)")
    return model.eval()


def architecture(ckpt, factory: ModelFactory | None = None) -> nn.Module:
    """A fresh dense model for ``ckpt`` to load or swap factors into: the ``factory``'s, else
    the HF model named by its directory's ``config.json``."""
    if factory is not None:
        return make_model(factory)
    if ckpt.model_dir is None:
        raise InputError(f"{ckpt.path}: not an HF model directory (no config.json); give the "
                         f"architecture with --model-factory package.module:function")
    return build_hf_model(ckpt.model_dir)


def factory_name(factory: ModelFactory) -> str:
    if isinstance(factory, str):
        return factory
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', factory)}"


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """``package.module:function`` -> the function. The module is imported like ``python -m``
    would, from the current directory too: this is the user's own code, named by the flag."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise InputError(f"--model-factory {spec!r}: expected package.module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.import_module(module)
    except ImportError as e:
        raise InputError(f"--model-factory {spec}: cannot import {module} "
                         f"({_first_line(e) or type(e).__name__})") from e
    except Exception as e:  # the user's module raised while importing
        raise InputError(f"--model-factory {spec}: importing {module} raised "
                         f"{type(e).__name__}: {_first_line(e)}") from e
    for part in attr.split("."):
        if not hasattr(found, part):
            raise InputError(f"--model-factory {spec}: {module} has no {attr!r}")
        found = getattr(found, part)
    if not callable(found):
        raise InputError(f"--model-factory {spec}: {attr} is not callable "
                         f"({type(found).__name__})")
    return found


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")


def make_model(factory: ModelFactory) -> nn.Module:
    """Call the factory (resolving ``package.module:function`` first); it must return an
    ``nn.Module``. Errors are one-line InputErrors naming the factory."""
    fn = resolve_factory(factory) if isinstance(factory, str) else factory
    name = factory_name(factory)
    try:
        model = fn()
    except LowrankError:
        raise
    except Exception as e:
        raise InputError(f"--model-factory {name} raised {type(e).__name__}: "
                         f"{_first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise InputError(f"--model-factory {name} returned {type(model).__name__}, "
                         f"not a torch nn.Module")
    return model.eval()
