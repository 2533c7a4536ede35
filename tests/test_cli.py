import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lowrank.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tree_digest(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f).encode() + f.read_bytes())
    return h.hexdigest()


def test_compress_json_summary(tmp_path, toy_checkpoint):
    result = invoke("compress", toy_checkpoint, tmp_path / "out", "--rank", 8, "--min-numel", 0,
                    "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layers"]["fc1.weight"]["rank"] == 8
    assert summary["params"]["after"] < summary["params"]["before"]
    assert summary["bytes"]["after"] == (tmp_path / "out" / "model.safetensors").stat().st_size


def test_plan_edit_and_reapply(tmp_path, toy_checkpoint):
    plan_file = tmp_path / "plan.json"
    assert invoke("plan", toy_checkpoint, "-o", plan_file, "--rank", 8, "--min-numel", 0).exit_code == 0
    data = json.loads(plan_file.read_text())
    data["layers"]["fc2.weight"]["rank"] = 5
    plan_file.write_text(json.dumps(data))
    result = invoke("compress", toy_checkpoint, tmp_path / "out", "--plan", plan_file, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layers"]["fc2.weight"]["rank"] == 5


def test_analyze_json_and_table(tmp_path, toy_checkpoint):
    result = invoke("analyze", toy_checkpoint, "--json", tmp_path / "a.json")
    assert result.exit_code == 0 and "fc1.weight" in result.stdout
    rows = json.loads((tmp_path / "a.json").read_text())["matrices"]
    assert {r["name"] for r in rows} == {"emb.weight", "conv.weight", "fc1.weight", "fc2.weight"}


def test_run_pipeline_file(tmp_path, toy_checkpoint):
    pipe = tmp_path / "p.toml"
    pipe.write_text('stages = ["analyze", "plan", "factorize"]\n[plan]\nrank = 4\nmin_numel = 0\n')
    result = invoke("run", pipe, "--model", toy_checkpoint, "--output", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layers"]["fc1.weight"]["rank"] == 4


def test_nan_weight_is_kept_dense_with_a_warning(tmp_path, toy_model):
    sd = {k: v.clone() for k, v in toy_model.state_dict().items()}
    sd["fc1.weight"][0, 0] = float("inf")
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path))
    result = invoke("compress", path, tmp_path / "out", "--rank", 8, "--min-numel", 0)
    assert result.exit_code == 0, result.output
    assert "warning: fc1.weight holds NaN/Inf" in result.stderr
    config = json.loads((tmp_path / "out" / "lowrank_config.json").read_text())
    assert config["layers"]["fc1.weight"]["rank"] is None


