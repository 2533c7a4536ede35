"""Where the compute runs: ``--device cuda|mps|cpu`` (default: an accelerator when torch sees one).

Model forward passes (calibration, recovery) run on the device. Per-matrix work (analysis,
factorization, the whitening roots) moves one matrix at a time there and brings the
results back to CPU, so device memory stays near a few times the largest matrix whatever the
model size. The statistics (Grams) are accumulated in float64 on the device, then moved to CPU.

MPS has no float64: there everything that needs it (the Gram accumulation, every
eigensolver/SVD of analysis and factorization) runs on CPU; only the forward passes use MPS.
"""

from __future__ import annotations

import torch

from .errors import InputError

DEVICES = ("cpu", "cuda", "mps")


def default_device() -> str:
    """``cuda`` when torch sees a CUDA GPU, else ``mps`` when available, else ``cpu``."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def resolve_device(device: str | torch.device | None) -> str:
    """The device a run uses, checked: None or ``"auto"`` picks :func:`default_device`; an
    index (``cuda:1``) is kept."""
    if device is None or device == "auto":
        return default_device()
    name = str(device)
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise InputError(f"device must be one of auto, {', '.join(DEVICES)}, got {name!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r}: torch sees no CUDA GPU (torch {torch.__version__})")
    if kind == "mps" and default_device() != "mps":
        raise InputError(f"device {name!r}: MPS is not available on this machine")
    return name


def float64_device(device: str | None) -> str:
    """Where float64 work for ``device`` runs: the device itself, or CPU for MPS (no float64)."""
    if device is None or str(device).startswith("mps"):
        return "cpu"
    return str(device)


def on_device(tensor: torch.Tensor, device: str | None) -> torch.Tensor:
    """``tensor`` where float64 work for ``device`` runs (unchanged on CPU or None)."""
    return tensor.to(float64_device(device))
