"""Where the compute runs: ``--device cuda|mps|cpu`` (default: an accelerator when torch sees one).

Model forward passes (calibration, recovery) run on the device. Per-matrix work (analysis,
factorization, the whitening roots) moves one matrix at a time there and brings the
results back to CPU, so device memory stays near a few times the largest matrix whatever the
model size. The statistics (Grams) are accumulated in float64 on the device, then moved to CPU.

MPS has no float64: there everything that needs it (the Gram accumulation, every
eigensolver/SVD of analysis and factorization) runs on CPU; only the forward passes use MPS.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import InputError

DEVICES = ("cpu", "cuda", "mps")
PASS_DTYPES = ("auto", "float32", "bfloat16")


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


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX): there bf16 GEMMs run
    2.2× faster than float32 (2 cores, 2048×576 by 576×1536: 8.5 vs 18.8 ms); elsewhere torch
    emulates them, slower than float32."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def autocast_dtype(name: str, device: str | torch.device | None = None) -> torch.dtype:
    """What forward passes on ``device`` (CPU when None) autocast to for a setting of
    :data:`PASS_DTYPES`: :func:`pass_dtype` on CPU; float32 (no autocast) elsewhere."""
    dtype = pass_dtype(name)
    return dtype if torch.device(device or "cpu").type == "cpu" else torch.float32


def check_pass_dtype(name: str, setting: str = "forward pass dtype") -> None:
    """A one-line InputError naming ``setting`` unless ``name`` is one of :data:`PASS_DTYPES`."""
    if name not in PASS_DTYPES:
        raise InputError(f"{setting} must be one of {', '.join(PASS_DTYPES)}, got {name!r}")


def cpu_autocast(dtype: torch.dtype):
    """``torch.autocast`` on CPU to ``dtype``; no autocast for float32."""
    return torch.autocast("cpu", dtype, enabled=dtype != torch.float32)


def trained_attention(device: str | None):
    """The attention kernel of passes that are trained through, on ``device`` (None: CPU): on
    CPU torch's math kernel, whose backward is cheap on the short lines recovery trains on.
    The default, CPU flash attention, took 0.31 s of a 1.26 s backward pass on SmolLM2 (32 lines
    of ~13 tokens) for a 0.03 s forward. Accelerators keep their default kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device is not None and str(device) != "cpu":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``: a pass dtype as settings spell it."""
    return str(dtype).removeprefix("torch.")


def pass_dtype(name: str) -> torch.dtype:
    """The dtype CPU forward passes autocast to, for a setting of :data:`PASS_DTYPES`
    (``auto``: bfloat16 where :func:`native_bf16`, else float32)."""
    check_pass_dtype(name)
    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    return getattr(torch, name)
