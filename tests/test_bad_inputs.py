"""Bad-input suite (issue 5): every broken checkpoint, plan or output path gives one `error:`
line, a documented exit code, no traceback, no OUTPUT (or an untouched one) and an unchanged
input. Also: NaN/Inf, all-zero and 1×N matrices, tied weights, a full disk, a read-only output
directory, a process killed while writing, and hypothesis fuzzing of checkpoint reading and plan
parsing.

Exit codes (lowrank/cli.py, README "Exit codes"): 1 lowrank error or a failed read/write
(disk full, permission denied), 2 usage, 3 bad input.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lowrank.cli import main
from lowrank.errors import InputError
from lowrank.io.checkpoint import open_checkpoint
from lowrank.io.files import read_json_file
from lowrank.io.safetensors import save_tensors
from lowrank.stages.analyze import analyze
from lowrank.stages.plan import apply_plan, read_plan_file

BAD_INPUT, LOWRANK_ERROR = 3, 1
FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# Helpers


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def digest(path: Path) -> str | None:
    """sha256 over a file, or over every file (names and bytes) of a directory; None if absent."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def assert_one_line_error(result, code: int, fragment: str | None = None) -> str:
    """Exit ``code``, exactly one non-empty line on stderr starting with `error:`, no stdout,
    no traceback, no escaped exception."""
    context = f"exit {result.exit_code}\nstderr: {result.stderr!r}\nstdout: {result.stdout!r}"
    assert result.exit_code == code, context
    assert result.exception is None or isinstance(result.exception, SystemExit), context
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), context
    assert "Traceback" not in result.output and "internal error" not in result.output, context
    assert result.stdout.strip() == "", context
    if fragment is not None:
        assert fragment in lines[0], context
    return lines[0]


