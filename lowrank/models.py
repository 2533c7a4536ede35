"""Building models: the one way every stage gets a dense model, an architecture-only model (meta
device), or a tokenizer for a checkpoint — the HF directory's, or a model factory's.

A model factory is ``package.module:function`` (imported from the current directory too) or the
function itself: a zero-argument callable returning the dense ``nn.Module`` whose state-dict
names match the checkpoint. It lets calibration, recovery, evaluation, export and benchmarks run
non-HF models.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pkgutil
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import InputError, LowrankError, first_line
from .io.checkpoint import Checkpoint, open_checkpoint
from .naming import weight_name
from .nn.swap import instantiate, kept_dense, model_ties

ModelFactory = str | Callable[[], nn.Module]


def build_hf_model(model_dir: Path) -> nn.Module:
    """The transformers model named by ``config.json``'s ``architectures`` (AutoModel otherwise),
    with freshly initialized weights (build it under ``torch.device("meta")`` for shapes only)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise InputError(f"{model_dir}/config.json: {first_line(e)}") from e
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    return model.eval()


def checkpoint_renamer(model: nn.Module):
    """name -> name: transformers 5 renames some checkpoint keys when it loads them (GPT-NeoX's
    ``embed_out`` is the module ``lm_head``). The simple renames of ``model`` (regex on the key),
    applied only where they turn a name the model lacks into one it has; identity otherwise."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        rules = [(src, t.target_patterns[0]) for t in get_model_conversion_mapping(model)
                 if type(t) is WeightRenaming and t.scope_prefix is None
                 for src in t.source_patterns]
    except (ImportError, AttributeError, TypeError):  # not an HF model / older transformers
        rules = []

    def rename(name: str, known: set[str]) -> str:
        if name in known:
            return name
        for src, target in rules:
            new = re.sub(src, target, name, count=1)
            if new != name and new in known:
                return new
        return name
    return rename


def factory_name(factory: ModelFactory) -> str:
    if isinstance(factory, str):
        return factory
    return f"{getattr(factory, '__module__', '?')}:{getattr(factory, '__qualname__', factory)}"


def resolve_factory(spec: str) -> Callable[[], nn.Module]:
    """``package.module:function`` -> the function. The module is imported like ``python -m``
    would, from the current directory too: this is the user's own code, named by the user."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise InputError(f"model factory {spec!r}: expected package.module:function")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = pkgutil.resolve_name(spec)
    except ImportError as e:
        raise InputError(f"model factory {spec}: cannot import {module} ({first_line(e)})") from e
    except AttributeError as e:
        raise InputError(f"model factory {spec}: {module} has no {attr!r}") from e
    except Exception as e:  # the user's module raised while importing
        raise InputError(f"model factory {spec}: importing {module} raised "
                         f"{type(e).__name__}: {first_line(e)}") from e
    if not callable(found):
        raise InputError(f"model factory {spec}: {attr} is not callable "
                         f"({type(found).__name__})")
    return found


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
        raise InputError(f"model factory {name} raised {type(e).__name__}: "
                         f"{first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise InputError(f"model factory {name} returned {type(model).__name__}, "
                         f"not a torch nn.Module")
    return model.eval()


def _no_init_weights():
    """transformers' context that skips weight initialization (its own and torch.nn.init's),
    where this transformers has it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _files_state(directory) -> tuple:
    """What a directory's files are now (names, sizes, modification times): a cache key part
    that changes when a file does."""
    return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                        for e in os.scandir(directory) if e.is_file()))


@functools.lru_cache(maxsize=4)
def _load_tokenizer(model_dir: str, files: tuple):
    """A directory's tokenizer, loaded once per process while its files stay the same: each
    stage that runs the model needs it (0.5–0.9 s a load for MiniLM). Read-only use."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


