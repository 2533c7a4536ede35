"""Heavy or optional back-ends, imported lazily in this one place: importing lowrank stays fast,
and a missing one is a one-line error that says what to install."""

from __future__ import annotations

import importlib
import importlib.util

from .errors import InputError

# module -> what to install when it is missing
INSTALL = {"onnx": "pip install onnx", "onnxruntime": "pip install onnxruntime",
           "ray": "pip install 'lowrank[ray]'"}


def available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def require(name: str):
    """The imported module ``name`` (onnx, onnxruntime, ray), or an InputError saying how to
    install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise InputError(f"this needs {name}: {INSTALL.get(name, f'pip install {name}')}") from e