def no_output_left(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    leftovers = [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]
    assert leftovers == [], leftovers


def st_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, header JSON, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


@pytest.fixture
def small_st(tmp_path):
    """A valid two-tensor safetensors file and its header length."""
    path = tmp_path / "small.safetensors"
    save_file({"a.weight": torch.randn(8, 6), "b": torch.randn(5)}, str(path))
    raw = path.read_bytes()
    return raw, int.from_bytes(raw[:8], "little")


class Evil:
    """Unpickling this would run code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


# --------------------------------------------------------------------------------------------
# Corrupt checkpoints: compress, analyze and plan all refuse them the same way


def _corrupt_safetensors(tmp_path: Path, raw: bytes, n: int, case: str) -> Path:
    f32 = lambda shape, start, end: {"dtype": "F32", "shape": shape, "data_offsets": [start, end]}
    data = raw[8 + n:]
    header = json.loads(raw[8:8 + n])
    contents = {
        "empty file": b"",
        "cut in length prefix": raw[:3],
        "cut after length prefix": raw[:8],
        "cut in header": raw[:8 + n // 2],
        "cut after header": raw[:8 + n],
        "cut in data": raw[:8 + n + len(data) // 2],
        "last byte missing": raw[:-1],
        "length past end of file": st_bytes(json.dumps(header).encode(), data, length=len(raw) * 2),
        "length 2**63": st_bytes(json.dumps(header).encode(), data, length=2**63),
        "length 2**64-1": st_bytes(json.dumps(header).encode(), data, length=2**64 - 1),
        "garbage header": st_bytes(b"{this is not json" + b" " * 16),
        "non-utf8 header": st_bytes(b"\xff\xfe\xfd" + b" " * 16),
        "header is a list": st_bytes(b"[1, 2, 3]"),
        "header is a string": st_bytes(b'"tensors"'),
        "header is null": st_bytes(b"null"),
        "header deeply nested": st_bytes(b"[" * 50_000),
        "dtype vs byte length": st_bytes({"a": dict(f32([8, 6], 0, 192), dtype="F64")}, data[:192]),
        "shape vs byte length": st_bytes({"a": f32([9, 6], 0, 192)}, data[:192]),
        "negative dim": st_bytes({"a": f32([-1], 0, 4)}, b"\0" * 4),
        "shape overflows": st_bytes({"a": f32([2**62, 2**62], 0, 0)}),
        "unknown dtype": st_bytes({"a": dict(f32([1], 0, 4), dtype="Q7")}, b"\0" * 4),
        "overlapping offsets": st_bytes({"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, b"\0" * 12),
        "offsets past the data": st_bytes({"a": f32([4], 0, 16)}, b"\0" * 8),
        "gap in the data": st_bytes({"a": f32([1], 4, 8)}, b"\0" * 8),
        "non-string metadata": st_bytes({"__metadata__": {"k": 1}, "a": f32([1], 0, 4)}, b"\0" * 4),
    }
    path = tmp_path / "bad.safetensors"
    path.write_bytes(contents[case])
    return path


SAFETENSORS_CASES = [
    "empty file", "cut in length prefix", "cut after length prefix", "cut in header",
    "cut after header", "cut in data", "last byte missing", "length past end of file",
    "length 2**63", "length 2**64-1", "garbage header", "non-utf8 header", "header is a list",
    "header is a string", "header is null", "header deeply nested", "dtype vs byte length",
    "shape vs byte length", "negative dim", "shape overflows", "unknown dtype",
    "overlapping offsets", "offsets past the data", "gap in the data", "non-string metadata",
]


def _bad_index(tmp_path: Path, case: str) -> Path:
    d = tmp_path / "sharded"
    d.mkdir()
    save_file({"w.weight": torch.randn(16, 16)}, str(d / "a.safetensors"))
    save_file({"v.weight": torch.randn(16, 16)}, str(tmp_path / "outside.safetensors"))
    index = d / "model.safetensors.index.json"
    text = {
        "not json": "{weight_map: nope",
        "non-utf8": b"\xff\xfe{}",
        "not an object": "[1, 2]",
        "no weight_map": '{"metadata": {}}',
        "weight_map is a list": '{"weight_map": ["a.safetensors"]}',
        "non-string shard": '{"weight_map": {"w.weight": 1}}',
        "escapes with ..": '{"weight_map": {"w.weight": "a.safetensors", '
                           '"v.weight": "../outside.safetensors"}}',
        "absolute shard": json.dumps(
            {"weight_map": {"v.weight": str(tmp_path / "outside.safetensors")}}),
        "missing shard": '{"weight_map": {"w.weight": "a.safetensors", '
                         '"v.weight": "b.safetensors"}}',
        "tensor not in its shard": '{"weight_map": {"w.weight": "a.safetensors", '
                                   '"x": "a.safetensors"}}',
        "empty weight_map": '{"weight_map": {}}',
        "deeply nested": "[" * 100_000,
        "5000-digit integer": '{"weight_map": {}, "n": 1' + "0" * 5000 + "}",
    }[case]
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    return d


INDEX_CASES = ["not json", "non-utf8", "not an object", "no weight_map", "weight_map is a list",
               "non-string shard", "escapes with ..", "absolute shard", "missing shard",
               "tensor not in its shard", "empty weight_map", "deeply nested",
               "5000-digit integer"]


def _bad_torch(tmp_path: Path, case: str) -> Path:
    path = tmp_path / "bad.pt"
    if case == "tensor, not a dict":
        torch.save(torch.randn(4, 4), path)
    elif case == "list, not a dict":
        torch.save([torch.randn(4, 4)], path)
    elif case == "int, not a dict":
        torch.save(7, path)
    elif case == "empty dict":
        torch.save({}, path)
    elif case == "no string keys":
        torch.save({1: torch.randn(4, 4)}, path)
    elif case == "sparse tensor":
        torch.save({"w.weight": torch.eye(16).to_sparse()}, path)
    elif case == "meta tensor":
        torch.save({"w.weight": torch.empty(16, 16, device="meta")}, path)
    elif case == "empty file":
        path.write_bytes(b"")
    elif case == "truncated zip":
        torch.save({"w.weight": torch.randn(16, 16)}, path)
        path.write_bytes(path.read_bytes()[:400])
    elif case == "garbage":
        path.write_bytes(b"PK\x03\x04" + os.urandom(64))
    else:
        raise KeyError(case)
    return path


TORCH_CASES = ["tensor, not a dict", "list, not a dict", "int, not a dict", "empty dict",
               "no string keys", "sparse tensor", "meta tensor", "empty file", "truncated zip",
               "garbage"]


def _bad_other(tmp_path: Path, case: str) -> Path:
    if case == "no tensors":
        path = tmp_path / "empty.safetensors"
        save_file({}, str(path))
    elif case == "only empty tensors":
        path = tmp_path / "zero-size.safetensors"
        save_file({"x": torch.zeros(0), "y.weight": torch.zeros(0, 4)}, str(path))
    elif case == "directory without weights":
        path = tmp_path / "model"
        path.mkdir()
        (path / "config.json").write_text("{}")
    elif case == "several weight files":
        path = tmp_path / "model"
        path.mkdir()
        for name in ("a", "b"):
            save_file({"w": torch.zeros(2)}, str(path / f"{name}.safetensors"))
    elif case == "unsupported suffix":
        path = tmp_path / "model.h5"
        path.write_bytes(b"\x89HDF\r\n")
    elif case == "missing file":
        path = tmp_path / "missing.safetensors"
    elif case == "newline in the name":
        path = tmp_path / "two\nlines.safetensors"
        path.write_bytes(b"")
    else:
        raise KeyError(case)
    return path


OTHER_CASES = ["no tensors", "only empty tensors", "directory without weights",
               "several weight files", "unsupported suffix", "missing file",
               "newline in the name"]

ALL_CHECKPOINT_CASES = ([("safetensors", c) for c in SAFETENSORS_CASES]
                        + [("index", c) for c in INDEX_CASES]
                        + [("torch", c) for c in TORCH_CASES]
                        + [("other", c) for c in OTHER_CASES])


@pytest.mark.parametrize("family, case", ALL_CHECKPOINT_CASES,
                         ids=[f"{f}: {c}" for f, c in ALL_CHECKPOINT_CASES])
def test_corrupt_checkpoint_is_refused_by_every_command(tmp_path, small_st, family, case):
    if family == "safetensors":
        bad = _corrupt_safetensors(tmp_path, *small_st, case)
    elif family == "index":
        bad = _bad_index(tmp_path, case)
    elif family == "torch":
        bad = _bad_torch(tmp_path, case)
    else:
        bad = _bad_other(tmp_path, case)
    before = digest(tmp_path / "outside.safetensors"), digest(bad)
    out, plan_file = tmp_path / "out", tmp_path / "plan.json"
    shown = str(bad).replace("\n", "\\n")  # control characters are escaped: still one line
    for args in (["compress", bad, out, "--rank", 4], ["analyze", bad],
                 ["plan", bad, "-o", plan_file, "--rank", 4]):
        line = assert_one_line_error(invoke(*args), BAD_INPUT)
        assert shown in line or str(bad.parent) in line, line  # names the file
        no_output_left(out)
        assert not plan_file.exists()
    assert (digest(tmp_path / "outside.safetensors"), digest(bad)) == before


# --------------------------------------------------------------------------------------------
# Pickles that would run code


@pytest.mark.parametrize("form", ["zip .pt", "legacy .bin", "shard of an index"])
def test_pickle_that_would_run_code_never_runs(tmp_path, monkeypatch, form):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    payload = {"w.weight": torch.randn(8, 8), "x": Evil(marker)}
    if form == "zip .pt":
        bad = tmp_path / "evil.pt"
        torch.save(payload, bad)
    elif form == "legacy .bin":
        bad = tmp_path / "pytorch_model.bin"  # the pre-zip torch.save format
        torch.save(payload, bad, _use_new_zipfile_serialization=False)
    else:
        bad = tmp_path / "model"
        bad.mkdir()
        torch.save(payload, bad / "pytorch_model-00001-of-00001.bin")
        (bad / "pytorch_model.bin.index.json").write_text(
            json.dumps({"weight_map": {"w.weight": "pytorch_model-00001-of-00001.bin"}}))
    before = digest(bad)
    for args in (["compress", bad, tmp_path / "out", "--rank", 4], ["analyze", bad]):
        assert_one_line_error(invoke(*args), BAD_INPUT, "refused to unpickle")
        assert not marker.exists(), "the pickle ran code"
    no_output_left(tmp_path / "out")
    assert digest(bad) == before


# --------------------------------------------------------------------------------------------
# Unusual but valid weights: no crash, sensible output


def _config(out: Path) -> dict:
    return json.loads((out / "lowrank_config.json").read_text())


def _finite_numbers(obj) -> bool:
    if isinstance(obj, float):
        return obj == obj and abs(obj) != float("inf")
    if isinstance(obj, dict):
        return all(_finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite_numbers(v) for v in obj)
    return True


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e300 (float64)"])
def test_nan_inf_weights_stay_dense_with_a_warning(tmp_path, value):
    """Decided behaviour: a policy keeps a NaN/Inf matrix dense and unchanged with one warning
    line (SVD of NaN is garbage; refusing would block the rest of the model); a plan that
    asks to factor it is an InputError naming the tensor. float64 values whose energy ‖W‖²
    overflows count as non-finite."""
    good = torch.randn(128, 96)
    if value == "1e300 (float64)":
        bad = torch.randn(64, 64, dtype=torch.float64) * 1e300
    else:
        bad = torch.randn(64, 64)
        bad[3, 5] = float(value)
    path = tmp_path / "nan.safetensors"
    save_file({"bad.weight": bad, "good.weight": good}, str(path))
    before = digest(path)
    for policy in (["--rank", 4], ["--param-ratio", 0.9]):
        out = tmp_path / f"out{policy[0]}"
        result = invoke("compress", path, out, *policy, "--json")
        assert result.exit_code == 0, result.output
        assert "warning: bad.weight holds NaN/Inf" in result.stderr
        layers = _config(out)["layers"]
        assert layers["bad.weight"]["rank"] is None and layers["good.weight"]["rank"] is not None
        written = load_file(str(out / "model.safetensors"))["bad.weight"]
        assert torch.equal(written.isnan(), bad.isnan()) and torch.equal(
            written.nan_to_num(), bad.nan_to_num())
    analyzed = invoke("analyze", path, "--json")
    assert analyzed.exit_code == 0, analyzed.output
    rows = {r["name"]: r for r in json.loads(analyzed.stdout)["matrices"]}
    assert rows["bad.weight"]["finite"] is False and rows["good.weight"]["finite"] is True
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": {"bad.weight": {"rank": 4}}}))
    forced = invoke("compress", path, tmp_path / "forced", "--plan", plan)
    assert_one_line_error(forced, BAD_INPUT, "bad.weight: holds NaN/Inf and cannot be factored")
    no_output_left(tmp_path / "forced")
    assert digest(path) == before


@pytest.mark.parametrize("policy", [["--rank", 4, "--min-numel", 0], ["--energy", 0.9],
                                    ["--param-ratio", 0.6], ["--rank-fraction", 0.5]])
def test_all_zero_matrix_compresses(tmp_path, policy):
    path = tmp_path / "zero.safetensors"
    save_file({"z.weight": torch.zeros(64, 64), "x.weight": torch.randn(64, 48)}, str(path))
    out = tmp_path / "out"
    result = invoke("compress", path, out, *policy)
    assert result.exit_code == 0, result.output
    config = _config(out)
    assert _finite_numbers(config), config  # no NaN energy or error from 0/0
    z = config["layers"]["z.weight"]
    if z["rank"] is not None:
        assert z["energy"] == 1.0 and z["rel_error"] == 0.0
        tensors = load_file(str(out / "model.safetensors"))
        assert not (tensors["z.A"] @ tensors["z.B"]).any()
    analyzed = invoke("analyze", path)
    assert analyzed.exit_code == 0 and "z.weight" in analyzed.stdout


def test_one_by_n_and_n_by_one_matrices(tmp_path):
    path = tmp_path / "thin.safetensors"
    tensors = {"row.weight": torch.randn(1, 300), "col.weight": torch.randn(300, 1),
               "x.weight": torch.randn(128, 96)}
    save_file(tensors, str(path))
    for policy in (["--rank", 4, "--min-numel", 0], ["--energy", 0.9], ["--param-ratio", 0.9]):
        out = tmp_path / f"out{policy[0]}"
        result = invoke("compress", path, out, *policy)
        assert result.exit_code == 0, result.output
        layers = _config(out)["layers"]
        for name in ("row.weight", "col.weight"):
            assert layers[name]["rank"] is None and layers[name]["reason"]  # dense, with why
    plan = tmp_path / "plan.json"  # an explicit rank 1 is allowed and exact
    plan.write_text(json.dumps({"layers": {"row.weight": {"rank": 1}, "col.weight": {"rank": 1}}}))
    result = invoke("compress", path, tmp_path / "planned", "--plan", plan)
    assert result.exit_code == 0, result.output
    written = load_file(str(tmp_path / "planned" / "model.safetensors"))
    assert torch.allclose(written["row.A"] @ written["row.B"], tensors["row.weight"], atol=1e-5)
    assert invoke("analyze", path).exit_code == 0


def test_tied_weights_of_a_torch_checkpoint_are_written(tmp_path):
    """Two names sharing one storage (tied embeddings in a .bin) kept dense: safetensors
    refuses shared memory; the output holds the weight (once, the other name recorded as
    tied, or twice)."""
    shared = torch.randn(64, 48)
    path = tmp_path / "tied.pt"
    torch.save({"emb.weight": shared, "head.weight": shared, "x.weight": torch.randn(64, 64)},
               path)
    out = tmp_path / "out"
    result = invoke("compress", path, out, "--energy", 0.999)
    assert result.exit_code == 0, result.output
    written = load_file(str(out / "model.safetensors"))
    layers = _config(out)["layers"]
    assert torch.equal(written["emb.weight"], shared)
    assert layers["head.weight"].get("tied_to") == "emb.weight" or torch.equal(
        written["head.weight"], shared)


def test_save_tensors_writes_tensors_sharing_memory(tmp_path):
    shared = torch.randn(8, 8)
    save_tensors(tmp_path / "x.safetensors", {"a": shared, "b": shared, "c": shared[:4]}, {})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(back["a"], shared) and torch.equal(back["b"], shared)
    assert torch.equal(back["c"], shared[:4])


def test_complex_and_integer_tensors_are_carried_unchanged(tmp_path):
    path = tmp_path / "odd.pt"
    odd = {"c.weight": torch.randn(16, 16, dtype=torch.complex64),
           "i.weight": torch.arange(256).reshape(16, 16), "x.weight": torch.randn(64, 48)}
    torch.save(odd, path)
    result = invoke("compress", path, tmp_path / "out", "--rank", 4)
    assert result.exit_code == 0, result.output
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(written["c.weight"], odd["c.weight"])
    assert torch.equal(written["i.weight"], odd["i.weight"])


# --------------------------------------------------------------------------------------------
# Bad plan files


PLAN_CASES = {
    "not json": ("{layers", "not a readable plan file"),
    "non-utf8": (b"\xff\xfe", "not a readable plan file"),
    "deeply nested": ("[" * 100_000, "not a readable plan file"),
    "5000-digit integer": ('{"layers": {}, "n": 1' + "0" * 5000 + "}", "not a readable plan file"),
    "not an object": ("[1, 2]", "not a plan file"),
    "layers is a list": ('{"layers": []}', "not a plan file"),
    "unknown layer": ('{"layers": {"nope.weight": {"rank": 2}}}', "match no matrix"),
    "entry not an object": ('{"layers": {"fc1.weight": 4}}', "expected an object"),
    "rank too big": ('{"layers": {"fc1.weight": {"rank": 65}}}', "must be an integer in [1, 64]"),
    "rank zero": ('{"layers": {"fc1.weight": {"rank": 0}}}', "must be an integer"),
    "rank float": ('{"layers": {"fc1.weight": {"rank": 4.0}}}', "must be an integer"),
    "rank bool": ('{"layers": {"fc1.weight": {"rank": true}}}', "must be an integer"),
    "rank NaN": ('{"layers": {"fc1.weight": {"rank": NaN}}}', "must be an integer"),
    "shape is an int": ('{"layers": {"fc1.weight": {"shape": 5, "rank": 4}}}', "shape 5"),
    "shape differs": ('{"layers": {"fc1.weight": {"shape": [1, 2], "rank": 4}}}', "shape [1, 2]"),
    "reason not a string": ('{"layers": {"fc1.weight": {"rank": null, "reason": 5}}}',
                            '"reason" must be a string'),
    "policy is a list": ('{"layers": {"fc1.weight": {"rank": 4}}, "policy": [1]}',
                         '"policy" must be an object'),
    "policy is a string": ('{"layers": {}, "policy": "ab"}', '"policy" must be an object'),
    "newline in a name": ('{"layers": {"a\\nb": {"rank": 4}}}', "a\\nb"),
}


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_bad_plan_file(tmp_path, toy_checkpoint, case):
    text, fragment = PLAN_CASES[case]
    plan = tmp_path / "plan.json"
    plan.write_bytes(text if isinstance(text, bytes) else text.encode())
    before = digest(toy_checkpoint), digest(plan)
    out = tmp_path / "out"
    assert_one_line_error(invoke("compress", toy_checkpoint, out, "--plan", plan), BAD_INPUT,
                          fragment)
    no_output_left(out)
    assert (digest(toy_checkpoint), digest(plan)) == before


PIPELINE_CASES = {
    "not toml": ("stages = [", "not a valid pipeline file"),
    "non-utf8": (b"\xff\xfe", "not a valid pipeline file"),
    "5000-digit integer": ("a = 1" + "0" * 5000, "not a valid pipeline file"),
    "deeply nested": ("a = " + "[" * 5000 + "]" * 5000, "not a valid pipeline file"),
    "no stages": ("[plan]\nrank = 4", "needs a non-empty `stages"),
    "stages not names": ("stages = [{a = 1}]", "needs a non-empty `stages"),
    "unknown stage": ('stages = ["analyze", "shrink"]', "unknown stage(s) shrink"),
    "settings not a table": ('stages = ["analyze", "plan"]\nplan = 5', "must be a table"),
    "model not a path": ('model = 5\nstages = ["analyze"]', "must be strings"),
    "unknown setting": ('stages = ["analyze", "plan"]\n[plan]\nrank = 4\nranks = 5',
                        "unknown setting(s) ranks"),
    "bad policy value": ('stages = ["analyze", "plan"]\n[plan]\nenergy = 2.0', "energy must be"),
}


@pytest.mark.parametrize("case", list(PIPELINE_CASES))
def test_bad_pipeline_file(tmp_path, toy_checkpoint, case):
    text, fragment = PIPELINE_CASES[case]
    pipeline = tmp_path / "p.toml"
    pipeline.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "out"
    result = invoke("run", pipeline, "--model", toy_checkpoint, "--output", out)
    assert_one_line_error(result, BAD_INPUT, fragment)
    no_output_left(out)


def test_missing_plan_file(tmp_path, toy_checkpoint):
    result = invoke("compress", toy_checkpoint, tmp_path / "out", "--plan", tmp_path / "nope.json")
    assert_one_line_error(result, BAD_INPUT, "nope.json: cannot read")
    no_output_left(tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Output paths: unwritable, full disk, killed mid-write


def test_output_parent_is_a_file(tmp_path, toy_checkpoint):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    before = digest(toy_checkpoint)
    result = invoke("compress", toy_checkpoint, blocker / "out", "--rank", 4)
    assert_one_line_error(result, BAD_INPUT, "is not a directory")
    assert blocker.read_text() == "x" and digest(toy_checkpoint) == before
    exists_as_file = invoke("compress", toy_checkpoint, blocker, "--rank", 4)
    assert exists_as_file.exit_code == 2 and "is a file" in exists_as_file.stderr  # click: usage
    assert "Traceback" not in exists_as_file.output and blocker.read_text() == "x"


def test_read_only_output_directory(tmp_path, toy_checkpoint):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):  # root ignores the mode bits
            pytest.skip("running as root: chmod does not make a directory read-only")
        before = digest(toy_checkpoint)
        result = invoke("compress", toy_checkpoint, parent / "out", "--rank", 4)
        assert_one_line_error(result, BAD_INPUT, "permission denied")
        assert list(parent.iterdir()) == [] and digest(toy_checkpoint) == before
    finally:
        parent.chmod(0o755)


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_disk_full_in_process(tmp_path, toy_checkpoint, monkeypatch, cache):
    """Every write of a JSON file (plan, config, manifest, report; into the cache or OUTPUT's
    temporary sibling) hits ENOSPC after writing half its bytes."""
    real_write_text = pathlib.Path.write_text
    calls = []

    def full_disk(self, data, *args, **kwargs):
        if ".tmp-" in str(self):
            calls.append(self)
            real_write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
    out = tmp_path / "out"
    result = invoke("compress", toy_checkpoint, out, "--rank", 4,
                    *([] if cache else ["--no-cache"]))
    assert calls, "no write reached the simulated full disk"
    assert_one_line_error(result, LOWRANK_ERROR, "No space left on device")
    no_output_left(out)


def _lowrank_subprocess(args, env=None, wrapper: str = ""):
    """`lowrank ARGS` in a fresh Python, optionally after running ``wrapper`` code."""
    code = wrapper + "\nimport sys\nfrom lowrank.cli import main\nsys.argv[0] = 'lowrank'\nmain()\n"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


@pytest.mark.parametrize("limit", [2_000, 30_000])
def test_disk_full_for_real(tmp_path, toy_checkpoint, limit):
    """RLIMIT_FSIZE makes the kernel refuse writes past ``limit`` bytes (EFBIG, like ENOSPC) in
    every writer, the Rust safetensors one included; no root needed."""
    out = tmp_path / "out"
    before = digest(toy_checkpoint)
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing it.
    small_files = ("import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, "
                   f"({limit}, resource.RLIM_INFINITY))")
    proc = _lowrank_subprocess(["compress", toy_checkpoint, out, "--rank", 4, "--min-numel", 0,
                                "--no-cache"], wrapper=small_files)
    stdout, stderr = proc.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == LOWRANK_ERROR, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "File too large" in lines[0], stderr
    assert "Traceback" not in stderr and stdout == ""
    no_output_left(out)
    assert digest(toy_checkpoint) == before


# Pause a `lowrank` process at a chosen point of writing OUTPUT (an audit hook: no lowrank code
# is patched), so the test can SIGKILL it there deterministically.
PAUSE = """
import os, sys, time
_out, _at, _marker = os.environ["PAUSE_OUT"], os.environ["PAUSE_AT"], os.environ["PAUSE_MARKER"]
_paused = []
_tmp_prefix = os.path.join(os.path.dirname(_out), "." + os.path.basename(_out) + ".tmp-")
def _pause():
    _paused.append(1)
    with open(_marker, "w"):
        pass
    time.sleep(300)
def _hook(event, args):
    if _paused:
        return
    if (_at == "first write" and event == "open" and isinstance(args[0], (str, os.PathLike))
            and isinstance(args[1], str) and any(c in args[1] for c in "wax+")
            and os.path.dirname(os.fspath(args[0])).startswith(_tmp_prefix)):
        _pause()  # the first file written into OUTPUT's temporary sibling
    if (_at == "rename" and event == "os.rename"
            and _out in (os.fspath(args[0]), os.fspath(args[1]))):
        _pause()  # everything written; the first rename that touches OUTPUT is next
sys.addaudithook(_hook)
"""


def _wait_for(predicate, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} first: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.002)


@pytest.mark.parametrize("at, existing", [("first write", False), ("rename", False),
                                          ("rename", True)])
def test_killed_mid_write_leaves_no_partial_output(tmp_path, toy_checkpoint, at, existing):
    out = tmp_path / "out"
    if existing:  # a previous result being replaced with --overwrite must survive the kill
        assert invoke("compress", toy_checkpoint, out, "--rank", 2).exit_code == 0
    before, input_before = digest(out), digest(toy_checkpoint)
    marker = tmp_path / "paused"
    proc = _lowrank_subprocess(
        ["compress", toy_checkpoint, out, "--rank", 4, "--no-cache", "--overwrite"],
        env={"PAUSE_OUT": str(out), "PAUSE_AT": at, "PAUSE_MARKER": str(marker)}, wrapper=PAUSE)
    try:
        _wait_for(marker.exists, proc)
        assert digest(out) == before  # nothing visible at OUTPUT while writing
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert digest(out) == before and digest(toy_checkpoint) == input_before
    # The killed run's hidden temporary directory stays behind (it cannot clean up after
    # SIGKILL); the next run works and does not remove another process's leftover.
    leftovers = list(tmp_path.glob(".out.tmp-*"))
    assert len(leftovers) == 1
    assert invoke("compress", toy_checkpoint, out, "--rank", 4, "--overwrite").exit_code == 0
    assert _config(out)["layers"]["fc1.weight"]["rank"] == 4


def test_killed_while_writing_a_large_checkpoint(tmp_path):
    """No hook: the plain CLI on a 32 MB checkpoint, SIGKILLed as soon as its temporary
    directory appears (while it writes the big model.safetensors)."""
    path = tmp_path / "big.safetensors"
    save_file({"fc.weight": torch.randn(128, 128), "big": torch.zeros(8_000_000)}, str(path))
    before, out = digest(path), tmp_path / "out"
    proc = _lowrank_subprocess(["compress", path, out, "--rank", 4, "--no-cache"])
    try:
        _wait_for(lambda: any(tmp_path.glob(".out.tmp-*")), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and digest(path) == before


# --------------------------------------------------------------------------------------------
# Library level: the same refusals raise InputError with a one-line message naming the file


def test_input_errors_are_one_line_and_name_the_file(tmp_path, small_st):
    for case in SAFETENSORS_CASES:
        bad = _corrupt_safetensors(tmp_path, *small_st, case)
        with pytest.raises(InputError) as info:
            open_checkpoint(bad)
        assert "\n" not in str(info.value) and str(bad) in str(info.value), case


def test_save_tensors_reports_a_full_disk_as_oserror(tmp_path):
    """The Rust writer's I/O failure becomes an OSError with its errno (the CLI's one-line
    `error:` and exit 1), not an unexplained SafetensorError."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(OSError) as info:
            save_tensors(tmp_path / "x.safetensors", {"w": torch.zeros(1000)}, {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.errno == errno.EFBIG


# --------------------------------------------------------------------------------------------
# Fuzzing (hypothesis): reading a checkpoint and applying a plan either work or raise InputError


def _read_everything(path: Path) -> None:
    try:
        ckpt = open_checkpoint(path)
        for name in ckpt.names():
            ckpt.get(name)
    except InputError as e:
        assert "\n" not in str(e)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    save_file({"a.weight": torch.randn(4, 3), "b": torch.arange(5, dtype=torch.int32),
               "c": torch.randn(2, 2, dtype=torch.float16)}, str(d / "valid.safetensors"),
              metadata={"format": "pt"})
    torch.save({"a.weight": torch.randn(4, 3), "b": torch.arange(5)}, d / "valid.pt")
    torch.save({"a.weight": torch.randn(4, 3), "b": torch.arange(5)}, d / "legacy.pt",
               _use_new_zipfile_serialization=False)
    return d


mutation = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
)


def _mutate(raw: bytes, ops) -> bytes:
    data = bytearray(raw)
    for op in ops:
        if op[0] == "truncate":
            del data[op[1] % (len(data) + 1):]
        elif op[0] == "flip" and data:
            data[op[1] % len(data)] = op[2]
        elif op[0] == "insert":
            at = op[1] % (len(data) + 1)
            data[at:at] = op[2]
        elif op[0] == "length":
            data[:8] = op[1].to_bytes(8, "little")
    return bytes(data)


@FUZZ
@given(ops=st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_mutated_safetensors(fuzz_dir, ops):
    path = fuzz_dir / "mutated.safetensors"
    path.write_bytes(_mutate((fuzz_dir / "valid.safetensors").read_bytes(), ops))
    _read_everything(path)


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(source=st.sampled_from(["valid.pt", "legacy.pt"]),
       ops=st.lists(mutation, min_size=1, max_size=3))
def test_fuzz_mutated_torch_file(fuzz_dir, source, ops):
    """Zip and legacy torch.save files; torch's weights-only unpickler parses the bytes."""
    path = fuzz_dir / "mutated.pt"
    path.write_bytes(_mutate((fuzz_dir / source).read_bytes(), ops))
    _read_everything(path)


DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3",
          "F8_E5M2", "U16", "U32", "U64", "C64", "X1"]
small_int = st.integers(-2, 40) | st.integers(-2**64, 2**64)
tensor_entry = st.fixed_dictionaries(
    {"dtype": st.sampled_from(DTYPES) | st.text(max_size=4),
     "shape": st.lists(small_int, max_size=3) | st.none(),
     "data_offsets": st.lists(small_int, min_size=0, max_size=3)},
    optional={"extra": st.integers() | st.text(max_size=3)})
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                      children, max_size=4),
    max_leaves=12)


