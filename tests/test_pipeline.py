import json
from pathlib import Path

import pytest
import torch

import lowrank
from lowrank.errors import InputError
from lowrank.pipeline import default_pipeline, read_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def spec_with(**plan):
    spec = default_pipeline()
    spec.settings["plan"] = dict(plan)
    return spec


def test_default_toml_is_the_built_in_default():
    from_file = read_pipeline(ROOT / "pipelines" / "default.toml")
    built_in = default_pipeline()
    assert (from_file.stages, from_file.settings) == (built_in.stages, built_in.settings)


def test_run_writes_output_and_load_matches_reconstructed_dense(tmp_path, toy_checkpoint, toy_model):
    out = tmp_path / "out"
    result = run_pipeline(spec_with(rank=8, min_numel=0), toy_checkpoint, out, cache_dir=tmp_path / "c")
    assert {"model.safetensors", "lowrank_config.json", "plan.json", "manifest.json"} <= {
        p.name for p in out.iterdir()}
    config = json.loads((out / "lowrank_config.json").read_text())
    assert config["rank_pattern"]["^fc1$"] == 8
    model = lowrank.load(out, model=type(toy_model)())
    assert isinstance(model.fc1, lowrank.LowRankLinear) and isinstance(model.conv, lowrank.LowRankConv)
    dense = type(toy_model)()
    from safetensors.torch import load_file
    dense.load_state_dict(lowrank.reconstruct_dense(load_file(str(out / "model.safetensors")), config))
    ids = torch.randint(0, 200, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), dense.eval()(ids), atol=1e-5, rtol=1e-5)
    assert result.manifest["stages"][0]["cached"] is False


def test_rerun_skips_finished_stages_and_plan_change_reruns_from_plan(tmp_path, toy_checkpoint):
    cache = tmp_path / "cache"
    run_pipeline(spec_with(rank=8, min_numel=0), toy_checkpoint, tmp_path / "a", cache_dir=cache)
    again = run_pipeline(spec_with(rank=8, min_numel=0), toy_checkpoint, str(tmp_path / "b"),
                         cache_dir=str(cache))  # paths as strings work alike
    assert [s["cached"] for s in again.manifest["stages"]] == [True, True, True]
    changed = run_pipeline(spec_with(rank=4, min_numel=0), toy_checkpoint, tmp_path / "c", cache_dir=cache)
    assert [s["cached"] for s in changed.manifest["stages"]] == [True, False, False]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors").read_bytes()


def test_same_inputs_give_byte_identical_output_without_cache(tmp_path, toy_checkpoint):
    spec = spec_with(rank=8, min_numel=0)
    spec.settings["factorize"] = {"method": "randomized", "seed": 1}
    for name in ("a", "b"):
        run_pipeline(spec, toy_checkpoint, tmp_path / name, cache_dir=None)
    for file in ("model.safetensors", "lowrank_config.json", "plan.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_plan_file_content_is_part_of_the_cache_key(tmp_path, toy_checkpoint):
    cache = tmp_path / "cache"
    run_pipeline(spec_with(rank=8, min_numel=0), toy_checkpoint, tmp_path / "a", cache_dir=cache)
    plan_file = tmp_path / "plan.json"
    data = json.loads((tmp_path / "a" / "plan.json").read_text())
    plan_file.write_text(json.dumps(data))
    first = run_pipeline(spec_with(plan_file=str(plan_file)), toy_checkpoint, tmp_path / "b", cache_dir=cache)
    data["layers"]["fc1.weight"]["rank"] = 3
    plan_file.write_text(json.dumps(data))
    second = run_pipeline(spec_with(plan_file=str(plan_file)), toy_checkpoint, tmp_path / "c", cache_dir=cache)
    assert first.artifacts["plan"].layers["fc1.weight"].rank == 8
    assert second.artifacts["plan"].layers["fc1.weight"].rank == 3


def test_pipeline_file_errors(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('stages = ["analyze", "quantize"]\n')
    with pytest.raises(InputError, match="unknown stage.*quantize"):
        read_pipeline(bad)
    bad.write_text('stages = ["analyze"]\n[analyze]\nexact_max = 3\n')
    from lowrank.pipeline.spec import make_settings
    from lowrank.pipeline.stage import STAGES
    with pytest.raises(InputError, match="unknown setting.*exact_max"):
        make_settings(read_pipeline(bad), STAGES["analyze"])
    bad.write_text("stages = [")
    with pytest.raises(InputError, match="not a valid pipeline file"):
        read_pipeline(bad)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "pipelines").glob("*.toml")),
                         ids=lambda p: p.name)
