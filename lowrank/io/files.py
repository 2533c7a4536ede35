"""Output files: refuse an OUTPUT that would overwrite an input, write directories atomically
(a temporary sibling renamed into place), JSON in and out, and the non-weight files of an HF
directory copied along."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..errors import InputError, LowrankWarning, first_line
from .checkpoint import SAFETENSORS_INDEX, WEIGHT_SUFFIXES

# Files an output directory gets from lowrank itself, never copied from the input.
OWN_FILES = {"model.safetensors", SAFETENSORS_INDEX, "lowrank_config.json", "manifest.json"}


def check_output_path(output: Path, inputs: list[Path], overwrite: bool = False) -> None:
    """Refuse an OUTPUT that is, contains or lies inside an input, or exists (unless overwrite)."""
    out = output.resolve()
    for inp in inputs:
        src = inp.resolve()
        if out == src or src.is_relative_to(out) or out.is_relative_to(src):
            raise InputError(f"{output}: output would overwrite the input {inp}; choose another path")
    if output.exists():
        if not output.is_dir():
            raise InputError(f"{output}: exists and is not a directory")
        if any(output.iterdir()) and not overwrite:
            raise InputError(f"{output}: exists and is not empty (replace it with --overwrite, "
                             f"overwrite=True in Python)")
    # OUTPUT is written as a sibling temporary directory, then renamed: its nearest existing
    # ancestor must be a writable directory. Refuse now rather than after the work.
    parent = output.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{output}: cannot create it: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{output}: cannot write in {parent} (permission denied)")


def check_output_file(path: Path, inputs: list[Path]) -> None:
    """Refuse a FILE that is an input or lies inside an input directory, or whose folder does
    not exist (:func:`atomic_write_text` makes none): found out before the work, not after."""
    target = Path(path).resolve()
    for inp in inputs:
        src = inp.resolve()
        if target == src or target.is_relative_to(src) and src.is_dir():
            raise InputError(f"{path}: would write into the input; choose another path")
    if not target.parent.is_dir():
        raise InputError(f"{path}: folder {target.parent} does not exist")


@contextlib.contextmanager
def atomic_directory(output: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``output`` in one rename.

    On any error the temporary directory is removed, so a half-written OUTPUT is never visible.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if output.exists():
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            os.replace(output, old)
        os.replace(tmp, output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json_file(path: Path, kind: str) -> object:
    """Parsed JSON of ``path``; a missing or unreadable file is an InputError naming ``kind``."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such {kind}") from e
    # ValueError: bad UTF-8 or JSON, or an integer too long to convert; RecursionError: nesting.
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{path}: not a readable {kind} ({first_line(e)})") from e


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it to ``path``: a failed write leaves
    no half-written file (and an existing one as it was)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_model_files(model_dir: Path | None, dest: Path) -> list[str]:
    """Copy config, tokenizer and other non-weight files of an HF directory into ``dest``."""
    if model_dir is None:
        return []
    copied = []
    for src in sorted(model_dir.rglob("*")):
        rel = src.relative_to(model_dir)
        if any(p.startswith(".") for p in rel.parts) or not src.is_file():
            continue
        if rel.name in OWN_FILES or rel.name.endswith((*WEIGHT_SUFFIXES, ".index.json")):
            continue
        if rel.parts[0] in ("onnx", "openvino"):  # exports of the dense model would be stale
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
        copied.append(str(rel))
    return copied


def check_format(data: object, fmt: str, version: int, source: object,
                 version_key: str = "version") -> dict:
    """``data`` (parsed JSON) if it is a ``fmt`` artifact of a version this lowrank reads: a
    newer version is refused (it may mean something else), an older one read with a warning."""
    found = data.get("format") if isinstance(data, dict) else None
    if found != fmt:
        raise InputError(f"{source}: not a {fmt} file (format {found!r})")
    got = data.get(version_key)
    if not isinstance(got, int) or got > version:
        raise InputError(f"{source}: {fmt} version {got!r} is newer than this lowrank reads "
                         f"({version}); upgrade lowrank")
    if got < version:
        warnings.warn(f"{source}: {fmt} version {got} is older than {version}; read as is",
                      LowrankWarning, stacklevel=2)
    return data
