"""Factorization: W ≈ A·B by truncated SVD (exact or seeded randomized) for every planned matrix.

Factor convention, used everywhere in lowrank: a weight ``<module>.weight`` of shape
(out, in, *kernel) is viewed as an out × (in·prod(kernel)) matrix W and replaced in the state dict
by ``<module>.A`` (out × r) and ``<module>.B`` (r × in·prod(kernel)); √Σ is split into both.
``<module>.bias`` is unchanged, and a layer computes y = A(Bx) + bias. A factored tensor not
named ``weight`` (the recurrent ``<rnn>.weight_hh_l0`` of an LSTM/GRU/RNN) keeps its full name:
``<rnn>.weight_hh_l0.A`` and ``<rnn>.weight_hh_l0.B``.

Tied weights (one tensor under two names: an LM head tied to the input embedding) are factored
once, under the first name; the other name is left out of the output and recorded as
``tied_to`` in ``lowrank_config.json``, and loading points it at the same factors.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint
from .data_aware import Weighting, factors_from_svd, weighted
from .errors import LowrankError
from .parallel import fixed_threads, open_source, ordered_map
from .plan import RankPlan
from .shards import LazyTensors, ShardWriter, numel
from .spectrum import layer_seed, matrix_infos, matrix_view, randomized_svd, squared_norm

FORMAT_VERSION = 1
FACTOR_LAYOUT = (
    "W ~= A @ B with W the (out, in*prod(kernel)) view of <module>.weight; "
    "<module>.A is (out, r), <module>.B is (r, in*prod(kernel)); <module>.bias unchanged"
)


@dataclass(frozen=True)
class FactorizeSettings:
    # "auto": exact SVD when min(m, n) <= exact_max_dim, else randomized (torch.svd_lowrank).
    method: str = "auto"
    exact_max_dim: int = 2048
    oversample: int = 10  # randomized: extra sketch columns beyond the rank
    niter: int = 4  # randomized: power iterations (more = closer to exact, slower)
    seed: int = 0
    # With calibration: recollect each layer group's statistics on the model with upstream
    # layers already factored (lowrank.sequential); one forward pass per transformer block.
    sequential: bool = False


@dataclass
class LayerResult:
    shape: list[int]
    rank: int | None
    method: str | None = None
    energy: float | None = None  # fraction of ‖W‖_F² kept by A·B
    rel_error: float | None = None  # ‖W − A·B‖_F / ‖W‖_F
    reason: str | None = None  # why it stayed dense
    tied_to: str | None = None  # the tensor this one is tied to (shares its factors or weight)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "rank"}


@dataclass
class LowRankCheckpoint:
    """The factorize stage's artifact: the output state dict and what happened to each layer."""

    tensors: Mapping[str, torch.Tensor]  # a dict, or LazyTensors streamed to disk
    layers: dict[str, LayerResult]
    params_before: int
    settings: FactorizeSettings
    metadata: dict = field(default_factory=dict)  # extra lowrank_config.json keys (recovery)
    adapters: dict[str, torch.Tensor] = field(default_factory=dict)  # PEFT-layout LoRA tensors
    adapter_config: dict | None = None

    @property
    def params_after(self) -> int:
        return numel(self.tensors)

    def lowrank_config(self) -> dict:
        """The ``lowrank_config.json`` of an output directory (deterministic: no paths, no times)."""
        from . import __version__

        factored = {n: r for n, r in self.layers.items() if r.rank is not None}
        return {
            "format": "lowrank",
            "format_version": FORMAT_VERSION,
            "lowrank_version": __version__,
            "factor_layout": FACTOR_LAYOUT,
            "params": {"before": self.params_before, "after": self.params_after,
                       "ratio": round(self.params_after / self.params_before, 6)},
            "factorize": asdict(self.settings),
            # PEFT-style anchored module patterns -> rank.
            "rank_pattern": {f"^{module_name(n)}$": r.rank for n, r in factored.items()},
            "layers": {n: dict(module=module_name(n), **r.to_json()) for n, r in self.layers.items()},
            **self.metadata,
        }


def module_name(tensor_name: str) -> str:
    """``encoder.layer.0.query.weight`` -> ``encoder.layer.0.query`` (``weight`` -> ``""``);
    other names stay whole (``lstm.weight_hh_l0``: its factors are ``lstm.weight_hh_l0.A/B``)."""
    return tensor_name.removesuffix("weight").removesuffix(".")


def factor_names(tensor_name: str) -> tuple[str, str]:
    prefix = module_name(tensor_name)
    return (f"{prefix}.A", f"{prefix}.B") if prefix else ("A", "B")