@dataclass
class Models:
    """How to build the models of one checkpoint; ``factory`` gives the architecture of a
    non-HF checkpoint (see :data:`ModelFactory`). Every stage builds its models through this."""

    checkpoint: Checkpoint
    factory: ModelFactory | None = None

    @property
    def runnable(self) -> bool:
        """Whether there is an architecture to run (an HF directory or a factory)."""
        return self.factory is not None or self.checkpoint.model_dir is not None

    def architecture(self, meta: bool = False, uninitialized: bool = False) -> nn.Module:
        """A fresh dense model to load or swap factors into (on the meta device: shapes and
        ties only, no memory; ``uninitialized``: an HF model's weights left as allocated, for
        a caller that loads every one of them)."""
        if self.factory is not None:
            return make_model(self.factory)
        if self.checkpoint.model_dir is None:
            raise InputError(f"{self.checkpoint.path}: not an HF model directory (no "
                             f"config.json); give the architecture as a model factory "
                             f"(package.module:function)")
        if meta:
            with torch.device("meta"):
                return build_hf_model(self.checkpoint.model_dir)
        if uninitialized:
            with _no_init_weights():
                model = build_hf_model(self.checkpoint.model_dir)
            model.tie_weights()  # part of the initialization skipped
            return model
        return build_hf_model(self.checkpoint.model_dir)

    def dense(self) -> nn.Module:
        """The dense model with the checkpoint's weights (names must match the architecture).
        Built without initializing the weights the checkpoint then overwrites (SmolLM2: 1.3 s
        of random initialization per stage that runs the model); when the checkpoint lacks one,
        built again the usual way, so the missing ones keep their initialization."""
        ckpt = self.checkpoint
        for uninitialized in (True, False):
            model = self.architecture(uninitialized=uninitialized)
            rename, known = checkpoint_renamer(model), set(model.state_dict())
            result = model.load_state_dict({rename(n, known): ckpt.get(n) for n in ckpt.names()},
                                           strict=False)
            tied = {n for group in model_ties(model) for n in group}
            missing = [k for k in result.missing_keys if k not in tied]
            if not missing or self.factory is not None:
                break
        if self.factory is not None:
            extra = result.unexpected_keys
            if missing or extra:
                what = (f"lacks {missing[0]!r}, which the model needs" if missing
                        else f"holds {extra[0]!r}, which the model has no place for")
                raise InputError(f"{ckpt.path}: the checkpoint {what} (does the model factory "
                                 f"{factory_name(self.factory)} build the same architecture?)")
        return model.eval()

    def compressed(self, tensors, layers: dict) -> nn.Module:
        """The architecture with factored modules swapped in for ``layers`` (tensor name ->
        :class:`~lowrank.stages.factored.LayerResult` or its JSON) and ``tensors`` loaded."""
        model = self.architecture()
        return instantiate(dict(tensors), layers, model, str(self.checkpoint.path),
                           checkpoint_renamer(model))

    def linear_weight_names(self) -> set[str] | None:
        """Weights of nn.Linear modules (from the architecture, on the meta device), or None
        when there is no architecture (raw state dicts)."""
        if not self.runnable:
            return None
        model = self.architecture(meta=True)
        return {weight_name(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    def kept_dense(self) -> dict[str, str]:
        """:func:`lowrank.nn.swap.kept_dense` of the architecture, when there is one."""
        if not self.runnable:
            return {}
        try:
            return kept_dense(self.architecture(meta=self.factory is None))
        except (ValueError, KeyError, OSError, ImportError):
            return {}
        except LowrankError:  # an unbuildable HF config: later stages say so where they need it
            if self.factory is not None:
                raise
            return {}

    def tokenizer(self):
        """The HF directory's tokenizer; text needs one."""
        ckpt = self.checkpoint
        if ckpt.model_dir is None:
            raise InputError(f"{ckpt.path}: text needs a tokenizer (an HF model directory); for "
                             f"this model give a .safetensors/.pt file of input tensors")
        try:
            return _load_tokenizer(str(ckpt.model_dir), _files_state(ckpt.model_dir))
        except (OSError, ValueError) as e:
            raise InputError(f"{ckpt.model_dir}: no usable tokenizer ({first_line(e)}); for a "
                             f"non-text model give a .safetensors/.pt file of input "
                             f"tensors") from e

    def runnable_model(self, need_tokenizer: bool = True):
        """(dense model, tokenizer or None), or a clear error saying what is missing."""
        if not self.runnable:
            raise InputError(
                f"{self.checkpoint.path}: calibration, sensitivity, recovery, evaluation and "
                f"benchmarks run the model, and this checkpoint has no architecture: give an HF "
                f"model directory (config.json + tokenizer) or a model factory "
                f"(package.module:function)")
        tokenizer = self.tokenizer() if need_tokenizer else None
        return self.dense(), tokenizer


# GPT-2's causal LM class predates the ForCausalLM naming: GPT2LMHeadModel.
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(_CAUSAL_SUFFIXES) for a in [*archs, type(model).__name__])


def is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def load_dense(model_dir: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The dense HF model of a checkpoint directory, for comparisons (offline, no download)."""
    model = Models(open_checkpoint(model_dir)).dense()
    return model.to(dtype) if dtype else model


def output_tensor(out) -> torch.Tensor:
    """The main tensor of a model's output: the tensor itself, ``logits``, ``last_hidden_state``,
    or the first element of a tuple (an LSTM's ``(output, state)``)."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        value = out.get(name) if isinstance(out, dict) else getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out:
        return output_tensor(out[0])
    if isinstance(out, dict) and out:
        return output_tensor(next(iter(out.values())))
    raise InputError(f"cannot find the output tensor of a {type(out).__name__}")


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output embedding (an LM head) by transformers' ``get_output_embeddings``,
    or None."""
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head() if callable(get_head) else None


@contextlib.contextmanager
def skip_output_head(model: nn.Module, skip: bool = True):
    """Inside: the output head (:func:`output_head`) sees its input, but multiplies none of its
    rows: for passes that need only the inputs of layers (calibration's statistics), which
    would throw the logits away (49152 × 576 per token on SmolLM2, about a fifth of its
    forward pass's time: reports/speed.md).
    Its input reaches the hooks registered before this one; the model's logits come out
    empty along the sequence axis."""
    head = output_head(model) if skip else None
    if head is None:
        yield model
        return

    def no_rows(module, args):
        x = args[0] if args else None  # features (not token ids: a head that is an Embedding)
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2:
            return (args[0][..., :0, :], *args[1:])
        return None

    handle = head.register_forward_pre_hook(no_rows)
    try:
        yield model
    finally:
        handle.remove()


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Run a transformers model with its plain ("eager") attention inside the block: an ONNX
    graph traced from it has the MatMul–Softmax–MatMul pattern onnxruntime's transformer
    optimizer fuses into one Attention op (traced from SDPA it fused none on MiniLM, from eager
    all 6: benchmarks/latency_optimized.py). The same numbers either way."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield model
        return
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(before)
