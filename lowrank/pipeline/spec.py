"""Pipeline specs: pipeline files (TOML), the built-in default pipeline, and the pipeline
``lowrank compress`` builds from its options."""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from .. import stages as _stages  # noqa: F401  (registers every stage)
from ..errors import InputError, OptionError, first_line
from ..io.safetensors import DEFAULT_MAX_SHARD_BYTES
from .stage import STAGES, Stage

# The built-in default; pipelines/default.toml in the repository documents the same pipeline
# (a test keeps the two equal).
DEFAULT_STAGES = ["analyze", "plan", "factorize"]
DEFAULT_SETTINGS = {
    "analyze": {"method": "auto", "exact_max_dim": 8192},
    "plan": {"param_ratio": 0.6, "guard": 0.8, "multiple": 1},
    "factorize": {"method": "auto", "seed": 0},
}


@dataclass
class PipelineSpec:
    stages: list[str]
    settings: dict[str, dict] = field(default_factory=dict)
    model: str | None = None
    output: str | None = None
    source: str = "<built-in>"
    model_factory: str | None = None  # `model_factory = "package.module:function"` in the file
    # Largest checkpoint file written into OUTPUT ("5GB", "500MB" or bytes), as transformers'
    # save_pretrained(max_shard_size=...): bigger outputs become shards plus an index.
    max_shard_size: str | int | None = None
    device: str | None = None  # `device = "cuda"` in the file; None: an accelerator if any


def read_pipeline(path: str | Path) -> PipelineSpec:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such pipeline file") from e
    # ValueError: bad UTF-8 or TOML, or an integer too long to convert; RecursionError: nesting.
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: not a valid pipeline file ({first_line(e)})") from e
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
    shard = data.pop("max_shard_size", None)
    if shard is not None:
        max_shard_bytes(shard, path)  # refuse a bad size before any work
    device = data.pop("device", None)
    if device is not None and not isinstance(device, str):
        raise InputError(f"{path}: device must be a string (auto, cpu, cuda, mps)")
    stray = [k for k, v in data.items() if k not in stages]
    if stray:
        raise InputError(f"{path}: settings for stage(s) not in `stages`: {', '.join(stray)}")
    not_tables = [k for k, v in data.items() if not isinstance(v, dict)]
    if not_tables:
        raise InputError(f"{path}: `{not_tables[0]}` must be a table of settings ([{not_tables[0]}])")
    return PipelineSpec(stages, data, model, output, str(path), factory, shard, device)


def default_pipeline() -> PipelineSpec:
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


def settings_of(spec: PipelineSpec, name: str):
    return make_settings(spec, STAGES[name])


def max_shard_bytes(size: str | int | None, source: object = "max_shard_size") -> int:
    """Bytes of a ``max_shard_size`` ("5GB", "500MB", 10**9); None: transformers' 5 GB."""
    if size is None:
        return DEFAULT_MAX_SHARD_BYTES
    from transformers.utils.hub import convert_file_size_to_int

    try:
        n = convert_file_size_to_int(size)
    except (ValueError, TypeError) as e:
        raise InputError(f"{source}: max_shard_size {size!r} is not a size like \"5GB\" or "
                         f"\"500MB\"") from e
    if not isinstance(n, int) or n < 1:
        raise InputError(f"{source}: max_shard_size must be positive, got {size!r}")
    return n


# --------------------------------------------------------------------------------------------
# `lowrank compress`: the default pipeline with what its flags add


POLICY_FLAGS = ("energy", "rank", "rank_fraction", "param_ratio", "latency_ratio")


def _given(**values) -> dict:
    return {k: v for k, v in values.items() if v not in (None, ())}


