"""Pipeline runner: named stages, a content-addressed cache, and ``manifest.json``.

A pipeline file (TOML) lists ``stages`` in order and one table of settings per stage; see
``pipelines/default.toml``. Each stage turns upstream artifacts into one artifact. Its cache key
hashes the lowrank version, the stage's settings (with the *content* of any ``*_file`` setting),
the checkpoint's content and the keys of the stages it reads, so a rerun skips finished stages
and a changed setting reruns from that stage on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .calibrate import (ActivationStats, CalibrateSettings, calibrate, is_tensor_file,
                        model_batches, read_calibration, runnable_model)
from .checkpoint import (SAFETENSORS_INDEX, Checkpoint, atomic_directory, check_output_path,
                         copy_model_files, open_checkpoint, save_tensors, write_json)
from .errors import GateFailed, InputError
from .evaluate import (EvaluateSettings, embed, embed_onnx, evaluate_model, evaluate_tensors,
                       evaluation_tensors, evaluation_texts, fidelity)
from .bench import BenchSettings, bench
from .export import ExportSettings, export_onnx
from .gate import GateSettings, Goal, check, raise_if_failed
from .factorize import FactorizeSettings, LayerResult, LowRankCheckpoint, factorize, find_ties
from .latency import LatencyTable, machine_key
from .loading import build_hf_model, dense_model, instantiate
from .quantize import Int8Settings, quantize_int8
from .report import build_report, write_report
from .plan import POLICIES, LayerPlan, PlanSettings, RankPlan, apply_plan, make_plan, read_plan_file
from .recover import (RecoverSettings, adapter_config, adapter_state, distill, merge_adapters_,
                      save_adapters)
from .sensitivity import SensitivitySettings, layer_weights, probe
from .shards import LazyTensors, write_tensors
from .parallel import check_executor
from .spectrum import AnalyzeSettings, Spectra, analyze, matrix_infos

# The built-in default; pipelines/default.toml in the repository documents the same pipeline
# (a test keeps the two equal).
DEFAULT_STAGES = ["analyze", "plan", "factorize"]
DEFAULT_SETTINGS = {
    "analyze": {"exact_max_dim": 2048},
    "plan": {"param_ratio": 0.6, "guard": 0.8, "multiple": 1},
    "factorize": {"method": "auto", "seed": 0},
}


# --------------------------------------------------------------------------------------------
# Progress: stages report work through the context; the CLI plugs a rich progress bar in.

Advance = Callable[[str], None]


def _no_progress(description: str, total: int) -> contextlib.AbstractContextManager[Advance]:
    return contextlib.nullcontext(lambda name: None)


@dataclass
class Context:
    checkpoint: Checkpoint
    track: Callable[[str, int], contextlib.AbstractContextManager[Advance]] = _no_progress
    cache_dir: Path | None = None
    # --model-factory: the architecture of a non-HF checkpoint (lowrank.loading.ModelFactory)
    model_factory: Any = None
    workers: int = 1  # per-matrix work (analyze, factorize) in parallel: lowrank.parallel
    executor: str = "process"
    # Where factorize streams its output (bounded memory); None keeps it in memory.
    work_dir: Path | None = None
    scratch_dirs: list = field(default_factory=list)

    def scratch(self, stage: str) -> tempfile.TemporaryDirectory | None:
        """A temporary directory under ``work_dir`` (None without one); it is removed when the
        artifact holding it is dropped, or by :meth:`release` after a failure."""
        if self.work_dir is None:
            return None
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.TemporaryDirectory(prefix=f".lowrank-{stage}-", dir=self.work_dir)
        self.scratch_dirs.append(tmp)
        return tmp

    def release(self) -> None:
        for tmp in self.scratch_dirs:
            tmp.cleanup()


def _architecture(ctx: Context):
    """A fresh dense model to swap factors into: the model factory's, else the HF directory's."""
    from .loading import architecture

    return architecture(ctx.checkpoint, ctx.model_factory)


def _tensor_inputs(*sources: str | None) -> dict | None:
    """Example inputs from the first tensor file among ``sources`` (None: none is one)."""
    from .calibrate import read_calibration_tensors

    path = next((s for s in sources if is_tensor_file(s)), None)
    return read_calibration_tensors(path, 8, warn=False) if path else None


# --------------------------------------------------------------------------------------------
# Stage registry


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]  # stages that must run before; their artifacts are passed in order
    settings_type: type
    run: Callable[..., Any]  # (ctx, settings, *needed artifacts, **used artifacts) -> artifact
    save: Callable[[Any, Path], None]  # artifact -> cache directory
    load: Callable[[Path], Any]  # cache directory -> artifact
    emit: Callable[[Any, Path], None] = lambda artifact, out: None  # into OUTPUT
    uses: tuple[str, ...] = ()  # optional stages: passed as keywords when in the pipeline
    # Extra cache-key input for results that depend on the machine (latency measurements).
    machine: Callable[[Any], str | None] = lambda settings: None


STAGES: dict[str, Stage] = {}


def register_stage(stage: Stage) -> Stage:
    STAGES[stage.name] = stage
    return stage


def _save_json(name: str, to_json: Callable[[Any], dict]):
    return lambda artifact, d: write_json(d / name, to_json(artifact))


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text())


# calibrate ----------------------------------------------------------------------------------
def _run_calibrate(ctx: Context, settings: CalibrateSettings) -> ActivationStats:
    batches = -(-settings.samples // settings.batch_size)
    with ctx.track("calibrate", batches) as advance:
        return calibrate(ctx.checkpoint, settings, advance, ctx.model_factory)


def _save_stats(stats: ActivationStats, d: Path) -> None:
    save_tensors(d / "stats.safetensors", stats.to_tensors(), {})
    write_json(d / "stats.json", {"tokens": stats.tokens, "samples": stats.samples,
                                  "settings": asdict(stats.settings)})


def _load_stats(d: Path) -> ActivationStats:
    from safetensors.torch import load_file

    meta = _load_json(d / "stats.json")
    return ActivationStats.from_tensors(load_file(str(d / "stats.safetensors")), meta["tokens"],
                                        meta["samples"], CalibrateSettings(**meta["settings"]))


register_stage(Stage("calibrate", (), CalibrateSettings, _run_calibrate, _save_stats, _load_stats))


# analyze ------------------------------------------------------------------------------------
def _run_analyze(ctx: Context, settings: AnalyzeSettings, calibrate=None) -> Spectra:
    with ctx.track("analyze", len(matrix_infos(ctx.checkpoint))) as advance:
        return analyze(ctx.checkpoint, settings, advance, stats=calibrate,
                       workers=ctx.workers, executor=ctx.executor)


register_stage(Stage(
    "analyze", (), AnalyzeSettings, _run_analyze,
    save=_save_json("spectra.json", Spectra.to_json),
    load=lambda d: Spectra.from_json(_load_json(d / "spectra.json")),
    uses=("calibrate",),
))


# sensitivity --------------------------------------------------------------------------------
def _run_sensitivity(ctx: Context, settings: SensitivitySettings, spectra: Spectra,
                     calibrate=None) -> dict:
    if ctx.model_factory is not None:
        raise InputError("--sensitivity runs HF models only; drop it with --model-factory")
    total = sum(1 for s in spectra.matrices.values() if s.rows * s.cols >= settings.min_numel)
    with ctx.track("sensitivity", total) as advance:
        return probe(ctx.checkpoint, spectra, settings, calibrate, advance)


register_stage(Stage(
    "sensitivity", ("analyze",), SensitivitySettings, _run_sensitivity,
    save=_save_json("sensitivity.json", lambda a: a),
    load=lambda d: _load_json(d / "sensitivity.json"),
    emit=_save_json("sensitivity.json", lambda a: a),
    uses=("calibrate",),
))


# plan ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanStageSettings(PlanSettings):
    plan_file: str | None = None  # re-apply this (edited) plan instead of a policy

    def __post_init__(self):
        if self.plan_file is None:
            super().__post_init__()
        elif any(getattr(self, p) is not None for p in POLICIES):
            raise InputError("a plan file and a rank policy exclude each other; give one")


def _run_plan(ctx: Context, settings: PlanStageSettings, spectra: Spectra,
              sensitivity=None) -> RankPlan:
    if settings.plan_file:
        return apply_plan(read_plan_file(Path(settings.plan_file)), spectra, settings.plan_file)
    policy = {f.name: getattr(settings, f.name) for f in fields(PlanSettings)}
    weights = layer_weights(sensitivity, spectra) if sensitivity else None
    latency, matmuls = None, None
    if settings.latency_tokens or settings.latency_ratio is not None:
        latency = LatencyTable.for_machine(ctx.cache_dir, settings.latency_threads)
        matmuls = linear_weight_names(ctx.checkpoint)
    plan = make_plan(spectra, PlanSettings(**policy), weights, latency, matmuls)
    if latency is not None:
        latency.save()
    if weights:
        plan.policy["sensitivity_weights"] = {n: round(w, 4) for n, w in weights.items()}
    return plan


def _plan_from_json(data: dict) -> RankPlan:
    layers = {n: LayerPlan(e["shape"], e["rank"], e.get("reason"), e.get("energy"))
              for n, e in data["layers"].items()}
    return RankPlan(layers, data["params"]["before"], data["policy"], data["version"])


register_stage(Stage(
    "plan", ("analyze",), PlanStageSettings, _run_plan,
    save=_save_json("plan.json", RankPlan.to_json),
    load=lambda d: _plan_from_json(_load_json(d / "plan.json")),
    emit=_save_json("plan.json", RankPlan.to_json),
    uses=("sensitivity",),
    machine=lambda settings: (machine_key(settings.latency_threads)
                              if settings.latency_tokens or settings.latency_ratio else None),
))


def linear_weight_names(ckpt: Checkpoint) -> set[str] | None:
    """Weights of nn.Linear modules (from the architecture, built on the meta device), or None
    when the checkpoint has none (raw state dicts)."""
    if ckpt.model_dir is None:
        return None
    import torch

    with torch.device("meta"):
        model = build_hf_model(ckpt.model_dir)
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


# factorize ----------------------------------------------------------------------------------
def _run_factorize(ctx: Context, settings: FactorizeSettings, plan: RankPlan,
                   calibrate=None) -> LowRankCheckpoint:
    if settings.sequential and ctx.model_factory is not None:
        raise InputError("--sequential runs HF models only; drop it with --model-factory")
    scratch = ctx.scratch("factorize")
    with ctx.track("factorize", len(plan.factored())) as advance:
        result = factorize(ctx.checkpoint, plan, settings, advance, stats=calibrate,
                           ties=find_ties(ctx.checkpoint, _tie_model(ctx)),
                           out_dir=Path(scratch.name) if scratch else None,
                           workers=ctx.workers, executor=ctx.executor)
    if scratch:
        result.tensors.owner = scratch
    return result


def _tie_model(ctx: Context):
    """The architecture, for the ties it declares (tie_word_embeddings); None when it cannot
    be built: ties by shared storage are still found, and loading restores the model's own."""
    import torch

    from .errors import LowrankError

    if ctx.model_factory is not None:
        return _architecture(ctx)
    if ctx.checkpoint.model_dir is None:
        return None
    try:
        with torch.device("meta"):
            return build_hf_model(ctx.checkpoint.model_dir)
    except (LowrankError, ValueError, KeyError, OSError, ImportError):
        return None