def choose_method(rows: int, cols: int, settings: FactorizeSettings) -> str:
    if settings.method != "auto":
        return settings.method
    return "exact" if min(rows, cols) <= settings.exact_max_dim else "randomized"


def factorize_matrix(w: torch.Tensor, rank: int, method: str = "exact", seed: int = 0,
                     oversample: int = 10, niter: int = 4, weighting: Weighting | None = None):
    """Rank-``rank`` factors of a 2-D ``w``: A = U_r√S_r, B = √S_r·Vh_r (Eckart–Young), or the
    data-aware factors of :mod:`lowrank.data_aware` when a ``weighting`` is given.

    Returns:
        ``(A, B, energy_kept, rel_error)``: A is (m, r), B is (r, n), in ``w``'s float dtype;
        energy is that of the truncated matrix (output energy on calibration data when
        weighted); rel_error is ‖W − A·B‖_F / ‖W‖_F.
    """
    work = w if w.dtype in (torch.float32, torch.float64) else w.float()
    if weighting is not None:  # the weighted products need double precision (G spans decades)
        work = work.double()
    target = weighted(work, weighting) if weighting is not None else work
    if method == "exact":
        U, S, Vh = torch.linalg.svd(target, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    elif method == "randomized":
        U, S, Vh = randomized_svd(target, rank, oversample, niter, seed)
    else:
        raise ValueError(f"unknown factorization method {method!r} (exact, randomized, auto)")
    if weighting is not None:
        A, B = factors_from_svd(work, weighting, U, S, Vh)
    else:
        root = S.sqrt()
        A, B = (U * root).contiguous(), (root[:, None] * Vh).contiguous()
    kept = float(S.double().pow(2).sum())
    del U, S, Vh  # the full SVD outputs: free them before the error pass (peak memory)
    out_dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
    A, B = A.to(out_dtype), B.to(out_dtype)
    total, w_sq = squared_norm(target), squared_norm(work)
    if total == 0 or w_sq == 0:
        return A, B, 1.0, 0.0
    return A, B, min(kept / total, 1.0), math.sqrt(residual_norm2(work, A, B) / w_sq)


def residual_norm2(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, block: int = 1024) -> float:
    """‖W − A·B‖_F² in float64, one block of W at a time: float64 copies of whole matrices would
    need several times the memory of W itself."""
    total = 0.0
    for j in range(0, w.shape[1], block):
        B64 = B[:, j:j + block].double()
        for i in range(0, w.shape[0], block):
            diff = w[i:i + block, j:j + block].double() - A[i:i + block].double() @ B64
            total += float(diff.pow(2).sum())
    return total


def find_ties(ckpt: Checkpoint, model=None) -> dict[str, str]:
    """Matrices of ``ckpt`` that are one weight under two names: {alias: primary}, the primary
    being the first name in checkpoint order. Found by shared storage (a torch state dict saved
    with tied parameters) and, given the dense architecture ``model`` (the meta device will do),
    by the parameters it shares (``tie_word_embeddings``) when both names are in the checkpoint.
    """
    names = [i.name for i in matrix_infos(ckpt)]
    groups: list[list[str]] = []
    if ckpt.kind == "torch":
        by_storage: dict[tuple, list[str]] = {}
        for name in names:
            t = ckpt.get(name)
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
            by_storage.setdefault(key, []).append(name)
        groups += list(by_storage.values())
    if model is not None:
        by_param: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            by_param.setdefault(id(p), []).append(name)
        groups += list(by_param.values())
    order = {n: i for i, n in enumerate(names)}
    ties: dict[str, str] = {}
    for group in groups:
        present = sorted({n for n in group if n in order}, key=order.__getitem__)
        for alias in present[1:]:
            ties[alias] = ties.get(present[0], present[0])
    return ties


def factor_task(source, name: str, rank: int, settings: FactorizeSettings,
                weighting: Weighting | None) -> tuple[str, torch.Tensor, torch.Tensor, LayerResult]:
    """Factor one matrix of checkpoint ``source`` (an open one, or its path in a worker process).

    Runs with a fixed thread count (:func:`lowrank.parallel.fixed_threads`), so the bytes do not
    depend on whether it ran serially, in a process pool or on Ray.
    """
    ckpt = open_source(source)
    info = ckpt.info(name)
    with fixed_threads():
        w = matrix_view(ckpt.get(name))
        method = choose_method(*w.shape, settings)
        A, B, energy, err = factorize_matrix(
            w, rank, method, layer_seed(settings.seed, name), settings.oversample,
            settings.niter, weighting,
        )
    if weighting is not None:
        method = f"{method}+{weighting.kind}"
    return (name, A.to(info.dtype), B.to(info.dtype),
            LayerResult(list(info.shape), rank, method, energy, err))


def factorize(
    ckpt: Checkpoint,
    plan: RankPlan,
    settings: FactorizeSettings = FactorizeSettings(),
    on_layer: Callable[[str], None] | None = None,
    stats=None,
    ties: dict[str, str] | None = None,
    out_dir: Path | None = None,
    workers: int = 1,
    executor: str = "process",
) -> LowRankCheckpoint:
    """Replace each planned matrix of ``ckpt`` by its factors; copy every other tensor.

    With calibration ``stats`` (:class:`~lowrank.calibrate.ActivationStats`), layers that saw
    data are factored data-aware (:mod:`lowrank.data_aware`). ``ties`` ({alias: primary}, see
    :func:`find_ties`; shared storage is always detected) keeps tied weights tied: the alias
    is not written and follows its primary (factored once, whatever the plan says of it).

    Memory: tensors are read one at a time. With ``out_dir`` the output is streamed into
    safetensors files there (:class:`~lowrank.shards.ShardWriter`) and the result's ``tensors``
    read from them lazily, so peak memory is a few times the largest tensor, not the model.
    ``workers`` > 1 factors matrices in that many processes (``executor="ray"``: Ray tasks);
    the output is byte-identical to a serial run.
    """
    infos = {info.name: info for info in ckpt.infos()}
    ties = {**find_ties(ckpt), **(ties or {})}
    planned = {n: layer.rank for n, layer in plan.layers.items()
               if layer.rank is not None and n in infos and n not in ties}
    parallel = workers > 1 or executor != "process"
    source = str(ckpt.path) if parallel else ckpt

    def weighting(name: str) -> Weighting | None:
        return stats.weighting(name, math.prod(infos[name].shape[1:])) if stats is not None else None

    done = {}
    if stats is not None and settings.sequential:
        from .sequential import sequential_factors

        recurrent = [n for n in planned if n != "weight" and not n.endswith(".weight")]
        if recurrent:
            raise LowrankError(f"--sequential handles module weights only, not {recurrent[0]} "
                               f"(leave it out, or drop --sequential)")

        def factor(name: str, w: Weighting | None):
            _, A, B, result = factor_task(ckpt, name, planned[name], settings, w)
            if on_layer:
                on_layer(name)
            return A, B, result

        done = sequential_factors(ckpt, planned, stats, factor)
    order = sorted(infos)
    jobs = [n for n in order if n in planned and n not in done]
    results = ordered_map(factor_task, ((source, n, planned[n], settings, weighting(n))
                                        for n in jobs), workers, executor)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerResult] = {}
    from . import __version__

    writer = ShardWriter(out_dir, {"lowrank_version": __version__}) if out_dir else None
    put = writer.add if writer else tensors.__setitem__
    with writer or contextlib.nullcontext(), contextlib.closing(results):
        for name in order:
            info, layer = infos[name], plan.layers.get(name)
            if name in ties:
                primary = ties[name]
                shares = "factors" if primary in planned else "weight"
                layers[name] = LayerResult(list(info.shape), None, reason=f"tied to {primary} "
                                           f"(shares its {shares})", tied_to=primary)
                continue
            if name not in planned:
                put(name, ckpt.get(name))
                if layer is not None:
                    layers[name] = LayerResult(list(info.shape), None, reason=layer.reason)
                continue
            if name in done:
                A, B, result = done.pop(name)
            else:
                got, A, B, result = next(results)
                assert got == name, (got, name)  # ordered_map keeps task order
                if on_layer:
                    on_layer(name)
            a_name, b_name = factor_names(name)
            put(a_name, A)
            put(b_name, B)
            layers[name] = result
    layers = {n: layers[n] for n in infos if n in layers}  # checkpoint order, as before
    stored = LazyTensors.open(out_dir) if out_dir else tensors
    return LowRankCheckpoint(stored, layers, ckpt.num_params(), settings)


def reconstruct_dense(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The dense state dict a low-rank one stands for: ``<module>.weight = (A @ B).reshape``.

    Args:
        tensors: a low-rank state dict (e.g. ``safetensors.torch.load_file(OUT/model.safetensors)``).
        config: the parsed ``lowrank_config.json`` of the same output.
    """
    dense = dict(tensors)
    for name, layer in config["layers"].items():
        if layer.get("rank") is None:
            continue
        a_name, b_name = factor_names(name)
        A, B = dense.pop(a_name), dense.pop(b_name)
        dense[name] = (A.double() @ B.double()).to(A.dtype).reshape(layer["shape"])
    for name, layer in config["layers"].items():  # a tied name is the same tensor, as saved
        if layer.get("tied_to"):
            dense[name] = dense[layer["tied_to"]]
    return dense

