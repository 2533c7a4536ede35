"""Factorization: W ≈ A·B by truncated SVD (float64 Gram eigensolver, exact, or seeded
randomized) for every planned matrix, data-aware when calibration statistics are given
(:mod:`lowrank.weighting`).

:func:`factorize` streams a checkpoint to a factored one (the pipeline's stage);
:func:`factorize_` factors a model a user already holds, in place.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..device import check_pass_dtype, dtype_name, on_device, pass_dtype
from ..errors import InputError, LowrankError
from ..io.checkpoint import Checkpoint, LazyTensors
from ..io.safetensors import ShardWriter
from ..linalg import (
    SVD_METHODS,
    choose_svd_method,
    factorize_matrix,
    factorize_split,
    layer_seed,
    matrix_view,
    residual_norm2,
    squared_norm,
)
from ..models import Models
from ..naming import IN_PROJ, RECURRENT, factor_names, module_name, split_owner
from ..nn.layers import is_transposed
from ..nn.swap import fused_splits, swap_lowrank_, transposed_weights
from ..parallel import (
    AUTO,
    fixed_threads,
    in_process,
    open_source,
    ordered_map,
    resolve_workers,
)
from ..pipeline.stage import Context, Stage, register_stage
from ..version import __version__
from ..weighting import Weighting
from .compensate import check_compensation, compensated_factors, resolve_compensation
from .factored import LayerResult, LowRankCheckpoint, load_lowrank, save_lowrank
from .plan import RankPlan
from .sequential import sequential_factors
from .ties import find_ties


@dataclass(frozen=True)
class FactorizeSettings:
    # "auto": the float64 Gram eigensolver ("gram") when min(m, n) <= exact_max_dim, else
    # randomized (a seeded range finder); "exact" (LAPACK SVD), "gram", "randomized" at every size.
    # 2048: there gram beats exact SVD (2.4 vs 3.9 s, same error); at 4096 its full eigh takes
    # 24 s against randomized's 15 s (1.2% higher error), reports/spectra-speed.md.
    method: str = "auto"
    exact_max_dim: int = 2048
    oversample: int = 10  # randomized: extra sketch columns beyond the rank
    niter: int = 4  # randomized: power iterations (more = closer to exact, slower)
    seed: int = 0
    # With calibration: recollect each layer group's statistics on the model with upstream
    # layers already factored (lowrank.stages.sequential); one forward pass per block.
    sequential: bool = False
    # With calibration: fit each layer's factors to the dense model's outputs from the inputs
    # it gets in the model factored so far (lowrank.stages.compensate.compensated_factors):
    # upstream error is corrected, not only re-weighted. A few model forwards on cached block
    # inputs; `compensate_damping` × the mean input eigenvalue pulls toward the weight.
    # Measured (README, Data-aware compression): SmolLM2 at 85%, perplexity 1.67× -> 1.51×
    # dense (damping 0.1: 1.56×, 1: 1.59×, 3: 1.78×). `sequential`, when set, replaces it.
    # "auto": by the text and model (compensate.COMPENSATION_AUTO).
    compensate: bool = True
    compensate_damping: float | str = "auto"
    # A block's last layer, when its output is added to the block's output as is (a pre-norm
    # residual branch: LLaMA's down_proj), is fitted instead to W·x̃ plus this share of the
    # block output's error, tokens weighted by 1/mean(y²) (the next RMSNorm divides by it);
    # None: fitted to W·x like the others. Measured (README, Data-aware compression): SmolLM2
    # perplexity / dense at 85% 1.512× -> 1.484×, at 70% 3.740× -> 3.479× (share 0: 1.487× at
    # 85%, 1: 1.509×). "auto": by the text and model (compensate.COMPENSATION_AUTO).
    compensate_residual_share: float | str | None = "auto"
    # The share of the calibration file's lines (evenly spread) that compensation fits on, with
    # every line of a top-up. "auto": half with a top-up (SmolLM2 85%: python_docs perplexity /
    # dense 1.393x -> 1.376x, factorize 104 -> 70 s), else all (compensate.COMPENSATION_AUTO).
    compensate_lines: float | str = "auto"
    # What compensation's forward passes autocast to: "auto" is bfloat16 where the CPU
    # multiplies it natively (lowrank.device.native_bf16), else float32; the sums stay float64
    # of float32 products. Measured (reports/speed.md): SmolLM2 at 85% factorize 123 -> 78 s,
    # perplexity / dense 1.466x -> 1.466x (300 paragraphs: 1.551x -> 1.553x); MiniLM at 50%
    # 23.7 -> 19.6 s, cosine 0.785 -> 0.783. Calibration's passes: CalibrateSettings.forward_dtype.
    compensate_dtype: str = "auto"
    # Factor a fused projection (Phi-3 qkv_proj/gate_up_proj, GPT-2 c_attn) per part, each part
    # at the rank that keeps the planned parameter count, instead of as one matrix. Off: at equal
    # parameters the fused factors had the lower whitened output error in every case measured
    # (real MiniLM q/k/v: 0.317 vs 0.355 at 25% of the parameters; reports/fused-vs-split.md).
    split_fused: bool = False

    def __post_init__(self):
        if self.method not in SVD_METHODS:
            raise InputError(f"factorize method must be one of {', '.join(SVD_METHODS)}, "
                             f"got {self.method!r}")
        check_compensation(self.compensate_damping, self.compensate_residual_share,
                           self.compensate_lines)
        check_pass_dtype(self.compensate_dtype, "factorize compensate_dtype")  # resolved later

    def compensation(self, stats) -> tuple:  # (damping, residual share, lines), "auto" resolved
        return resolve_compensation(self.compensate_damping, self.compensate_residual_share,
                                    self.compensate_lines, stats)


def choose_method(rows: int, cols: int, settings: FactorizeSettings) -> str:
    return choose_svd_method(settings.method, rows, cols, settings.exact_max_dim)


def split_rank(rank: int, cols: int, sizes: list[int]) -> int:
    """The per-part rank of a fused matrix (parts of ``sizes`` rows, ``cols`` columns) with no
    more parameters than rank ``rank`` as one: r·(rows + parts·cols) <= rank·(rows + cols);
    at most the smallest part's full rank (one r serves every part)."""
    rows = sum(sizes)
    r = rank * (rows + cols) // (rows + len(sizes) * cols)
    return max(1, min(r, *(min(s, cols) for s in sizes)))