def compress_spec(
    *,
    plan: dict | None = None,
    plan_file: str | None = None,
    calibration_file: str | None = None,
    calibration: dict | None = None,
    sensitivity: bool = False,
    sequential: bool = False,
    factorize: dict | None = None,
    recover_method: str | None = None,
    recover: dict | None = None,
    eval_file: str | None = None,
    export: str | None = None,
    optimize: bool = False,
    fusion_check: bool = True,
    int8: dict | None = None,
    bench: bool = False,
    model_factory: str | None = None,
    max_shard_size: str | int | None = None,
) -> PipelineSpec:
    """The pipeline ``lowrank compress`` runs: the default one, with the stages and settings its
    options ask for, in the one order that works.

    Args:
        plan: [plan] settings (a rank policy replaces the default policy); ``plan_file``
            re-applies an edited plan instead.
        calibration_file: data-aware compression on this file; ``""`` for the bundled text;
            ``calibration`` holds [calibrate] settings (samples, max_length, method).
        sensitivity, sequential: the sensitivity probe; sequential statistics (need calibration).
            With calibration and a ``param_ratio`` policy the scores stage runs too: the plan
            allocates by measured loss unless ``plan={"allocation": "energy"}``.
        factorize: [factorize] settings (method, seed, oversample, niter); its seed also
            seeds the scores stage's noise.
        recover_method, recover: the recover stage and its settings (steps, lr, ...).
        eval_file: the evaluate stage on this file; ``""`` for the bundled evaluation text.
        export: ``"onnx"``; ``optimize`` (fusions by onnxruntime's transformer optimizer; with
            ``fusion_check`` the plan keeps attention fusable where that is measured faster),
            ``int8`` (dict of [int8] settings, maybe empty) and ``bench`` need it.
        model_factory: the architecture of a non-HF checkpoint.
        max_shard_size: largest checkpoint file written into OUTPUT.

    Raises:
        OptionError: options that do not go together (exit code 2 on the command line).
    """
    spec = default_pipeline()
    spec.model_factory, spec.max_shard_size = model_factory, max_shard_size
    overrides = _given(**(plan or {}), plan_file=plan_file)
    if any(k in overrides for k in POLICY_FLAGS) or "plan_file" in overrides:
        overrides.update({k: None for k in POLICY_FLAGS if k not in overrides})
    spec.settings["plan"].update(overrides)
    spec.settings["factorize"].update(_given(**(factorize or {})))
    calibration = _given(**(calibration or {}))
    if calibration_file is not None:
        spec.stages.insert(spec.stages.index("analyze"), "calibrate")
        spec.settings["calibrate"] = {**calibration, "calibration_file": calibration_file or None}
    elif calibration:
        raise OptionError("calibration settings", "calibration_file")
    if sensitivity:
        spec.stages.insert(spec.stages.index("analyze") + 1, "sensitivity")
    plan_settings = spec.settings["plan"]
    if (calibration_file is not None and plan_settings.get("param_ratio") is not None
            and plan_settings.get("allocation", "loss") == "loss"
            and not plan_settings.get("plan_file")):
        # With data to measure on, the budget goes by measured end-to-end loss (stages.scores).
        spec.stages.insert(spec.stages.index("plan"), "scores")
        if (factorize or {}).get("seed") is not None:  # one seed for every random draw
            spec.settings.setdefault("scores", {})["seed"] = factorize["seed"]
    if sequential:
        if calibration_file is None:
            raise OptionError("sequential", "calibration_file")
        spec.settings["factorize"]["sequential"] = True
    recover = _given(**(recover or {}))
    if recover_method:
        spec.stages.append("recover")
        # Recovery trains on the calibration text unless told otherwise: the user's own domain.
        trained_on = {"calibration_file": calibration_file} if calibration_file else {}
        spec.settings["recover"] = {"method": recover_method, **trained_on, **recover}
    elif recover:
        raise OptionError("recover settings", "recover_method")
    for option, given in (("optimize", optimize), ("int8", int8 is not None), ("bench", bench)):
        if given and not export:
            raise OptionError(option, "export")
    if export:
        spec.stages.append("export")
        if model_factory and calibration_file:  # its tensors are the example inputs
            spec.settings["export"] = {"inputs_file": calibration_file}
    if optimize:
        spec.stages.append("optimize")
        if fusion_check and not plan_settings.get("plan_file"):  # fusable where faster
            plan_settings.setdefault("attention_fusion", "float32" if int8 is None else "int8")
    if int8 is not None:
        spec.stages.append("int8")
        spec.settings["int8"] = _given(**int8)
    if eval_file is not None:  # after int8: evaluates the int8 model too
        spec.stages.append("evaluate")
        spec.settings["evaluate"] = _given(eval_file=eval_file or None)
    if bench:
        spec.stages.append("bench")
    return spec
