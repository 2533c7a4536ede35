"""The one safetensors writer, streaming: tensors go to disk one at a time, so writing a checkpoint needs
memory for one tensor, not for the whole state dict.

``safetensors.torch.save_file`` takes the complete dict (the header, which lists every tensor's
offsets, comes before the data). :class:`ShardWriter` instead appends each tensor's bytes to a
data file as it arrives and, on :meth:`ShardWriter.close`, writes the header and streams the
data behind it. The files are ordinary safetensors (read back with ``safe_open``); the same
tensors added in the same order give the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
# safetensors' own dtype table (name -> torch dtype) and its inverse; the library has no public
# one. Reading (lowrank.io.checkpoint) and writing use the same.
DTYPES: dict[str, torch.dtype] = dict(safetensors.torch._TYPES)
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # transformers' save_pretrained default ("5GB")
_COPY_CHUNK = 16 * 1024**2


class ShardWriter:
    """Write tensors to ``directory`` as ``<name>.safetensors``, or as
    ``<name>-0000i-of-0000N.safetensors`` shards plus ``<name>.safetensors.index.json`` when they
    exceed ``max_shard_bytes`` (transformers' layout for ``name="model"``).

    Example:
        >>> with ShardWriter(out_dir, {"lowrank_version": "0.1"}) as writer:  # doctest: +SKIP
        ...     for name, tensor in tensors:
        ...         writer.add(name, tensor)
    """

    def __init__(self, directory: Path, metadata: dict[str, str] | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, name: str = "model"):
        self.directory, self.name = Path(directory), name
        self.metadata = {"format": "pt", **(metadata or {})}
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[dict] = []  # {"data": Path, "header": {name: entry}, "bytes": int}
        self.names: set[str] = set()
        self.files: list[Path] | None = None  # set by close()
        self._data = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (tensors sharing memory are fine: each is copied as bytes)."""
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {tensor.dtype} is not supported by the writer")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        raw = (flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)).numpy()
        shard = self.shards[-1] if self.shards else None
        if shard is None or (shard["bytes"] and shard["bytes"] + raw.nbytes > self.max_shard_bytes):
            shard = self._new_shard()
        begin = shard["bytes"]
        self._data.write(memoryview(raw))
        shard["bytes"] += raw.nbytes
        shard["header"][name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                                 "data_offsets": [begin, shard["bytes"]]}
        self.names.add(name)

    def _new_shard(self) -> dict:
        if self._data is not None:
            self._data.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        shard = {"data": self.directory / f".{self.name}-{len(self.shards)}.data", "header": {},
                 "bytes": 0}
        self._data = open(shard["data"], "wb")
        self.shards.append(shard)
        return shard

    def close(self) -> list[Path]:
        """Finish every file; returns the safetensors files written (one, or the shards)."""
        if self.files is not None:
            return self.files
        if self._data is not None:
            self._data.close()
            self._data = None
        if not self.shards:
            self._new_shard()
            self._data.close()
            self._data = None
        count = len(self.shards)
        names = ([f"{self.name}.safetensors"] if count == 1 else
                 [f"{self.name}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        files = []
        for shard, file_name in zip(self.shards, names):
            file = self.directory / file_name
            _finish(shard, self.metadata, file)
            files.append(file)
        if count > 1:
            weight_map = {n: f.name for shard, f in zip(self.shards, files) for n in shard["header"]}
            index = {"metadata": {"total_size": sum(s["bytes"] for s in self.shards)},
                     "weight_map": dict(sorted(weight_map.items()))}
            index_file = self.directory / f"{self.name}.safetensors.index.json"
            index_file.write_text(json.dumps(index, indent=2) + "\n")
        self.shards, self.files = [], files
        return files

    def abort(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None
        for shard in self.shards:
            shard["data"].unlink(missing_ok=True)
        self.shards = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _finish(shard: dict, metadata: dict[str, str], file: Path) -> None:
    """``file`` = 8-byte header length, JSON header (sorted keys, space-padded to 8 bytes), data."""
    header = dict(sorted(shard["header"].items()))
    header["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    # A new inode, renamed into place: never write through a name another file may share.
    tmp = file.with_name(f".{file.name}.tmp")
    with open(tmp, "wb") as out, open(shard["data"], "rb") as data:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        shutil.copyfileobj(data, out, _COPY_CHUNK)
    os.replace(tmp, file)
    os.unlink(shard["data"])


def write_tensors(directory: Path, tensors: Mapping[str, torch.Tensor],
                  metadata: dict[str, str] | None = None,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Stream ``tensors`` (any mapping, e.g. a lazy :class:`~lowrank.io.checkpoint.LazyTensors`)
    into ``directory`` as ``model.safetensors`` or shards, sorted by name, holding one tensor at
    a time. Returns the files written."""
    with ShardWriter(directory, metadata, max_shard_bytes) as writer:
        for name in sorted(tensors):
            writer.add(name, tensors[name])
        return writer.close()


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to one safetensors file ``path`` (no sharding); the same tensors and
    metadata always give the same bytes."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: expected a .safetensors path")
    with ShardWriter(path.parent, metadata, max_shard_bytes=float("inf"), name=path.stem) as writer:
        for name in sorted(tensors):
            writer.add(name, tensors[name])