def factor_task(source, name: str, rank: int, settings: FactorizeSettings,
                weighting: Weighting | None, transposed: bool = False,
                split: list[int] | None = None, device: str | None = None, eigh=None,
                matrix: torch.Tensor | None = None,
                ) -> tuple[str, torch.Tensor, torch.Tensor, LayerResult]:
    """Factor one matrix of checkpoint ``source`` (an open one, or its path in a worker process)
    on ``device`` (:func:`lowrank.device.on_device`: this matrix only; factors come back on CPU).
    ``eigh``: the Gram eigensolver, memoized (:func:`lowrank.linalg.gram_svd`) in-process
    (serial or threads).
    ``matrix``: the (out, in) matrix to factor in place of the weight (a compensated target,
    :func:`lowrank.stages.compensate.compensated_targets`); the error reported is still the
    weight's, ‖W − A·B‖ / ‖W‖.

    Runs with a fixed thread count (:func:`lowrank.parallel.fixed_threads`), so the bytes do not
    depend on whether it ran serially, in threads, in a process pool or on Ray.
    """
    ckpt = open_source(source)
    info = ckpt.info(name)
    with fixed_threads():
        weighting = weighting() if callable(weighting) else weighting  # see factorize
        w = matrix_view(on_device(ckpt.get(name), device), transposed)
        weight, w = w, w if matrix is None else on_device(matrix, device)
        method = choose_method(*w.shape, settings)
        if split:
            rank = split_rank(rank, w.shape[1], split)
            A, B, energy, err = factorize_split(w, split, rank, method,
                                                layer_seed(settings.seed, name),
                                                settings.oversample, settings.niter, weighting,
                                                eigh)
        else:
            A, B, energy, err = factorize_matrix(
                w, rank, method, layer_seed(settings.seed, name), settings.oversample,
                settings.niter, weighting, eigh,
            )
        if matrix is not None:
            err = _weight_error(weight, A.to(weight.dtype), B.to(weight.dtype), split)
    if weighting is not None:
        method = f"{method}+{weighting.kind}"
    return (name, A.to("cpu", info.dtype), B.to("cpu", info.dtype),
            LayerResult(list(info.shape), rank, method, energy, err,
                        transposed=True if transposed else None, split=split or None))


def _weight_error(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  split: list[int] | None) -> float:
    """‖W − A·B‖ / ‖W‖; for a fused projection factored per part (``split``: rows of each),
    row block i is A_i·B_i (:func:`lowrank.linalg.factorize_split`)."""
    if not split:
        residual = residual_norm2(w, A, B)
    else:
        r, rows, residual = B.shape[0] // len(split), 0, 0.0
        for i, size in enumerate(split):
            residual += residual_norm2(w[rows:rows + size], A[rows:rows + size],
                                       B[i * r:(i + 1) * r])
            rows += size
    return math.sqrt(residual / max(squared_norm(w), 1e-300))


