"""Singular-value spectra of weight matrices: energy curve, effective ranks, break-even rank.

A tensor of shape (out, in, *kernel) is viewed as an out × (in·prod(kernel)) matrix, the
matrix a factored conv computes. With ``method="auto"`` the whole spectrum comes from the
float64 Gram matrix's eigenvalues (:func:`lowrank.linalg.gram_svdvals`, accuracy discussed
there) when the smaller side is at most ``exact_max_dim``; above that, the top-k values come
from seeded randomized SVD with k = the break-even rank, because a layer factored beyond
break-even is kept dense anyway. ``method="exact"`` (LAPACK ``svdvals``), ``"gram"`` and
``"randomized"`` force one solver at any size. The total energy ‖W‖_F² is always exact, so
energy fractions stay correct with a partial spectrum.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ..device import on_device
from ..errors import InputError
from ..io.checkpoint import Checkpoint
from ..io.files import check_format
from ..linalg import (
    SVD_METHODS,
    choose_svd_method,
    gram_svdvals,
    layer_seed,
    matrix_view,
    randomized_svd,
    squared_norm,
    weighted,
)
from ..parallel import (
    AUTO,
    fixed_threads,
    in_process,
    open_source,
    ordered_map,
    resolve_workers,
)
from ..pipeline.stage import Context, Stage, json_loader, json_saver, register_stage

SPECTRA_FORMAT, SPECTRA_VERSION = "lowrank.spectra", 1

ENERGY_LEVELS = (0.90, 0.95, 0.99)


@dataclass(frozen=True)
class AnalyzeSettings:
    # "auto": all values (Gram eigensolver) up to exact_max_dim, randomized top-k above;
    # "gram", "exact" (LAPACK svdvals), "randomized": that solver at every size.
    method: str = "auto"
    # Above this smaller-side size, "auto" computes only the top break-even-rank values. Gram
    # eigenvalues (all of them) take less time than randomized top-k up to here: 6.5 vs 29 s at
    # 4096×4096, 69 s at 8192×8192 against ~230 s (reports/spectra-speed*.md).
    exact_max_dim: int = 8192
    # Randomized SVD: extra columns beyond k, and power iterations (accuracy vs time).
    oversample: int = 10
    niter: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.method not in SVD_METHODS:
            raise InputError(f"analyze method must be one of {', '.join(SVD_METHODS)}, "
                             f"got {self.method!r}")


@dataclass
class Spectrum:
    name: str
    shape: tuple[int, ...]
    rows: int
    cols: int
    singular_values: list[float]  # descending; all min(rows, cols) when exact, else the top k
    total_energy: float  # ‖W‖_F², exact
    exact: bool  # the whole spectrum (exact SVD or Gram); False: the top k (randomized)
    finite: bool = True  # False when the tensor holds NaN/Inf (no spectrum computed)

    @property
    def break_even(self) -> float:
        """Factoring at rank r saves parameters only while r < mn / (m + n)."""
        return self.rows * self.cols / (self.rows + self.cols)

    @property
    def stable_rank(self) -> float:
        top = self.singular_values[0] ** 2 if self.singular_values else 0.0
        return self.total_energy / top if top > 0 else 0.0

    def energy_at(self, rank: int) -> float | None:
        """Fraction of ‖W‖_F² kept by the best rank-``rank`` approximation (None: not computed)."""
        if self.total_energy == 0:
            return 1.0
        if rank > len(self.singular_values) and not self.exact:
            return None
        return min(1.0, sum(s * s for s in self.singular_values[:rank]) / self.total_energy)

    def energy_curve(self) -> list[float]:
        """energy_curve()[r-1] = energy_at(r), for each computed rank."""
        total, acc, curve = self.total_energy or 1.0, 0.0, []
        for s in self.singular_values:
            acc += s * s
            curve.append(min(1.0, acc / total))
        return curve

    def rank_for_energy(self, energy: float) -> int | None:
        """Smallest rank keeping ``energy`` of ‖W‖_F², or None when beyond the computed values."""
        if self.total_energy == 0:
            return 1
        for r, kept in enumerate(self.energy_curve(), start=1):
            if kept >= energy - 1e-12:
                return r
        return min(self.rows, self.cols) if self.exact else None

    def params_saved(self, rank: int) -> int:
        return self.rows * self.cols - rank * (self.rows + self.cols)

    def summary(self) -> dict:
        ranks = {f"{e:.2f}": self.rank_for_energy(e) if self.finite else None for e in ENERGY_LEVELS}
        return {
            "name": self.name,
            "shape": list(self.shape),
            "matrix": [self.rows, self.cols],
            "params": self.rows * self.cols,
            "exact": self.exact,
            "finite": self.finite,
            "stable_rank": round(self.stable_rank, 3),
            "break_even_rank": math.floor(self.break_even),
            "rank_at_energy": ranks,
            "params_saved_at_energy": {
                k: (self.params_saved(r) if r is not None else None) for k, r in ranks.items()
            },
        }


@dataclass
class Spectra:
    """The analyze stage's artifact: one :class:`Spectrum` per float matrix of a checkpoint."""

    settings: AnalyzeSettings
    matrices: dict[str, Spectrum] = field(default_factory=dict)
    total_params: int = 0  # every tensor of the checkpoint, 1-D and integer ones included
    format_version: int = SPECTRA_VERSION

    def to_json(self) -> dict:
        return {
            "format": SPECTRA_FORMAT,
            "version": self.format_version,
            "settings": asdict(self.settings),
            "total_params": self.total_params,
            "matrices": [asdict(s) for s in self.matrices.values()],
        }

    @classmethod
    def from_json(cls, data: dict) -> Spectra:
        check_format(data, SPECTRA_FORMAT, SPECTRA_VERSION, "spectra")
        matrices = {}
        for m in data["matrices"]:
            m = dict(m, shape=tuple(m["shape"]))
            matrices[m["name"]] = Spectrum(**m)
        return cls(AnalyzeSettings(**data["settings"]), matrices, data["total_params"],
                   data["version"])