def _save_lowrank(artifact: LowRankCheckpoint, d: Path) -> None:
    from . import __version__

    for old in [*d.glob("model*.safetensors"), d / SAFETENSORS_INDEX]:  # an earlier stage's
        old.unlink(missing_ok=True)
    if isinstance(artifact.tensors, LazyTensors):  # already on disk: stream the files over
        index = artifact.tensors.files[0].parent / SAFETENSORS_INDEX
        for file in [*artifact.tensors.files, *([index] if index.is_file() else [])]:
            shutil.copyfile(file, d / file.name)
    else:
        write_tensors(d, artifact.tensors, {"lowrank_version": __version__})
    write_json(d / "lowrank_config.json", artifact.lowrank_config())
    if artifact.adapter_config is not None:
        save_adapters(artifact.adapters, artifact.adapter_config, d / "adapters")


def _load_lowrank(d: Path) -> LowRankCheckpoint:
    from safetensors.torch import load_file

    config = _load_json(d / "lowrank_config.json")
    layers = {n: LayerResult(**{k: v for k, v in e.items() if k != "module"})
              for n, e in config["layers"].items()}
    artifact = LowRankCheckpoint(LazyTensors.open(d), layers,
                                 config["params"]["before"], FactorizeSettings(**config["factorize"]),
                                 {k: config[k] for k in ("recovery",) if k in config})
    if (d / "adapters").is_dir():
        artifact.adapters = load_file(str(d / "adapters" / "adapter_model.safetensors"))
        artifact.adapter_config = _load_json(d / "adapters" / "adapter_config.json")
    return artifact