def factorize(
    ckpt: Checkpoint,
    plan: RankPlan,
    settings: FactorizeSettings = FactorizeSettings(),
    on_layer: Callable[[str], None] | None = None,
    stats=None,
    ties: dict[str, str] | None = None,
    out_dir: Path | None = None,
    workers: int | str = AUTO,
    executor: str = "thread",
    transposed: set[str] = frozenset(),
    splits: dict[str, list[int]] | None = None,
    device: str | None = None,
) -> LowRankCheckpoint:
    """Replace each planned matrix of ``ckpt`` by its factors; copy every other tensor.

    With calibration ``stats`` (:class:`~lowrank.stages.calibrate.ActivationStats`), layers that
    saw data are factored data-aware (:mod:`lowrank.weighting`). ``ties`` ({alias: primary}, see
    :func:`find_ties`; shared storage is always detected) keeps tied weights tied: the alias
    is not written and follows its primary (factored once, whatever the plan says of it).

    Memory: tensors are read one at a time. With ``out_dir`` the output is streamed into
    safetensors files there (:class:`~lowrank.io.safetensors.ShardWriter`) and the result's ``tensors``
    read from them lazily, so peak memory is a few times the largest tensor, not the model.
    ``workers`` (default ``"auto"``: one per CPU core) factors that many matrices at once, in
    threads (``executor="process"``: processes; ``"ray"``: Ray tasks); the output is
    byte-identical to a serial run (``workers=1``). ``transposed``: weights stored (in, out)
    (GPT-2's Conv1D, :func:`lowrank.nn.swap.transposed_weights`), factored as their transpose.
    ``splits``: fused projections factored per part ({name: part sizes},
    :func:`lowrank.nn.swap.fused_splits`). ``device``: where the maths runs, one matrix at a
    time (:mod:`lowrank.device`; None: CPU).
    """
    splits = splits or {}
    infos = {info.name: info for info in ckpt.infos()}
    ties = {**find_ties(ckpt), **(ties or {})}
    planned = {n: layer.rank for n, layer in plan.layers.items()
               if layer.rank is not None and n in infos and n not in ties}
    workers = resolve_workers(workers, device)
    local = in_process(executor, workers)
    source = ckpt if local else str(ckpt.path)

    def weighting(name: str, lazy: bool = False) -> Weighting | Callable | None:
        """``name``'s weighting; ``lazy``: a function computing it, for a task in this process
        to call in its own thread (whitening factors then computed in parallel)."""
        if stats is None:
            return None
        cols = infos[name].shape[0] if name in transposed else math.prod(infos[name].shape[1:])
        compute = functools.partial(stats.weighting, name, cols, device)
        return compute if lazy else compute()

    done = {}
    if stats is not None and (settings.sequential or settings.compensate):
        recurrent = [n for n in planned
                     if RECURRENT.match(split_owner(n)[1]) or split_owner(n)[1] == IN_PROJ]
        if recurrent and settings.sequential:
            raise LowrankError(f"sequential statistics handle module weights only, not "
                               f"{recurrent[0]} (leave it out, or factor without sequential)")

        def factor(name: str, w: Weighting | None, matrix: torch.Tensor | None = None):
            _, A, B, result = factor_task(ckpt, name, planned[name], settings, w,
                                          name in transposed, splits.get(name), device,
                                          matrix=matrix)
            if on_layer:
                on_layer(name)
            return A, B, result

        done = (sequential_factors(Models(ckpt), planned, stats, factor) if settings.sequential
                else compensated_factors(Models(ckpt), planned, stats, factor,
                                         *settings.compensation(stats),
                                         pass_dtype(settings.compensate_dtype)))
    order = sorted(infos)
    jobs = [n for n in order if n in planned and n not in done]
    # In this process (serially or in threads), the Gram eigenvectors the scores stage computed
    # are reused (same bytes as a worker's own eigensolve: same function, same thread count).
    eigh = getattr(stats, "gram_eigenvectors", None) if local else None
    results = ordered_map(factor_task, ((source, n, planned[n], settings, weighting(n, local),
                                         n in transposed, splits.get(n), device, eigh)
                                        for n in jobs), workers, executor)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerResult] = {}
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
    return LowRankCheckpoint(stored, layers, ckpt.num_params(), asdict(settings))


