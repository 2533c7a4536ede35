"""Checkpoint I/O: read HF directories, (sharded) safetensors and .pt/.bin state dicts lazily;
write output directories atomically.

Reading never unpickles arbitrary objects (``torch.load(weights_only=True)`` only) and never
holds the whole checkpoint: safetensors are memory-mapped and read one tensor at a time, torch
zip files are loaded with ``mmap=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import InputError

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".onnx_data", ".h5", ".msgpack")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
# Files an output directory gets from lowrank itself, never copied from the input.
OWN_FILES = {"model.safetensors", SAFETENSORS_INDEX, "lowrank_config.json", "manifest.json"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Checkpoint:
    """A read-only checkpoint whose tensors are loaded on demand by name.

    ``model_dir`` is the HF directory (with ``config.json``) when there is one: it tells
    :func:`lowrank.load` which architecture to build and which files to copy to an output.
    """

    path: Path
    kind: str  # "safetensors" | "torch"
    files: list[Path]
    model_dir: Path | None = None
    _where: dict[str, Path] = field(default_factory=dict, repr=False)
    _infos: dict[str, TensorInfo] = field(default_factory=dict, repr=False)
    _handles: dict[Path, dict] = field(default_factory=dict, repr=False)  # torch files

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor: a memory-mapped view of its bytes in the file.

        safetensors files are opened afresh for each tensor: a long-lived handle keeps every
        page it ever touched mapped, so resident memory would grow to the whole checkpoint;
        this way the mapping goes with the tensor.
        """
        file = self._where[name]
        try:
            if self.kind == "safetensors":
                with safe_open(str(file), framework="pt") as handle:
                    return handle.get_tensor(name)
            return self._handles[file][name]
        except (SafetensorError, RuntimeError, OSError) as e:
            raise InputError(f"{file}: cannot read tensor {name!r}: {_first_line(e)}") from e

    def num_params(self) -> int:
        return sum(i.numel for i in self._infos.values())

    def num_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint without loading its tensors.

    Args:
        path: an HF model directory, a ``.safetensors`` file, a ``model.safetensors.index.json``,
            or a ``.pt``/``.pth``/``.bin`` state dict.

    Returns:
        A :class:`Checkpoint`; tensors are read by :meth:`Checkpoint.get`.

    Example:
        >>> ckpt = open_checkpoint("all-MiniLM-L6-v2/")  # doctest: +SKIP
        >>> ckpt.info("embeddings.word_embeddings.weight").shape  # doctest: +SKIP
        (30522, 384)
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    model_dir = None
    if path.is_dir():
        model_dir = path if (path / "config.json").is_file() else None
        target = _weights_in_dir(path)
    else:
        target = path
    if target.name.endswith(".index.json"):
        files, weight_map = _read_index(target)
        kind = "safetensors" if all(f.suffix == ".safetensors" for f in files) else "torch"
    elif target.suffix == ".safetensors":
        files, weight_map, kind = [target], None, "safetensors"
    elif target.suffix in TORCH_SUFFIXES:
        files, weight_map, kind = [target], None, "torch"
    else:
        raise InputError(
            f"{path}: unsupported checkpoint format (expected a directory, .safetensors, "
            f"model.safetensors.index.json, .pt, .pth or .bin)"
        )
    ckpt = Checkpoint(path=path, kind=kind, files=files, model_dir=model_dir)
    for file in files:
        _index_file(ckpt, file)
    if weight_map is not None:
        _check_index_matches(target, weight_map, ckpt)
    if not ckpt._infos:
        raise InputError(f"{path}: the checkpoint holds no tensors")
    if ckpt.num_params() == 0:
        raise InputError(f"{path}: the checkpoint holds only empty tensors (no parameters)")
    return ckpt