register_stage(Stage(
    "factorize", ("plan",), FactorizeSettings, _run_factorize,
    save=_save_lowrank, load=_load_lowrank,
    emit=_save_lowrank,
    uses=("calibrate",),
))


# recover ------------------------------------------------------------------------------------
def _run_recover(ctx: Context, settings: RecoverSettings,
                 factorize: LowRankCheckpoint) -> LowRankCheckpoint:
    data = read_calibration(settings.calibration_file, settings.samples)
    teacher, tokenizer = runnable_model(ctx.checkpoint, need_tokenizer=isinstance(data, list),
                                        factory=ctx.model_factory)
    student = instantiate(dict(factorize.tensors), factorize.layers, _architecture(ctx))
    with ctx.track("recover", settings.steps) as advance:
        log = distill(student, teacher, tokenizer, data, settings, advance)
    adapters = adapter_state(student)
    config = adapter_config(student, settings, str(ctx.checkpoint.path)) if adapters else None
    state = merge_adapters_(student).state_dict()
    tensors = {k: state[k].detach().to(t.dtype).contiguous() if k in state else t
               for k, t in factorize.tensors.items()}
    return LowRankCheckpoint(tensors, factorize.layers, factorize.params_before,
                             factorize.settings, {"recovery": log.to_json()}, adapters, config)