def factorize_(model: nn.Module, plan: RankPlan | dict[str, int],
               settings: FactorizeSettings = FactorizeSettings(), stats=None,
               filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Factor, in place, the weights of a model you already hold.

    Args:
        model: any ``nn.Module`` (its factored modules become :mod:`lowrank.nn.layers` ones).
        plan: a :class:`RankPlan` or {tensor name: rank}, e.g. ``{"fc.weight": 16}``.
        settings: SVD method and seed.
        stats: calibration :class:`~lowrank.stages.calibrate.ActivationStats` for data-aware
            factors (keyed by the same tensor names).
        filter_fn: ``(module, fqn) -> bool`` picks which planned modules to factor.

    Example:
        >>> factorize_(model, {"0.weight": 8})  # doctest: +SKIP
    """
    ranks = ({n: layer.rank for n, layer in plan.layers.items() if layer.rank is not None}
             if isinstance(plan, RankPlan) else dict(plan))
    params = dict(model.named_parameters())
    factors, module_ranks = {}, {}
    splits = fused_splits(model) if settings.split_fused else {}
    for name, rank in ranks.items():
        if name not in params:
            raise InputError(f"the model has no weight {name!r} to factor")
        fqn = module_name(name)
        owner = model.get_submodule(split_owner(name)[0]) if "." in name else model
        if filter_fn is not None and not filter_fn(owner, fqn):
            continue
        w = matrix_view(params[name].detach(), is_transposed(owner))
        weighting = stats.weighting(name, w.shape[1]) if stats is not None else None
        method = choose_method(*w.shape, settings)
        with fixed_threads():
            if name in splits:
                rank = split_rank(rank, w.shape[1], splits[name])
                A, B, _, _ = factorize_split(w, splits[name], rank, method,
                                             layer_seed(settings.seed, name),
                                             settings.oversample, settings.niter, weighting)
            else:
                A, B, _, _ = factorize_matrix(w, rank, method, layer_seed(settings.seed, name),
                                              settings.oversample, settings.niter, weighting)
        factors[fqn], module_ranks[fqn] = (A.to(w.dtype), B.to(w.dtype)), rank
    return swap_lowrank_(model, module_ranks, factors,
                         {module_name(n): s for n, s in splits.items() if n in ranks})


# --------------------------------------------------------------------------------------------
# The pipeline stage


def _run(ctx: Context, settings: FactorizeSettings, plan: RankPlan,
         calibrate=None) -> LowRankCheckpoint:
    if settings.sequential and ctx.models.factory is not None:
        raise InputError("sequential statistics run HF models only, not a model factory's")
    if ctx.models.factory is not None:  # compensation (a default) runs HF models only
        settings = replace(settings, compensate=False)
    scratch = ctx.scratch("factorize")
    model = _tie_model(ctx)
    with ctx.track("factorize", len(plan.factored())) as advance:
        result = factorize(ctx.checkpoint, plan, settings, advance, stats=calibrate,
                           ties=find_ties(ctx.checkpoint, model),
                           out_dir=Path(scratch.name) if scratch else None,
                           workers=ctx.workers, executor=ctx.executor, device=ctx.device,
                           transposed=transposed_weights(model) if model is not None else set(),
                           splits=(fused_splits(model) if model is not None
                                   and settings.split_fused else None))
    if scratch:
        result.tensors.owner = scratch
    return result


def _tie_model(ctx: Context) -> nn.Module | None:
    """The architecture (meta device), for the ties it declares (tie_word_embeddings) and its
    transposed weights (Conv1D); None when it cannot be built: ties by shared storage are
    still found, and loading restores the model's own."""
    if not ctx.models.runnable:
        return None
    try:
        return ctx.models.architecture(meta=ctx.models.factory is None)
    except (ValueError, KeyError, OSError, ImportError):
        return None
    except LowrankError:
        if ctx.models.factory is not None:
            raise
        return None


register_stage(Stage(
    "factorize", ("plan",), FactorizeSettings, _run,
    save=save_lowrank, load=load_lowrank,
    emit=lambda artifact, out, ctx: save_lowrank(artifact, out, ctx.max_shard_bytes),
    uses=("calibrate",), provides="checkpoint", on_device=True,
    # compensation's block passes (with calibration) run on CPU whatever the device
    resolved=lambda settings, device, used: dict(
        zip(("compensate_damping", "compensate_residual_share", "compensate_lines"),
            settings.compensation(used["calibrate"])),
        compensate_dtype=dtype_name(pass_dtype(settings.compensate_dtype)))
    if "calibrate" in used and settings.compensate and not settings.sequential else {},
))
