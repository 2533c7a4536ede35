"""Tensor names <-> module names and factor names: the one place for lowrank's naming rule.

A weight ``<module>.weight`` of shape (out, in, *kernel) is viewed as an out × (in·prod(kernel))
matrix W and replaced in the state dict by ``<module>.A`` (out × r) and ``<module>.B``
(r × in·prod(kernel)): W ≈ A·B, y = A(Bx) + bias, ``<module>.bias`` unchanged. A factored tensor
not named ``weight`` (the recurrent ``<rnn>.weight_hh_l0`` of an LSTM/GRU/RNN, the
``<mha>.in_proj_weight`` of nn.MultiheadAttention) keeps its full name:
``<rnn>.weight_hh_l0.A`` and ``<rnn>.weight_hh_l0.B``. (PEFT names its LoRA pair the other
way round: its ``lora_A`` is the input side.)

Transposed weights: GPT-2's ``Conv1D`` (transformers) stores its weight as (in, out) and computes
y = x·W + b. Its matrix is the (out, in) view Wᵀ, so ``<module>.A`` is (out × r) and
``<module>.B`` (r × in) as for a Linear, and the factored module is a plain LowRankLinear: the
state dict of a factored Conv1D is indistinguishable from a factored Linear's. The checkpoint
tensor alone does not say it is transposed (a square c_proj looks like any matrix), so the
architecture tells (:func:`lowrank.nn.layers.is_transposed`); ``lowrank_config.json`` records
``"transposed": true`` for such layers, which :func:`~lowrank.stages.factored.reconstruct_dense`
uses to write the (in, out) weight back.
"""

from __future__ import annotations

import re

FACTOR_LAYOUT = (
    "W ~= A @ B with W the (out, in*prod(kernel)) view of <module>.weight; "
    "<module>.A is (out, r), <module>.B is (r, in*prod(kernel)); <module>.bias unchanged"
)

# Tensors a low-rank module can replace: a module's ``weight`` (Linear, Embedding, Conv), the
# recurrent weights of LSTM/GRU/RNN (lowrank.nn.recurrent.LowRankRNN) and the in-projection of
# nn.MultiheadAttention (lowrank.nn.attention); other parameters used outside a module's own
# weight stay dense.
FACTORABLE = re.compile(r"(^|\.)(weight|weight_(ih|hh)_l\d+(_reverse)?|in_proj_weight)$")
RECURRENT = re.compile(r"^weight_(ih|hh)_l\d+(_reverse)?$")
IN_PROJ = "in_proj_weight"  # nn.MultiheadAttention's stacked q/k/v projection (3E × E)


def module_name(tensor_name: str) -> str:
    """``encoder.layer.0.query.weight`` -> ``encoder.layer.0.query`` (``weight`` -> ``""``);
    other names stay whole (``lstm.weight_hh_l0``: its factors are ``lstm.weight_hh_l0.A/B``;
    ``attn.in_proj_weight``: ``attn.in_proj_weight.A/B``)."""
    if tensor_name == "weight":
        return ""
    return tensor_name.removesuffix(".weight")


def weight_name(fqn: str) -> str:
    """The tensor name of module ``fqn``'s weight (``""``, the root module: ``weight``)."""
    return f"{fqn}.weight" if fqn else "weight"


def factor_names(tensor_name: str) -> tuple[str, str]:
    """State-dict names of the factors (A, B) that replace ``tensor_name``."""
    prefix = module_name(tensor_name)
    return (f"{prefix}.A", f"{prefix}.B") if prefix else ("A", "B")


def split_owner(tensor_name: str) -> tuple[str, str]:
    """``lstm.weight_hh_l0`` -> (``lstm``, ``weight_hh_l0``): the owning module and attribute."""
    owner, _, attr = tensor_name.rpartition(".")
    return owner, attr