def is_matrix(dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    return dtype.is_floating_point and len(shape) >= 2 and min(shape) > 0


def matrix_infos(ckpt: Checkpoint) -> list:
    """The tensors :func:`analyze` covers (also the length of its progress)."""
    return [i for i in ckpt.infos() if is_matrix(i.dtype, i.shape)]


def analyze_matrix(name: str, tensor: torch.Tensor, settings: AnalyzeSettings,
                   weighting=None, transposed: bool = False, eigh=None) -> Spectrum:
    """Spectrum of one tensor; of its data-aware weighted matrix when ``weighting`` is given
    (see :mod:`lowrank.weighting`), so energies are output energies on calibration data.
    ``transposed``: an (in, out) Conv1D weight, weighted as its (out, in) transpose.
    ``eigh``: see :func:`lowrank.linalg.gram_svdvals`."""
    w = matrix_view(tensor, transposed)
    rows, cols = w.shape
    # Non-finite too: float64 values so large (> ~1e154) that the energy ‖W‖² overflows.
    if not torch.isfinite(w).all() or (
            w.dtype == torch.float64 and not math.isfinite(squared_norm(w))):
        return Spectrum(name, tuple(tensor.shape), rows, cols, [], 0.0, exact=True, finite=False)
    if weighting is not None:
        w = weighted(w.double(), weighting)
    total = squared_norm(w)
    method = choose_svd_method(settings.method, rows, cols, settings.exact_max_dim)
    exact = method != "randomized"
    if method == "gram":
        values = gram_svdvals(w, eigh)
    elif method == "exact":
        values = torch.linalg.svdvals(w)
    else:
        k = max(1, math.floor(rows * cols / (rows + cols)))
        _, values, _ = randomized_svd(w, k, settings.oversample, settings.niter,
                                      layer_seed(settings.seed, name))
    return Spectrum(name, tuple(tensor.shape), rows, cols, values.cpu().tolist(), total,
                    exact)


def analyze_task(source, name: str, settings: AnalyzeSettings, weighting=None,
                 transposed: bool = False, device: str | None = None, eigh=None) -> Spectrum:
    """:func:`analyze_matrix` of one tensor of checkpoint ``source`` (open, or its path in a
    worker process), with a fixed thread count so results don't depend on the parallel layout;
    on ``device`` (its float64 one: :func:`lowrank.device.float64_device`), one matrix at a
    time. ``weighting`` may be a function that computes it (in-process runs: the task's
    thread then computes the whitening root too, so whitening roots are computed in parallel).
    ``eigh``: in-process runs with calibration, the statistics' memoized
    :meth:`~lowrank.stages.calibrate.ActivationStats.gram_eigh`: the eigenvectors that come
    with the spectrum are the ones the scores stage and factorization need next."""
    with fixed_threads():
        weighting = weighting() if callable(weighting) else weighting
        return analyze_matrix(name, on_device(open_source(source).get(name), device), settings,
                              weighting, transposed, eigh)


def analyze(
    ckpt: Checkpoint,
    settings: AnalyzeSettings = AnalyzeSettings(),
    on_matrix: Callable[[str], None] | None = None,
    stats=None,
    workers: int | str = AUTO,
    executor: str = "thread",
    device: str | None = None,
) -> Spectra:
    """Compute the spectrum of every floating-point tensor with two or more dimensions.

    Args:
        ckpt: an open checkpoint (tensors are read one at a time).
        settings: solver, full/randomized cut-over and randomized-SVD parameters.
        on_matrix: called with each tensor name after it is analyzed (progress bars).
        stats: :class:`~lowrank.stages.calibrate.ActivationStats`; when given, layers with calibration
            data get their calibrated (output-energy) spectrum.
        workers, executor: matrices in parallel (see :mod:`lowrank.parallel`; default: one
            thread per core); same result.
        device: where the maths runs, one matrix at a time (:mod:`lowrank.device`; CPU: None).

    Returns:
        :class:`Spectra`, JSON-serializable with :meth:`Spectra.to_json`.
    """
    spectra = Spectra(settings, total_params=ckpt.num_params())
    infos = matrix_infos(ckpt)
    workers = resolve_workers(workers, device)
    local = in_process(executor, workers)
    source = ckpt if local else str(ckpt.path)

    def tasks():
        for info in infos:
            # Only weighted spectra depend on the orientation (singular values do not).
            flip = stats is not None and info.name in stats.transposed
            cols = info.shape[0] if flip else math.prod(info.shape[1:])
            weighting = None if stats is None else \
                functools.partial(stats.weighting, info.name, cols, device)
            eigh = functools.partial(stats.gram_eigh, name=info.name) \
                if local and stats is not None else None
            yield (source, info.name, settings,
                   weighting if local or weighting is None else weighting(), flip, device, eigh)

    for spectrum in ordered_map(analyze_task, tasks(), workers, executor):
        spectra.matrices[spectrum.name] = spectrum
        if on_matrix:
            on_matrix(spectrum.name)
    return spectra


def _run(ctx: Context, settings: AnalyzeSettings, calibrate=None) -> Spectra:
    with ctx.track("analyze", len(matrix_infos(ctx.checkpoint))) as advance:
        return analyze(ctx.checkpoint, settings, advance, stats=calibrate,
                       workers=ctx.workers, executor=ctx.executor, device=ctx.device)


register_stage(Stage(
    "analyze", (), AnalyzeSettings, _run,
    save=json_saver("spectra.json", Spectra.to_json),
    load=json_loader("spectra.json", Spectra.from_json),
    uses=("calibrate",), on_device=True,
))