def _weights_in_dir(directory: Path) -> Path:
    for name in (SAFETENSORS_INDEX, "model.safetensors", TORCH_INDEX, "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    for pattern in ("*.safetensors", "*.pt", "*.pth", "*.bin"):
        found = sorted(directory.glob(pattern))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(f.name for f in found[:4])
            raise InputError(
                f"{directory}: several weight files ({names}) and no index; pass one file or add "
                f"an index (model.safetensors.index.json)"
            )
    raise InputError(
        f"{directory}: no weights found (expected model.safetensors, "
        f"model.safetensors.index.json, pytorch_model.bin or a .pt file)"
    )


def _read_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        data = json.loads(index.read_text())
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("needs a \"weight_map\" object mapping tensor names to file names")
    # ValueError: bad UTF-8 or JSON, or an integer too long to convert; RecursionError: nesting.
    except (OSError, ValueError, RecursionError, TypeError) as e:
        raise InputError(f"{index}: malformed index ({_first_line(e)})") from e
    shard_names = sorted(set(weight_map.values()))
    escaping = [s for s in shard_names if Path(s).is_absolute() or ".." in Path(s).parts]
    if escaping:  # checked first: never look at files outside the checkpoint's directory
        raise InputError(f"{index}: shard paths must stay inside its directory: {escaping[0]}")
    missing = [s for s in shard_names if not (index.parent / s).is_file()]
    if missing:
        raise InputError(f"{index}: missing shard(s): {', '.join(missing)}")
    return [index.parent / s for s in shard_names], weight_map


def _check_index_matches(index: Path, weight_map: dict[str, str], ckpt: Checkpoint) -> None:
    for name, shard in weight_map.items():
        if name not in ckpt._infos:
            raise InputError(f"{index}: tensor {name!r} is not in shard {shard}")
        if ckpt._where[name].name != Path(shard).name:
            raise InputError(f"{index}: tensor {name!r} is in {ckpt._where[name].name}, not {shard}")


def _index_file(ckpt: Checkpoint, file: Path) -> None:
    if ckpt.kind == "safetensors" and file.suffix == ".safetensors":
        try:
            with safe_open(str(file), framework="pt") as handle:  # Checkpoint.get reopens it
                infos = [_safetensors_info(handle, n) for n in handle.keys()]
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise InputError(f"{file}: not a valid safetensors file ({_first_line(e)})") from e
    else:
        ckpt._handles[file] = _load_state_dict(file)
        infos = [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in ckpt._handles[file].items()]
    for info in infos:
        if info.name in ckpt._infos:
            raise InputError(f"{file}: tensor {info.name!r} appears in two files")
        ckpt._infos[info.name] = info
        ckpt._where[info.name] = file


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def _safetensors_info(handle, name: str) -> TensorInfo:
    sl = handle.get_slice(name)
    dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype())
    if dtype is None:
        dtype = handle.get_tensor(name).dtype  # rare dtypes (fp8, uint16...): read to learn it
    return TensorInfo(name, tuple(sl.get_shape()), dtype)


# What torch.load raises on corrupt bytes: its zip reader (RuntimeError, OSError, EOFError,
# ValueError) and its weights-only pickle parser, which indexes an unchecked stack and memo
# (IndexError, KeyError, TypeError, AttributeError, AssertionError, struct.error; all found
# by fuzzing).
_TORCH_LOAD_ERRORS = (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile,
                      IndexError, KeyError, TypeError, AttributeError, AssertionError,
                      struct.error)


def _load_state_dict(file: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                raise
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _weights_only_reason(e)
        raise InputError(
            f"{file}: refused to unpickle ({reason}); lowrank loads only plain tensors "
            f"(torch.load weights_only=True). Convert the file to safetensors where you trust it"
        ) from e
    except _TORCH_LOAD_ERRORS as e:
        raise InputError(f"{file}: not a readable torch checkpoint ({_first_line(e)})") from e
    # Training checkpoints often nest the weights; accept the common wrappers.
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise InputError(f"{file}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    for name, t in tensors.items():  # sparse, meta (no data) and quantized tensors can't be read
        if t.layout != torch.strided or t.is_meta or t.is_quantized:
            kind = "meta" if t.is_meta else "quantized" if t.is_quantized else str(t.layout)
            raise InputError(f"{file}: tensor {name!r} is a {kind} tensor; lowrank reads dense "
                             f"tensors only")
    return tensors


def _weights_only_reason(e: pickle.UnpicklingError) -> str:
    for line in str(e).splitlines():
        line = line.strip()
        if line.startswith(("WeightsUnpickler error:", "Unsupported global")):
            return line.removeprefix("WeightsUnpickler error:").strip().rstrip(".")
    return _first_line(e)


# --------------------------------------------------------------------------------------------
# Writing


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
            raise InputError(f"{output}: exists and is not empty (pass --overwrite to replace it)")
    # OUTPUT is written as a sibling temporary directory, then renamed: its nearest existing
    # ancestor must be a writable directory. Refuse now rather than after the work.
    parent = output.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{output}: cannot create it: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{output}: cannot write in {parent} (permission denied)")


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
        raise InputError(f"{path}: not a readable {kind} ({_first_line(e)})") from e


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write safetensors so that the same tensors and metadata always give the same bytes."""
    ordered, storages = {}, set()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        ptr = t.untyped_storage().data_ptr()  # 0 for empty tensors
        if ptr and ptr in storages:  # tied weights of a .pt/.bin: safetensors refuses shared memory
            t = t.clone()
        storages.add(ptr)
        ordered[k] = t
    try:
        save_file(ordered, str(path), metadata={"format": "pt", **metadata})
    except SafetensorError as e:  # the (Rust) writer reports a failed write (disk full) this way
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        errno_ = int(code.group(1))
        raise OSError(errno_, os.strerror(errno_), str(path)) from e
    _canonicalize_header(path)


def _canonicalize_header(path: Path) -> None:
    """The writer keeps metadata in a hash map, so its key order varies from call to call;
    rewrite the JSON header with sorted keys (same length: only the order changes)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        text = raw.decode().rstrip(" ")
        canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
        if len(canonical) == len(text):
            f.seek(8)
            f.write(canonical.encode() + raw[len(text):])


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