register_stage(Stage(
    "recover", ("factorize",), RecoverSettings, _run_recover,
    save=_save_lowrank, load=_load_lowrank, emit=_save_lowrank,
))


# evaluate -----------------------------------------------------------------------------------
def _run_evaluate(ctx: Context, settings: EvaluateSettings, factorize: LowRankCheckpoint,
                  calibrate=None, recover=None, int8=None) -> dict:
    final = recover or factorize
    if is_tensor_file(settings.eval_file):
        return _evaluate_tensors(ctx, settings, final, calibrate, recover)
    dense, tokenizer = runnable_model(ctx.checkpoint, factory=ctx.model_factory)
    compressed = instantiate(dict(final.tensors), final.layers, _architecture(ctx))
    seen: set[str] = set()  # never evaluate on text the model was calibrated or trained on
    if calibrate is not None:
        data = read_calibration(calibrate.settings.calibration_file, calibrate.settings.samples,
                                warn=False)
        seen.update(data if isinstance(data, list) else [])
    if recover is not None:
        rs = RecoverSettings(**final.metadata["recovery"]["settings"])
        data = read_calibration(rs.calibration_file, rs.samples, warn=False)
        seen.update(data if isinstance(data, list) else [])
    texts, dropped = evaluation_texts(settings, seen)
    with ctx.track("evaluate", 2 if int8 else 1) as advance:
        scores = evaluate_model(dense, compressed, tokenizer, texts, settings)
        advance("pytorch")
        if int8 is not None and scores["kind"] == "encoder":
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                path.write_bytes(int8.files["model.onnx"])
                reference = embed(dense, tokenizer, texts, settings.batch_size, settings.max_length)
                quantized = embed_onnx(path, tokenizer, texts, settings.batch_size,
                                       settings.max_length)
                scores["int8"] = fidelity(reference, quantized, settings.k)
            advance("int8")
    return {**scores, "eval_file": settings.eval_file or "<bundled evaluation text>",
            "dropped_overlapping_lines": dropped}


def _evaluate_tensors(ctx: Context, settings: EvaluateSettings, final: LowRankCheckpoint,
                      calibrate=None, recover=None) -> dict:
    """Tensor inputs (with optional labels): outputs and accuracy, dense vs compressed; samples
    also used for calibration or recovery are dropped."""
    sources = [calibrate.settings.calibration_file if calibrate is not None else None]
    if recover is not None:
        sources.append(final.metadata["recovery"]["settings"]["calibration_file"])
    seen = [read_calibration(s, 10**9, warn=False) for s in sources if is_tensor_file(s)]
    data, dropped = evaluation_tensors(settings, seen)
    dense, _ = runnable_model(ctx.checkpoint, need_tokenizer=False, factory=ctx.model_factory)
    compressed = instantiate(dict(final.tensors), final.layers, _architecture(ctx))
    with ctx.track("evaluate", 1) as advance:
        scores = evaluate_tensors(dense, compressed, data, settings.batch_size)
        advance("pytorch")
    return {**scores, "eval_file": settings.eval_file, "dropped_overlapping_samples": dropped}


register_stage(Stage(
    "evaluate", ("factorize",), EvaluateSettings, _run_evaluate,
    save=_save_json("evaluation.json", lambda a: a),
    load=lambda d: _load_json(d / "evaluation.json"),
    uses=("calibrate", "recover", "int8"),
))


# export -------------------------------------------------------------------------------------
@dataclass
class ExportArtifact:
    files: dict[str, bytes]  # model.onnx (+ model.onnx_data for models over 2 GB)
    result: dict  # ExportResult.to_json() without the path


