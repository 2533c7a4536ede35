import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowrank.errors import InputError
from lowrank.io.checkpoint import open_checkpoint
from lowrank.io.files import atomic_directory, check_output_path


def write_sharded(tmp_path, tensors: dict, shards: int = 2):
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(tmp_path / file))
        weight_map.update({n: file for n in part})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_sharded_safetensors_reads_every_tensor(tmp_path, toy_model):
    sd = {k: v.contiguous() for k, v in toy_model.state_dict().items()}
    index = write_sharded(tmp_path, sd, shards=3)
    for target in (index, tmp_path):  # the index file or its directory
        ckpt = open_checkpoint(target)
        assert set(ckpt.names()) == set(sd) and len(ckpt.files) == 3
        for n in sd:
            assert torch.equal(ckpt.get(n), sd[n])


def test_pt_state_dict_loads_with_weights_only(tmp_path, toy_model):
    sd = toy_model.state_dict()
    path = tmp_path / "model.pt"
    torch.save({"state_dict": sd, "epoch": 3}, path)  # a common training wrapper
    ckpt = open_checkpoint(path)
    assert ckpt.kind == "torch" and set(ckpt.names()) == set(sd)
    assert torch.equal(ckpt.get("fc1.weight"), sd["fc1.weight"])


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Evil()}, path)
    with pytest.raises(InputError, match="refused to unpickle.*weights_only=True"):
        open_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("problem", ["missing", "no_weights", "truncated", "garbage",
                                     "missing_shard", "bad_index", "legacy_pickle", "empty"])
def test_bad_checkpoints_raise_one_line_input_errors(tmp_path, toy_checkpoint, problem):
    if problem == "missing":
        target = tmp_path / "nope.safetensors"
    elif problem == "no_weights":
        target = tmp_path / "dir"
        target.mkdir()
        (target / "config.json").write_text("{}")
    elif problem == "truncated":
        target = tmp_path / "cut.safetensors"
        target.write_bytes(toy_checkpoint.read_bytes()[:-1000])
    elif problem == "garbage":
        target = tmp_path / "garbage.safetensors"
        target.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif problem == "missing_shard":
        target = write_sharded(tmp_path, {"a": torch.zeros(3), "b": torch.ones(3)})
        (tmp_path / "model-00002-of-00002.safetensors").unlink()
    elif problem == "bad_index":
        target = tmp_path / "model.safetensors.index.json"
        target.write_text('{"weight_map": [1, 2]}')
    elif problem == "legacy_pickle":
        target = tmp_path / "model.bin"
        target.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    else:
        target = tmp_path / "empty.safetensors"
        save_file({}, str(target))
    with pytest.raises(InputError) as info:
        open_checkpoint(target)
    message = str(info.value)
    assert "\n" not in message and str(target) in message


def test_check_output_path_refuses_overlap(tmp_path, toy_checkpoint):
    with pytest.raises(InputError, match="overwrite the input"):
        check_output_path(tmp_path, [toy_checkpoint])  # OUTPUT contains the input
    with pytest.raises(InputError, match="overwrite the input"):
        check_output_path(toy_checkpoint, [toy_checkpoint])
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("keep")
    with pytest.raises(InputError, match="not empty"):
        check_output_path(out, [toy_checkpoint])
    check_output_path(out, [toy_checkpoint], overwrite=True)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("killed")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_save_load_round_trip_is_bit_exact(tmp_path, toy_checkpoint):
    from lowrank.io.safetensors import save_tensors

    ckpt = open_checkpoint(toy_checkpoint)
    tensors = {n: ckpt.get(n) for n in ckpt.names()}
    save_tensors(tmp_path / "copy.safetensors", tensors, {"lowrank_version": "test"})
    back = load_file(str(tmp_path / "copy.safetensors"))
    assert all(torch.equal(back[n], tensors[n]) and back[n].dtype == tensors[n].dtype
               for n in tensors)
