"""lowrank: turn dense neural-network checkpoints into low-rank ones.

    import lowrank
    ckpt = lowrank.open_checkpoint("all-MiniLM-L6-v2/")
    spectra = lowrank.analyze(ckpt)
    plan = lowrank.make_plan(spectra, lowrank.PlanSettings(param_ratio=0.6))
    factored = lowrank.factorize(ckpt, plan)
    # or on a model you hold, in place:
    lowrank.factorize_(model, {"encoder.layer.0.output.dense.weight": 64})
    # or all stages at once, written atomically to an output directory:
    lowrank.run_pipeline(lowrank.default_pipeline(), "all-MiniLM-L6-v2/", "out/")
    model = lowrank.load("out/")
"""

from .errors import GateFailed, InputError, LowrankError, LowrankWarning, ValidationError
from .io.checkpoint import Checkpoint, open_checkpoint
from .load import load
from .nn.layers import LowRankConv, LowRankEmbedding, LowRankLinear
from .nn.swap import swap_lowrank_
from .pipeline import compress_spec, default_pipeline, read_pipeline, run_pipeline
from .stages.analyze import AnalyzeSettings, Spectra, analyze
from .stages.calibrate import ActivationStats, CalibrateSettings, calibrate
from .stages.evaluate import EvaluateSettings, evaluate
from .stages.factored import LowRankCheckpoint, reconstruct_dense
from .stages.factorize import FactorizeSettings, factorize, factorize_
from .stages.plan import PlanSettings, RankPlan, apply_plan, make_plan
from .stages.recover import RecoverSettings, recover
from .version import __version__

__all__ = [
    "ActivationStats", "AnalyzeSettings", "CalibrateSettings", "Checkpoint", "EvaluateSettings",
    "FactorizeSettings", "GateFailed", "InputError", "LowRankCheckpoint", "LowRankConv",
    "LowRankEmbedding", "LowRankLinear", "LowrankError", "LowrankWarning", "PlanSettings",
    "RankPlan", "RecoverSettings", "Spectra", "ValidationError", "analyze", "apply_plan",
    "calibrate", "compress_spec", "default_pipeline", "evaluate", "factorize", "factorize_",
    "load", "make_plan", "open_checkpoint", "read_pipeline", "reconstruct_dense", "recover",
    "run_pipeline", "swap_lowrank_", "__version__",
]