def _run_export(ctx: Context, settings: ExportSettings, factorize: LowRankCheckpoint,
                recover=None) -> ExportArtifact:
    final = recover or factorize
    if ctx.checkpoint.model_dir is None and ctx.model_factory is None:
        raise InputError(f"{ctx.checkpoint.path}: ONNX export needs an architecture: give an HF "
                         f"model directory (config.json) or --model-factory")
    example = _tensor_inputs(settings.inputs_file)  # tensor inputs: a model without token ids
    if example is None and ctx.checkpoint.model_dir is None:
        raise InputError("ONNX export of a --model-factory model needs example inputs: a "
                         "tensor --calibration file or [export] inputs_file")
    model = instantiate(dict(final.tensors), final.layers, _architecture(ctx))
    with tempfile.TemporaryDirectory(prefix="lowrank-onnx-") as tmp, \
            ctx.track("export", 1) as advance:
        result = export_onnx(model, Path(tmp) / "model.onnx", settings, example)
        advance("validated")
        files = {f.name: f.read_bytes() for f in Path(tmp).iterdir()}
    return ExportArtifact(files, {k: v for k, v in result.to_json().items() if k != "path"})


def _save_export(artifact: ExportArtifact, d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, data in artifact.files.items():
        (d / name).write_bytes(data)
    write_json(d / "export.json", artifact.result)


def _load_export(d: Path) -> ExportArtifact:
    return ExportArtifact({f.name: f.read_bytes() for f in d.iterdir() if f.name != "export.json"},
                          _load_json(d / "export.json"))


register_stage(Stage(
    "export", ("factorize",), ExportSettings, _run_export,
    save=_save_export,
    load=_load_export,
    emit=lambda artifact, out: _save_export(artifact, out / "onnx"),
    uses=("recover",),
))


# int8 ---------------------------------------------------------------------------------------
def _int8_feeds(ctx: Context, settings: Int8Settings, calibrate) -> list[dict] | None:
    """Static int8: the calibration text (the calibrate stage's, or the bundled) as numpy feeds."""
    if settings.format != "static":
        return None
    source = calibrate.settings.calibration_file if calibrate is not None else None
    data = read_calibration(source, settings.samples, warn=False)
    _, tokenizer = runnable_model(ctx.checkpoint, need_tokenizer=isinstance(data, list))
    return [{k: v.numpy() for k, v in inputs.items()}
            for inputs, _ in model_batches(data, tokenizer, 8, 128)]


def _run_int8(ctx: Context, settings: Int8Settings, export: ExportArtifact,
              calibrate=None) -> ExportArtifact:
    with tempfile.TemporaryDirectory(prefix="lowrank-int8-") as tmp, \
            ctx.track("int8", 1) as advance:
        source = Path(tmp) / "model.onnx"
        for name, data in export.files.items():
            (Path(tmp) / name).write_bytes(data)
        target = Path(tmp) / "int8.onnx"
        info = quantize_int8(source, target, settings, _int8_feeds(ctx, settings, calibrate))
        advance("quantized")
        return ExportArtifact({"model.onnx": target.read_bytes()}, info)


register_stage(Stage(
    "int8", ("export",), Int8Settings, _run_int8,
    save=_save_export, load=_load_export,
    emit=lambda artifact, out: _save_export(artifact, out / "onnx-int8"),
    uses=("calibrate",),
))


# bench --------------------------------------------------------------------------------------
def _run_bench(ctx: Context, settings: BenchSettings, export: ExportArtifact,
               int8=None) -> dict:
    """Dense vs compressed ONNX (and their int8 versions when the pipeline quantizes)."""
    dense = dense_model(ctx.checkpoint)
    grid = len(settings.batches) * len(settings.sequences)
    with tempfile.TemporaryDirectory(prefix="lowrank-bench-") as tmp:
        tmp = Path(tmp)
        models = {"dense": tmp / "dense.onnx", "compressed": tmp / "compressed.onnx"}
        export_onnx(dense, models["dense"], ExportSettings())
        models["compressed"].write_bytes(export.files["model.onnx"])
        if int8 is not None:
            models["dense-int8"], models["compressed-int8"] = tmp / "dense-int8.onnx", tmp / "c8.onnx"
            same = Int8Settings(**{k: int8.result[k] for k in ("format", "per_channel",
                                                               "reduce_range")})
            quantize_int8(models["dense"], models["dense-int8"], same,
                          _int8_feeds(ctx, same, None))
            models["compressed-int8"].write_bytes(int8.files["model.onnx"])
        sizes = {name: path.stat().st_size for name, path in models.items()}
        with ctx.track("bench", grid) as advance:
            result = bench(models, settings, advance)
    result["models"] = {name: {"bytes": size} for name, size in sizes.items()}
    return result


register_stage(Stage(
    "bench", ("export",), BenchSettings, _run_bench,
    save=_save_json("bench.json", lambda a: a), load=lambda d: _load_json(d / "bench.json"),
    uses=("int8",),
))


# gate ---------------------------------------------------------------------------------------
# Checked by run_pipeline on the finished report; the stage only validates the goals early.
register_stage(Stage(
    "gate", (), GateSettings, lambda ctx, settings: settings.parsed(),
    save=lambda goals, d: write_json(d / "goals.json", [asdict(g) for g in goals]),
    load=lambda d: [Goal(**g) for g in _load_json(d / "goals.json")],
))


# --------------------------------------------------------------------------------------------
# Pipeline files


@dataclass
class PipelineSpec:
    stages: list[str]
    settings: dict[str, dict] = field(default_factory=dict)
    model: str | None = None
    output: str | None = None
    source: str = "<built-in>"
    model_factory: str | None = None  # `model_factory = "package.module:function"` in the file


def read_pipeline(path: str | Path) -> PipelineSpec:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such pipeline file") from e
    # ValueError: bad UTF-8 or TOML, or an integer too long to convert; RecursionError: nesting.
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: not a valid pipeline file ({str(e).splitlines()[0]})") from e
    stages = data.pop("stages", None)
    if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
        raise InputError(f"{path}: needs a non-empty `stages = [...]` list of stage names")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise InputError(f"{path}: unknown stage(s) {', '.join(map(str, unknown))} "
                         f"(known: {', '.join(STAGES)})")
    model, output = data.pop("model", None), data.pop("output", None)
    if not all(v is None or isinstance(v, str) for v in (model, output)):
        raise InputError(f"{path}: model and output must be strings (paths)")
    factory = data.pop("model_factory", None)
    if factory is not None and not isinstance(factory, str):
        raise InputError(f"{path}: model_factory must be a string package.module:function")
    stray = [k for k, v in data.items() if k not in stages]
    if stray:
        raise InputError(f"{path}: settings for stage(s) not in `stages`: {', '.join(stray)}")
    not_tables = [k for k, v in data.items() if not isinstance(v, dict)]
    if not_tables:
        raise InputError(f"{path}: `{not_tables[0]}` must be a table of settings ([{not_tables[0]}])")
    return PipelineSpec(stages, data, model, output, str(path), factory)


def default_pipeline() -> PipelineSpec:
    import copy

    return PipelineSpec(list(DEFAULT_STAGES), copy.deepcopy(DEFAULT_SETTINGS), source="default")


def make_settings(spec: PipelineSpec, stage: Stage):
    raw = dict(spec.settings.get(stage.name, {}))
    known = {f.name for f in fields(stage.settings_type)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InputError(f"{spec.source}: [{stage.name}] has unknown setting(s) "
                         f"{', '.join(unknown)} (known: {', '.join(sorted(known))})")
    for k, v in raw.items():
        if isinstance(v, list):
            raw[k] = tuple(v)
    try:
        return stage.settings_type(**raw)
    except TypeError as e:
        raise InputError(f"{spec.source}: [{stage.name}]: {e}") from e


# --------------------------------------------------------------------------------------------
# Hashing and cache


def file_sha256(path: Path, memo: dict | None = None) -> str:
    """sha256 of a file, memoized by (path, size, mtime, inode) so big checkpoints hash once."""
    st = path.stat()
    memo_key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    if memo is not None and memo_key in memo:
        return memo[memo_key]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if memo is not None:
        memo[memo_key] = digest
    return digest


def _setting_file_sha256(stage: str, key: str, value: str) -> str:
    """sha256 of a file a stage setting names (--plan, --calibration...): a bad input if unreadable."""
    try:
        return file_sha256(Path(value))
    except OSError as e:
        raise InputError(f"{value}: cannot read the {stage} stage's {key} "
                         f"({e.strerror or type(e).__name__})") from e


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def default_cache_dir() -> Path:
    if "LOWRANK_CACHE_DIR" in os.environ:
        return Path(os.environ["LOWRANK_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowrank"


class Cache:
    """Artifacts under ``root/<stage>/<key>/``; a directory appears only once complete."""

    def __init__(self, root: Path | None):
        self.root = root
        self.memo_file = root / "file-hashes.json" if root else None
        self.memo = {}
        if self.memo_file and self.memo_file.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                self.memo = json.loads(self.memo_file.read_text())

    def get(self, stage: Stage, key: str):
        if self.root is None:
            return None
        d = self.root / stage.name / key
        if not d.is_dir():
            return None
        try:
            return stage.load(d)
        except Exception:  # a corrupt cache entry is recomputed, never trusted
            shutil.rmtree(d, ignore_errors=True)
            return None

    def put(self, stage: Stage, key: str, artifact) -> None:
        if self.root is None:
            return
        with atomic_directory(self.root / stage.name / key) as tmp:
            stage.save(artifact, tmp)

    def save_memo(self) -> None:
        if self.memo_file:
            self.memo_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.memo_file.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(self.memo))
            tmp.replace(self.memo_file)


# --------------------------------------------------------------------------------------------
# Running


@dataclass
class RunResult:
    output: Path
    checkpoint: Checkpoint
    artifacts: dict[str, Any]
    manifest: dict
    report: dict  # report.json


def release(artifacts: dict[str, Any]) -> None:
    """Remove the temporary files behind streamed artifacts now (they would go with the
    artifacts otherwise); the artifacts' tensors are unreadable afterwards."""
    for artifact in artifacts.values():
        owner = getattr(getattr(artifact, "tensors", None), "owner", None)
        if owner is not None:
            owner.cleanup()


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    found = {"lowrank": __version__, "python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "safetensors", "transformers", "onnx", "onnxruntime", "numpy"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


def execute(
    spec: PipelineSpec,
    model: str | Path,
    *,
    cache_dir: Path | None = None,
    track: Callable[[str, int], contextlib.AbstractContextManager[Advance]] = _no_progress,
    model_factory=None,
    workers: int = 1,
    executor: str = "process",
    work_dir: Path | None = None,
) -> tuple[Checkpoint, dict[str, Any], dict]:
    """Run ``spec``'s stages on checkpoint ``model`` without writing an output directory.

    ``model_factory`` (or the pipeline file's ``model_factory``): ``package.module:function``
    or a zero-argument callable returning the dense ``nn.Module`` of a non-HF checkpoint.
    ``workers``/``executor``: per-matrix work in parallel (:mod:`lowrank.parallel`).
    ``work_dir``: factorize streams its output into a temporary directory there instead of
    holding it in memory; the directory goes when the artifact does.

    Returns:
        ``(checkpoint, artifacts by stage name, manifest)``.
    """
    ckpt = open_checkpoint(model)
    model_factory = model_factory or spec.model_factory
    check_executor(executor, workers)
    settings = {name: make_settings(spec, STAGES[name]) for name in spec.stages}
    for i, name in enumerate(spec.stages):
        before = spec.stages[:i]
        missing = [n for n in STAGES[name].needs if n not in before]
        late = [n for n in STAGES[name].uses if n in spec.stages[i:]]
        if missing or late:
            raise InputError(f"{spec.source}: stage {name} needs {', '.join(missing + late)} "
                             f"before it")

    cache = Cache(cache_dir)
    inputs = [{"file": str(f), "bytes": f.stat().st_size, "sha256": file_sha256(f, cache.memo)}
              for f in ckpt.files]
    model_digest = _digest([i["sha256"] for i in inputs])
    factory_info = factory_digest(model_factory) if model_factory is not None else None
    if factory_info is not None:  # the architecture is an input too: its name and source
        model_digest = _digest([model_digest, factory_info])
    ctx = Context(ckpt, track, cache_dir, model_factory, workers, executor, work_dir)
    artifacts, keys, stage_records = {}, {}, []

    try:
        _run_stages(spec, ctx, settings, cache, model_digest, artifacts, keys, stage_records)
    except BaseException:
        ctx.release()  # no temporary directories left behind by a failed run
        raise
    cache.save_memo()
    manifest = {"format": "lowrank.manifest", "version": 1, "versions": _versions(),
                "pipeline": spec.source, "input": {"path": str(ckpt.path), "files": inputs},
                "stages": stage_records}
    if factory_info is not None:
        manifest["input"]["model_factory"] = factory_info
    return ckpt, artifacts, manifest


def _run_stages(spec: PipelineSpec, ctx: Context, settings: dict, cache: Cache,
                model_digest: str, artifacts: dict, keys: dict, stage_records: list) -> None:
    from . import __version__

    for name in spec.stages:
        stage, stage_settings = STAGES[name], settings[name]
        used = [n for n in stage.uses if n in artifacts]
        file_digests = {k: _setting_file_sha256(name, k, v)
                        for k, v in asdict(stage_settings).items() if k.endswith("_file") and v}
        keys[name] = _digest({"stage": name, "lowrank": __version__, "model": model_digest,
                              "settings": asdict(stage_settings), "files": file_digests,
                              "machine": stage.machine(stage_settings),
                              "upstream": [keys[n] for n in (*stage.needs, *used)]})
        start = time.perf_counter()
        artifact = cache.get(stage, keys[name])
        cached = artifact is not None
        if not cached:
            artifact = stage.run(ctx, stage_settings, *[artifacts[n] for n in stage.needs],
                                 **{n: artifacts[n] for n in used})
            cache.put(stage, keys[name], artifact)
        artifacts[name] = artifact
        stage_records.append({"stage": name, "key": keys[name], "cached": cached,
                              "seconds": round(time.perf_counter() - start, 3),
                              "settings": asdict(stage_settings)})


def factory_digest(factory) -> dict:
    """The model factory's name and the sha256 of its source file (resolving it checks the
    ``package.module:function`` value before any stage runs)."""
    import inspect

    from .loading import factory_name, resolve_factory

    fn = resolve_factory(factory) if isinstance(factory, str) else factory
    try:
        source = inspect.getsourcefile(fn)
    except TypeError:  # a builtin or C callable: no source file
        source = None
    return {"model_factory": factory_name(factory),
            "sha256": file_sha256(Path(source)) if source and Path(source).is_file() else None}


def run_pipeline(
    spec: PipelineSpec,
    model: str | Path,
    output: str | Path,
    *,
    cache_dir: Path | None = None,
    overwrite: bool = False,
    track: Callable[[str, int], contextlib.AbstractContextManager[Advance]] = _no_progress,
    model_factory=None,
    workers: int = 1,
    executor: str = "process",
) -> RunResult:
    """Run ``spec``'s stages on checkpoint ``model`` and write the output directory atomically.

    Args:
        spec: stages and settings (:func:`read_pipeline` or :func:`default_pipeline`).
        model: checkpoint path (see :func:`lowrank.checkpoint.open_checkpoint`).
        output: output directory; must not be, contain or lie inside the input.
        cache_dir: where stage artifacts are cached; None disables caching.
        overwrite: replace an existing non-empty output directory.
        track: progress factory ``(description, total) -> context manager of advance(name)``.
        model_factory: the architecture of a non-HF checkpoint, ``package.module:function`` or
            a zero-argument callable returning the dense ``nn.Module`` (see :func:`execute`).
        workers: processes (or Ray tasks) for the per-matrix work; the output is the same.
        executor: ``"process"`` (local) or ``"ray"`` (a Ray cluster; ``RAY_ADDRESS``).

    Memory: the factorized checkpoint is streamed to a work directory beside OUTPUT, so peak
    memory stays near a few times the largest tensor whatever the model size.

    Returns:
        :class:`RunResult` with each stage's artifact, the manifest and the report written to
        OUTPUT.
    """
    output = Path(output)
    probe = open_checkpoint(model)  # refuse a bad OUTPUT before any work
    check_output_path(output, [probe.path, *probe.files], overwrite)
    # Scratch space beside OUTPUT: the same disk, and room for a checkpoint of that size.
    ckpt, artifacts, manifest = execute(spec, model, cache_dir=cache_dir, track=track,
                                        model_factory=model_factory, workers=workers,
                                        executor=executor, work_dir=output.resolve().parent)
    try:
        with atomic_directory(output) as tmp:
            copy_model_files(ckpt.model_dir, tmp)
            for name in spec.stages:
                STAGES[name].emit(artifacts[name], tmp)
            write_json(tmp / "manifest.json", manifest)
            report = build_report(ckpt, artifacts, manifest, tmp, output)
            if "gate" in artifacts:
                report["gate"] = check(report, artifacts["gate"],
                                       settings_of(spec, "gate").allow_missing)
            write_report(report, artifacts, tmp)
    except BaseException:
        release(artifacts)
        raise
    result = RunResult(output, ckpt, artifacts, manifest, report)
    # OUTPUT is written either way: its report says why a gate failed.
    try:
        raise_if_failed(report.get("gate", []), f"; see {output}/report.md", attach=True)
    except GateFailed:
        release(artifacts)
        raise
    return result


def settings_of(spec: PipelineSpec, name: str):
    return make_settings(spec, STAGES[name])