@FUZZ
@given(header=st.dictionaries(st.text(max_size=6), tensor_entry | json_values, max_size=4),
       data=st.binary(max_size=200), length_delta=st.sampled_from([0, 0, 0, -1, 1, 9]))
def test_fuzz_random_safetensors_header(fuzz_dir, header, data, length_delta):
    raw = json.dumps(header).encode()
    path = fuzz_dir / "random.safetensors"
    path.write_bytes(st_bytes(raw, data, length=max(0, len(raw) + length_delta)))
    _read_everything(path)


@pytest.fixture(scope="module")
def toy_spectra(tmp_path_factory):
    d = tmp_path_factory.mktemp("spectra")
    save_file({"fc1.weight": torch.randn(96, 64), "fc2.weight": torch.randn(32, 96),
               "nan.weight": torch.full((8, 8), float("nan")), "fc1.bias": torch.randn(96)},
              str(d / "m.safetensors"))
    return d / "m.safetensors", analyze(open_checkpoint(d / "m.safetensors"))


NAMES = ["fc1.weight", "fc2.weight", "nan.weight", "fc1.bias", "other"]
plan_entry = st.fixed_dictionaries(
    {}, optional={"rank": st.integers(-3, 100) | json_values,
                  "shape": st.sampled_from([[96, 64], [32, 96], [8, 8]]) | json_values,
                  "reason": st.text(max_size=10) | json_values,
                  "energy": json_values}) | json_values
