"""The stage cache: artifacts stored under ``<cache>/<stage>/<key>/``, keyed by content — the
checkpoint's bytes (sha256, memoized per file), the stage's settings (and the content of any
``*_file`` setting), the model factory's source and the keys of the stages it reads."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path

from ..errors import InputError
from ..io.files import atomic_directory
from ..models import factory_name, resolve_factory
from .stage import Stage


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


def setting_file_sha256(stage: str, key: str, value: str) -> str:
    """sha256 of a file a stage setting names (plan_file, calibration_file...): a bad input
    if unreadable."""
    try:
        return file_sha256(Path(value))
    except OSError as e:
        raise InputError(f"{value}: cannot read the {stage} stage's {key} "
                         f"({e.strerror or type(e).__name__})") from e


def digest(obj) -> str:
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


def factory_digest(factory) -> dict:
    """The model factory's name and the sha256 of its source file (resolving it checks the
    ``package.module:function`` value before any stage runs)."""
    fn = resolve_factory(factory) if isinstance(factory, str) else factory
    try:
        source = inspect.getsourcefile(fn)
    except TypeError:  # a builtin or C callable: no source file
        source = None
    return {"model_factory": factory_name(factory),
            "sha256": file_sha256(Path(source)) if source and Path(source).is_file() else None}