def _bad_cases(tmp_path, toy_checkpoint):
    """(name, argv without OUTPUT, expected message fragment, input to keep unchanged)."""
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(toy_checkpoint.read_bytes()[: toy_checkpoint.stat().st_size // 2])
    empty_dir = tmp_path / "noweights"
    empty_dir.mkdir()
    (empty_dir / "config.json").write_text("{}")
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    save_file({"w": torch.zeros(4, 4)}, str(shard_dir / "a.safetensors"))
    (shard_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "a.safetensors", "v": "b.safetensors"}}))
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "f": print}, evil)
    unknown_plan = tmp_path / "unknown.json"
    unknown_plan.write_text(json.dumps({"layers": {"nope.weight": {"rank": 2}}}))
    big_plan = tmp_path / "big.json"
    big_plan.write_text(json.dumps({"layers": {"fc2.weight": {"rank": 97}}}))
    return [
        ("missing", [tmp_path / "missing.safetensors"], "no such file", None),
        ("no weights", [empty_dir], "no weights found", empty_dir),
        ("truncated", [cut], "not a valid safetensors file", cut),
        ("missing shard", [shard_dir], "missing shard(s): b.safetensors", shard_dir),
        ("unsafe pickle", [evil], "refused to unpickle", evil),
        ("unknown plan layer", [toy_checkpoint, "--plan", unknown_plan], "match no matrix", toy_checkpoint),
        ("rank too big", [toy_checkpoint, "--plan", big_plan], "rank 97 must be an integer in [1, 32]", toy_checkpoint),
        ("bad policy", [toy_checkpoint, "--energy", 2], "energy must be in (0, 1]", toy_checkpoint),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_input_one_line_error_no_output_input_unchanged(tmp_path, toy_checkpoint, case):
    name, args, fragment, keep = _bad_cases(tmp_path, toy_checkpoint)[case]
    before = tree_digest(keep) if keep else None
    out = tmp_path / "out"
    result = invoke("compress", args[0], out, *args[1:])
    assert result.exit_code == 3, (name, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], (name, result.stderr)
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.tmp*"))
    if keep:
        assert tree_digest(keep) == before


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_output_overlapping_input_is_refused(tmp_path, toy_checkpoint, where):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(toy_checkpoint.read_bytes())
    before = tree_digest(model_dir)
    output = {"same": model_dir, "inside": model_dir / "out", "contains": tmp_path}[where]
    result = invoke("compress", model_dir, output, "--rank", 4, "--overwrite")
    assert result.exit_code == 3 and "would overwrite the input" in result.stderr
    assert tree_digest(model_dir) == before


def test_existing_output_needs_overwrite(tmp_path, toy_checkpoint):
    out = tmp_path / "out"
    assert invoke("compress", toy_checkpoint, out, "--rank", 4).exit_code == 0
    again = invoke("compress", toy_checkpoint, out, "--rank", 4)
    assert again.exit_code == 3 and "--overwrite" in again.stderr
    assert invoke("compress", toy_checkpoint, out, "--rank", 2, "--overwrite").exit_code == 0


def test_usage_error_exit_code(toy_checkpoint):
    assert invoke("compress", toy_checkpoint).exit_code == 2


@pytest.mark.parametrize("args, message", [
    (["--sequential"], "--sequential needs --calibration"),
    (["--recover-steps", "5"], "--recover-* options need --recover"),
    (["--recover", "lora"], "run the model, and this checkpoint has no architecture"),
])
def test_data_flags_need_what_they_need(tmp_path, toy_checkpoint, args, message):
    result = CliRunner().invoke(main, ["compress", str(toy_checkpoint), str(tmp_path / "o"), *args])
    assert result.exit_code in (2, 3) and message in result.output + result.stderr
    assert not (tmp_path / "o").exists()


def test_max_shard_size_writes_shards_that_load_and_report(tmp_path, toy_checkpoint, toy_model):
    """Outputs over --max-shard-size are shards + index (transformers' layout); lowrank.load
    and the report read them whole."""
    import lowrank
    from tests.conftest import ToyNet

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    args = ("--rank", 8, "--min-numel", 0, "--no-cache")
    assert invoke("compress", toy_checkpoint, single, *args).exit_code == 0
    result = invoke("compress", toy_checkpoint, sharded, *args, "--max-shard-size", "20KB",
                    "--json")
    assert result.exit_code == 0, result.output
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    per_shard = {s.name: sum(v == s.name for v in index["weight_map"].values()) for s in shards}
    header = 1_000  # each file's JSON header comes on top of the data
    assert all(s.stat().st_size <= 20_000 + header or per_shard[s.name] == 1 for s in shards)
    report = json.loads(result.stdout)
    assert report["bytes"]["after"] == sum(s.stat().st_size for s in shards)
    ids = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        expected = lowrank.load(single, ToyNet())(ids)
        torch.testing.assert_close(lowrank.load(sharded, ToyNet())(ids), expected)
    bad = invoke("compress", toy_checkpoint, tmp_path / "bad", *args, "--max-shard-size", "lots")
    assert bad.exit_code == 3 and "max_shard_size 'lots'" in bad.stderr
    assert bad.stderr.count("\n") == 1 and not (tmp_path / "bad").exists()


def test_warnings_are_one_line_and_name_their_setting(tmp_path, tiny_bert_dir):
    """lowrank's warnings print as one `warning:` line, without Python's category and source
    line; the fewer-samples warning names the setting that asked (calibration, recovery)."""
    few = tmp_path / "few.txt"
    few.write_text("one line of text\nanother line of text\n")
    result = invoke("compress", tiny_bert_dir, tmp_path / "out", "--rank", 4, "--calibration",
                    few, "--calibration-samples", 256, "--recover", "lora", "--recover-steps", 1,
                    "--recover-text", few, "--recover-samples", 1024, "--no-cache")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert f"warning: {few}: 2 calibration samples, fewer than the 256 asked for; using all of " \
           f"them" in lines
    assert f"warning: {few}: 2 recovery samples, fewer than the 1024 asked for; using all of " \
           f"them" in lines
    assert "UserWarning" not in result.stderr and "warnings.warn" not in result.stderr
    # The defaults ask for no line count: calibration takes lines up to a token budget,
    # recovery every line (up to recovery_text.MAX_SAMPLES)
    default = invoke("compress", tiny_bert_dir, tmp_path / "out2", "--rank", 4, "--calibration",
                     few, "--recover", "lora", "--recover-steps", 1, "--recover-text", few,
                     "--no-cache")
    assert default.exit_code == 0 and "samples" not in default.stderr