plan_json = st.fixed_dictionaries(
    {"layers": st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=6), plan_entry,
                               max_size=4) | json_values},
    optional={"policy": json_values, "format": json_values, "params": json_values}) | json_values


@FUZZ
@given(data=plan_json)
def test_fuzz_plan_parsing(toy_spectra, tmp_path_factory, data):
    """read_plan_file + apply_plan (what `compress --plan FILE` runs) accept or raise InputError."""
    _, spectra = toy_spectra
    path = tmp_path_factory.getbasetemp() / "fuzz-plan.json"
    path.write_text(json.dumps(data))
    try:
        plan = apply_plan(read_plan_file(path), spectra, str(path))
    except InputError as e:
        assert "\n" not in str(e)
        return
    json.dumps(plan.to_json())  # an accepted plan serializes (cache, OUTPUT/plan.json)
    assert all(p.rank is None or isinstance(p.rank, int) for p in plan.layers.values())
    assert all(p.reason is None or isinstance(p.reason, str) for p in plan.layers.values())


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=plan_json)
def test_fuzz_plan_through_the_cli(toy_spectra, tmp_path_factory, data):
    """End to end, including the summary printed after a plan was accepted."""
    model, _ = toy_spectra
    base = tmp_path_factory.getbasetemp()
    path, out = base / "fuzz-cli-plan.json", base / "fuzz-cli-out"
    path.write_text(json.dumps(data))
    result = invoke("compress", model, out, "--plan", path, "--overwrite", "--no-cache")
    if result.exit_code == 0:
        assert out.is_dir()
        return
    assert_one_line_error(result, BAD_INPUT)


