"""The one module swap: dense modules -> factored ones in any ``nn.Module``, ties kept."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LowrankError
from ..naming import IN_PROJ, RECURRENT, factor_names, module_name, split_owner, weight_name
from .attention import LowRankMultiheadAttention
from .layers import TiedLowRankLinear, is_transposed, lowrank_like, plain_lookup
from .recurrent import LowRankRNN


def _recurrent_owner(model: nn.Module, fqn: str) -> str | None:
    """``lstm`` for ``lstm.weight_hh_l0`` when ``lstm`` is an LSTM/GRU/RNN, else None."""
    parent, attr = split_owner(fqn)
    try:
        owner = model.get_submodule(parent) if parent else model
    except AttributeError:
        return None
    return parent if isinstance(owner, nn.RNNBase) and RECURRENT.match(attr) else None


def swap_lowrank_(model: nn.Module, ranks: dict[str, int],
                  factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                  splits: dict[str, list[int]] | None = None) -> nn.Module:
    """Replace, in place, each module named in ``ranks`` (fqn -> rank) by its low-rank version.

    A recurrent weight is named by its tensor (``lstm.weight_hh_l0``): the weights of one
    LSTM/GRU/RNN are gathered and the module becomes one :class:`LowRankRNN`; so is an
    ``<mha>.in_proj_weight``, its MultiheadAttention becoming a
    :class:`~lowrank.nn.attention.LowRankMultiheadAttention` (also when only its
    ``out_proj`` is factored). Biases are
    copied from the dense modules; the factors are ``factors[fqn] = (A, B)`` when given, else
    uninitialized (load them with ``load_state_dict``). ``splits[fqn]``: a fused Linear
    factored per part (:class:`~lowrank.nn.layers.LowRankLinear`, ``rank`` per part).
    """
    recurrent: dict[str, dict[str, int]] = {}
    attention: dict[str, int] = {}
    for fqn, rank in ranks.items():
        owner = _recurrent_owner(model, fqn)
        if owner is not None:
            recurrent.setdefault(owner, {})[split_owner(fqn)[1]] = rank
            continue
        parent, attr = split_owner(fqn)
        if attr == IN_PROJ and isinstance(_get(model, parent), nn.MultiheadAttention):
            attention[parent] = rank
            continue
        try:
            old = model.get_submodule(fqn) if fqn else model
        except AttributeError as e:
            raise LowrankError(f"the model has no module {fqn!r} to factor") from e
        new = lowrank_like(old, rank, (splits or {}).get(fqn))
        if getattr(old, "bias", None) is not None:
            with torch.no_grad():
                new.bias.copy_(old.bias)
        replace_module(model, fqn, new)
    for fqn, weights in recurrent.items():
        replace_module(model, fqn, LowRankRNN(model.get_submodule(fqn) if fqn else model, weights))
    # torch's MHA reads in_proj_weight and out_proj.weight as tensors: factoring either means
    # LowRankMultiheadAttention, which runs the attention itself.
    for fqn, mha in list(model.named_modules()):
        if isinstance(mha, nn.MultiheadAttention) and (
                fqn in attention or not isinstance(mha.out_proj, nn.Linear)):
            replace_module(model, fqn, LowRankMultiheadAttention(mha, attention.get(fqn)))
    for encoder in model.modules():  # its nested-tensor fast path needs dense weights
        if isinstance(encoder, nn.TransformerEncoder):
            encoder.use_nested_tensor = False
    with torch.no_grad():
        for fqn, (A, B) in (factors or {}).items():
            module = model.get_submodule(fqn)
            module.A.copy_(A)
            module.B.copy_(B)
    return model


def _get(model: nn.Module, fqn: str) -> nn.Module | None:
    try:
        return model.get_submodule(fqn) if fqn else model
    except AttributeError:
        return None


def replace_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    """Put ``new`` where module ``fqn`` of ``model`` is (the one way lowrank swaps modules)."""
    if not fqn:
        raise LowrankError("cannot swap the root module itself; wrap it in a parent module")
    parent_name, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _field(entry, key: str):  # a lowrank_config.json entry (dict) or a LayerResult
    return entry.get(key) if isinstance(entry, dict) else getattr(entry, key, None)


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
            old, source = model.get_submodule(alias_module), model.get_submodule(primary_module)
            new = tied_module(old, source, alias_module)
            replace_module(model, alias_module, new)
            if new is source:  # one module under two names (T5's shared embedding tables)
                unneeded.update(factor_names(alias))
        else:
            owner, attr = split_owner(alias)
            setattr(model.get_submodule(owner) if owner else model, attr,
                    model.get_parameter(primary))
        unneeded.add(alias)
    return unneeded


def instantiate(state: dict[str, torch.Tensor], layers: dict, model: nn.Module,
                source: str = "checkpoint", rename=None) -> nn.Module:
    """Swap low-rank modules into the dense ``model`` for ``layers`` (tensor name -> entry with
    ``rank``, and ``tied_to`` for a tied name) and load the low-rank ``state``.

    Ties are kept: those recorded in ``layers`` and those of the model itself (an LM head
    tied to its input embedding): the alias of a factored embedding becomes a
    :class:`~lowrank.layers.TiedLowRankLinear` on the embedding's own A and B.

    ``rename(name, model names)`` maps checkpoint names to the model's where they differ
    (:func:`lowrank.models.checkpoint_renamer`)."""
    if rename is not None:  # checkpoint names -> module names (weights are named before swap)
        known = set(model.state_dict())
        layers = {rename(n, known): e for n, e in layers.items()}
        layers = {n: ({**e, "tied_to": rename(e["tied_to"], known)} if isinstance(e, dict)
                      and e.get("tied_to") else e) for n, e in layers.items()}
    ranks = {module_name(n): _field(e, "rank") for n, e in layers.items()}
    ranks = {n: r for n, r in ranks.items() if r is not None}
    splits = {module_name(n): _field(e, "split") for n, e in layers.items() if _field(e, "split")}
    ties = {}
    for group in model_ties(model):
        primary = next((n for n in group if module_name(n) in ranks), group[0])
        ties.update({n: primary for n in group if n != primary})
    ties.update({n: _field(e, "tied_to") for n, e in layers.items() if _field(e, "tied_to")})
    swap_lowrank_(model, ranks, splits=splits)
    unneeded = restore_ties_(model, ties, set(ranks))
    if rename is not None:
        known = set(model.state_dict())
        state = {rename(k, known): v for k, v in state.items()}
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


def kept_dense(model: nn.Module) -> dict[str, str]:
    """Weights of ``model`` that no low-rank module can stand in for: {name: why}. The plan
    keeps them dense."""
    return {weight_name(fqn): f"{type(m).__name__} has its own forward, which a factored "
                              f"lookup would skip"
            for fqn, m in model.named_modules()
            if isinstance(m, nn.Embedding) and not plain_lookup(m)}


def fused_splits(model: nn.Module) -> dict[str, list[int]]:
    """{weight name: output sizes of its parts} for the fused projections of ``model`` whose
    parts are contiguous row blocks: Phi-3's ``qkv_proj`` (q, k, v; fewer kv heads under GQA)
    and ``gate_up_proj`` (gate, up), GPT-2's ``c_attn`` (q, k, v). GPT-NeoX's
    ``query_key_value`` interleaves q, k, v per head: not split, factored as one."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    found = {}
    for fqn, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        out = w.shape[1] if is_transposed(m) else w.shape[0]
        leaf = fqn.rpartition(".")[2]
        if leaf == "gate_up_proj" and out % 2 == 0:
            sizes = [out // 2] * 2
        elif leaf == "c_attn" and is_transposed(m) and out % 3 == 0:
            sizes = [out // 3] * 3
        elif leaf == "qkv_proj" and heads:
            kv = getattr(config, "num_key_value_heads", None) or heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            sizes = [heads * head_dim, kv * head_dim, kv * head_dim]
        else:
            continue
        if sum(sizes) == out:
            found[weight_name(fqn)] = sizes
    return found


def transposed_weights(model: nn.Module) -> set[str]:
    """Names of the weights ``model`` stores as (in, out) (GPT-2's Conv1D): their matrix is the
    transpose (:mod:`lowrank.naming`)."""
    return {weight_name(fqn) for fqn, m in model.named_modules() if is_transposed(m)}


def model_ties(model: nn.Module) -> list[list[str]]:
    """Names of the parameters ``model`` shares (e.g. ``lm_head.weight`` and
    ``model.embed_tokens.weight`` under ``tie_word_embeddings``), one list per shared one."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def blocks_prefix(model: nn.Module) -> str | None:
    """Name of the largest ModuleList (e.g. ``encoder.layer``), None when there is none."""
    lists = [(len(m), n) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n]
    return max(lists)[1] if lists else None
