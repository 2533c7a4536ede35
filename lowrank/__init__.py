"""lowrank: turn dense neural-network checkpoints into low-rank ones.

    import lowrank
    ckpt = lowrank.open_checkpoint("all-MiniLM-L6-v2/")
    spectra = lowrank.analyze(ckpt)
    plan = lowrank.make_plan(spectra, lowrank.PlanSettings(param_ratio=0.6))
    factored = lowrank.factorize(ckpt, plan)
    # or all stages at once, written atomically to an output directory:
    lowrank.run_pipeline(lowrank.default_pipeline(), "all-MiniLM-L6-v2/", "out/")
    model = lowrank.load("out/")
"""

__version__ = "0.1.0"

from .checkpoint import Checkpoint, open_checkpoint
from .errors import GateFailed, InputError, LowrankError, ValidationError
from .factorize import FactorizeSettings, LowRankCheckpoint, factorize, reconstruct_dense
from .layers import LowRankConv, LowRankEmbedding, LowRankLinear, swap_lowrank_
from .loading import load
from .pipeline import default_pipeline, read_pipeline, run_pipeline
from .plan import PlanSettings, RankPlan, apply_plan, make_plan
from .spectrum import AnalyzeSettings, Spectra, analyze

__all__ = [
    "AnalyzeSettings", "Checkpoint", "FactorizeSettings", "GateFailed", "InputError",
    "LowRankCheckpoint", "LowRankConv", "LowRankEmbedding", "LowRankLinear", "LowrankError",
    "PlanSettings", "RankPlan", "Spectra", "ValidationError", "analyze", "apply_plan",
    "default_pipeline", "factorize", "load", "make_plan", "open_checkpoint", "read_pipeline",
    "reconstruct_dense", "run_pipeline", "swap_lowrank_",
]
