"""The factored checkpoint: the artifact factorize makes and recover refines — its tensors (in
memory, or streamed to disk), what happened to each layer, and its ``lowrank_config.json``.

Tied weights (one tensor under two names: an LM head tied to the input embedding) are factored
once, under the first name; the other name is left out of the tensors and recorded as
``tied_to``, and loading points it at the same factors. Naming: :mod:`lowrank.naming`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import InputError
from ..io.checkpoint import LazyTensors, numel
from ..io.files import check_format, read_json_file, write_json
from ..io.safetensors import DEFAULT_MAX_SHARD_BYTES, SAFETENSORS_INDEX, write_tensors
from ..naming import FACTOR_LAYOUT, factor_names, module_name
from ..nn.adapters import save_adapters
from ..version import __version__

FORMAT, FORMAT_VERSION = "lowrank", 1
CONFIG_FILE = "lowrank_config.json"


@dataclass
class LayerResult:
    shape: list[int]
    rank: int | None
    method: str | None = None
    energy: float | None = None  # fraction of ‖W‖_F² kept by A·B
    rel_error: float | None = None  # ‖W − A·B‖_F / ‖W‖_F
    reason: str | None = None  # why it stayed dense
    tied_to: str | None = None  # the tensor this one is tied to (shares its factors or weight)
    transposed: bool | None = None  # stored (in, out) (GPT-2's Conv1D): A·B is its transpose
    split: list[int] | None = None  # a fused projection factored per part: rows of each part

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "rank"}


@dataclass
class LowRankCheckpoint:
    """The output state dict and what happened to each layer."""

    tensors: Mapping[str, torch.Tensor]  # a dict, or LazyTensors streamed to disk
    layers: dict[str, LayerResult]
    params_before: int
    settings: dict  # the factorize settings it was made with, as recorded in lowrank_config.json
    metadata: dict = field(default_factory=dict)  # extra lowrank_config.json keys (recovery)
    adapters: dict[str, torch.Tensor] = field(default_factory=dict)  # LoRA tensors, PEFT layout
    adapter_config: dict | None = None

    @property
    def params_after(self) -> int:
        return numel(self.tensors)

    def lowrank_config(self) -> dict:
        """The ``lowrank_config.json`` of an output directory (deterministic: no paths, no times)."""
        factored = {n: r for n, r in self.layers.items() if r.rank is not None}
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "lowrank_version": __version__,
            "factor_layout": FACTOR_LAYOUT,
            "params": {"before": self.params_before, "after": self.params_after,
                       "ratio": round(self.params_after / self.params_before, 6)},
            "factorize": self.settings,
            # PEFT-style anchored module patterns -> rank.
            "rank_pattern": {f"^{module_name(n)}$": r.rank for n, r in factored.items()},
            "layers": {n: dict(module=module_name(n), **r.to_json())
                       for n, r in self.layers.items()},
            **self.metadata,
        }


def read_lowrank_config(path: Path) -> dict:
    """The parsed ``lowrank_config.json`` of output directory ``path``, format checked."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise InputError(f"{path}: not a lowrank output (no {CONFIG_FILE})")
    config = read_json_file(file, "lowrank config")
    check_format(config, FORMAT, FORMAT_VERSION, file, version_key="format_version")
    if not isinstance(config.get("layers"), dict):
        raise InputError(f"{file}: not a lowrank config (no \"layers\" object)")
    return config


def save_lowrank(artifact: LowRankCheckpoint, directory: Path,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write the checkpoint into ``directory``: ``model.safetensors`` (or shards + index),
    ``lowrank_config.json`` and, after LoRA recovery, ``adapters/``. Lazy tensors are streamed
    one at a time."""
    for old in [*directory.glob("model*.safetensors"), directory / SAFETENSORS_INDEX]:
        old.unlink(missing_ok=True)  # an earlier stage's, in a reused cache directory
    write_tensors(directory, artifact.tensors, {"lowrank_version": __version__}, max_shard_bytes)
    write_json(directory / CONFIG_FILE, artifact.lowrank_config())
    if artifact.adapter_config is not None:
        save_adapters(artifact.adapters, artifact.adapter_config, directory / "adapters")


def load_lowrank(directory: Path) -> LowRankCheckpoint:
    """A checkpoint written by :func:`save_lowrank`; its tensors are read lazily from there."""
    config = read_lowrank_config(directory)
    layers = {n: LayerResult(**{k: v for k, v in e.items() if k != "module"})
              for n, e in config["layers"].items()}
    artifact = LowRankCheckpoint(LazyTensors.open(directory), layers, config["params"]["before"],
                                 config["factorize"],
                                 {k: config[k] for k in ("recovery",) if k in config})
    adapters = directory / "adapters"
    if adapters.is_dir():
        artifact.adapters = load_file(str(adapters / "adapter_model.safetensors"))
        artifact.adapter_config = json.loads((adapters / "adapter_config.json").read_text())
    return artifact


def reconstruct_dense(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The dense state dict a low-rank one stands for: ``<module>.weight = (A @ B).reshape``.

    Args:
        tensors: a low-rank state dict (e.g. ``safetensors.torch.load_file(OUT/model.safetensors)``).
        config: the parsed ``lowrank_config.json`` of the same output.
    """
    dense = dict(tensors)
    for name, layer in config["layers"].items():
        if layer.get("rank") is None:
            continue
        a_name, b_name = factor_names(name)
        A, B = dense.pop(a_name), dense.pop(b_name)
        if layer.get("split"):  # part i: its rows of A times its rank rows of B
            r = A.shape[1]
            w = torch.cat([a.double() @ B[i * r:(i + 1) * r].double()
                           for i, a in enumerate(A.split(layer["split"]))])
        else:
            w = A.double() @ B.double()
        w = w.T if layer.get("transposed") else w  # a Conv1D weight is stored (in, out)
        dense[name] = w.to(A.dtype).reshape(layer["shape"])
    for name, layer in config["layers"].items():  # a tied name is the same tensor, as saved
        if layer.get("tied_to"):
            dense[name] = dense[layer["tied_to"]]
    return dense