def test_shipped_pipeline_files_are_valid(path):
    from lowrank.pipeline import read_pipeline
    from lowrank.pipeline.spec import make_settings
    from lowrank.pipeline.stage import STAGES

    spec = read_pipeline(path)
    for name in spec.stages:
        make_settings(spec, STAGES[name])


def test_only_the_last_checkpoint_stage_writes_output(tmp_path, tiny_bert_dir, monkeypatch):
    """factorize and recover both provide the checkpoint; OUTPUT gets recover's alone, written
    once, and the ONNX export is a file on disk, never bytes held in memory."""
    import lowrank.stages.factorize as factorize
    import lowrank.stages.recover as recover

    written = []
    for module in (factorize, recover):
        real = module.save_lowrank
        monkeypatch.setattr(module, "save_lowrank", lambda artifact, d, *rest, name=module.__name__,
                            real=real: (written.append(name), real(artifact, d, *rest)))
    spec = default_pipeline()
    spec.stages = ["calibrate", *spec.stages, "recover", "export"]
    spec.settings.update({"calibrate": {"samples": 32}, "plan": {"rank": 8},
                          "recover": {"steps": 2, "samples": 32, "batch_size": 8}})
    result = run_pipeline(spec, tiny_bert_dir, tmp_path / "out", cache_dir=None)
    assert written == ["lowrank.stages.recover"]
    assert "recovery" in json.loads((tmp_path / "out" / "lowrank_config.json").read_text())
    onnx = result.artifacts["export"]
    assert onnx.path.is_file() and not hasattr(onnx, "files")
    result.release()
    assert not onnx.path.exists()  # scratch beside OUTPUT, gone with the run


def test_artifact_format_versions_are_checked(tmp_path, toy_checkpoint):
    """A plan, a lowrank output or a report from a newer lowrank is refused with a clear
    error; an older one is read with a warning."""
    from lowrank.stages.factored import read_lowrank_config
    from lowrank.stages.plan import read_plan_file
    from lowrank.stages.report import read_report

    out = tmp_path / "out"
    run_pipeline(spec_with(rank=4, min_numel=0), toy_checkpoint, out, cache_dir=None)
    for name, read, key in (("plan.json", read_plan_file, "version"),
                            ("lowrank_config.json", lambda p: read_lowrank_config(p.parent),
                             "format_version"),
                            ("report.json", read_report, "version")):
        data = json.loads((out / name).read_text())
        (tmp_path / name).parent.mkdir(exist_ok=True)
        for version, outcome in ((99, "newer"), (0, "older")):
            copy = tmp_path / f"v{version}" / name
            copy.parent.mkdir(exist_ok=True)
            copy.write_text(json.dumps({**data, key: version}))
            if outcome == "newer":
                with pytest.raises(InputError, match="newer than this lowrank reads"):
                    read(copy)
            else:
                with pytest.warns(lowrank.LowrankWarning, match="older"):
                    read(copy)


def test_recovery_trains_on_the_calibration_text_unless_told_otherwise():
    spec = lowrank.compress_spec(calibration_file="mine.txt", recover_method="lora")
    assert spec.settings["recover"]["calibration_file"] == "mine.txt"
    spec = lowrank.compress_spec(calibration_file="mine.txt", recover_method="lora",
                                 recover={"calibration_file": "other.txt"})
    assert spec.settings["recover"]["calibration_file"] == "other.txt"
    bundled = lowrank.compress_spec(calibration_file="", recover_method="lora")
    assert "calibration_file" not in bundled.settings["recover"]  # the bundled text


def test_the_seed_also_seeds_the_measured_loss_scores():
    seeded = lowrank.compress_spec(calibration_file="mine.txt", plan={"param_ratio": 0.8},
                                   factorize={"seed": 3})
    assert "scores" in seeded.stages and seeded.settings["scores"]["seed"] == 3
    assert seeded.settings["factorize"]["seed"] == 3
    default = lowrank.compress_spec(calibration_file="mine.txt", plan={"param_ratio": 0.8})
    assert "seed" not in default.settings.get("scores", {})