def test_read_json_file_errors(tmp_path):
    for text in ("[" * 100_000, '{"n": 1' + "0" * 5000 + "}", "\ud800"):
        path = tmp_path / "x.json"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        with pytest.raises(InputError):
            read_json_file(path, "plan file")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_run_leaves_no_scratch(tmp_path, toy_checkpoint, sig, code):
    """SIGTERM (a CI job cancelled) or Ctrl-C while factorize streams its scratch files beside
    OUTPUT: the run stops with 128+signal, and neither OUTPUT nor scratch is left."""
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import signal, sys, time
        # Ctrl-C raises KeyboardInterrupt, as in a terminal, also when this test runs in a
        # background job (whose children start with SIGINT ignored).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import lowrank.stages.factorize as factorize
        real = factorize.factor_task
        def slow(*args):
            sys.stdout.write("factoring\\n")  # one write: tasks of the thread pool print at once
            sys.stdout.flush()
            time.sleep(60)
            return real(*args)
        factorize.factor_task = slow
        from lowrank.cli import main
        sys.argv = ["lowrank", "compress", {str(toy_checkpoint)!r}, {str(out)!r}, "--rank", "4",
                    "--min-numel", "0", "--no-cache"]
        main()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert proc.stdout.readline().startswith("factoring")
    assert list(tmp_path.glob(".lowrank-factorize-*"))  # the scratch this test is about
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not out.exists() and left == [], left
