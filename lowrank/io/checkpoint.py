"""Reading checkpoints: HF directories, (sharded) safetensors and .pt/.bin state dicts, lazily.

Reading never unpickles arbitrary objects (``torch.load(weights_only=True)`` only) and never
holds the whole checkpoint: safetensors are memory-mapped and read one tensor at a time, torch
zip files are loaded with ``mmap=True``.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import InputError, first_line
from .safetensors import DTYPES, SAFETENSORS_INDEX

TORCH_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".onnx_data", ".h5", ".msgpack")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


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
            raise InputError(f"{file}: cannot read tensor {name!r}: {first_line(e)}") from e

    def num_params(self) -> int:
        return sum(i.numel for i in self._infos.values())

    def num_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)




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
        raise InputError(f"{index}: malformed index ({first_line(e)})") from e
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
            raise InputError(f"{file}: not a valid safetensors file ({first_line(e)})") from e
    else:
        ckpt._handles[file] = _load_state_dict(file)
        infos = [TensorInfo(n, tuple(t.shape), t.dtype) for n, t in ckpt._handles[file].items()]
    for info in infos:
        if info.name in ckpt._infos:
            raise InputError(f"{file}: tensor {info.name!r} appears in two files")
        ckpt._infos[info.name] = info
        ckpt._where[info.name] = file


def _safetensors_info(handle, name: str) -> TensorInfo:
    sl = handle.get_slice(name)
    dtype = DTYPES.get(sl.get_dtype())
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
        raise InputError(f"{file}: not a readable torch checkpoint ({first_line(e)})") from e
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
    return first_line(e)


# --------------------------------------------------------------------------------------------
# Writing


class LazyTensors(Mapping):
    """A read-only name -> tensor mapping over safetensors files on disk; tensors are read on
    access, so a stage can pass a checkpoint larger than memory to the next one."""

    def __init__(self, checkpoint: Checkpoint, owner=None):
        self.checkpoint = checkpoint
        # What keeps the files alive (a tempfile.TemporaryDirectory removed with this mapping).
        self.owner = owner

    @classmethod
    def open(cls, path: Path) -> LazyTensors:
        return cls(open_checkpoint(path))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.checkpoint._infos:
            raise KeyError(name)
        return self.checkpoint.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.checkpoint.names())

    def __len__(self) -> int:
        return len(self.checkpoint.names())

    def numel(self, name: str) -> int:
        return self.checkpoint.info(name).numel

    @property
    def files(self) -> list[Path]:
        return self.checkpoint.files


def numel(tensors: Mapping[str, torch.Tensor]) -> int:
    """Total elements, without reading lazily stored tensors."""
    if isinstance(tensors, LazyTensors):
        return sum(tensors.numel(n) for n in tensors)
    return sum(t.numel() for t in tensors.values())
