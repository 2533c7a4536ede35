"""Recovery within a time budget (steps chosen from the measured step time, on an injected
clock) and block-wise distillation, on tiny randomly initialized HF models."""

import json

import pytest
import torch

import lowrank
from lowrank.io.samples import model_batches, read_calibration_text
from lowrank.models import load_dense
from lowrank.nn.adapters import add_adapters_
from lowrank.stages.blockwise import blockwise_distill
from lowrank.stages.budget import steps_to_fit, train_steps
from lowrank.stages.recover import RecoverSettings, distill
from tests.test_cli import invoke
from tests.test_recover import compress


class FakeClock:
    """Time moves only when the code under test says work was done."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("step_seconds", [0.5, 0.25, 0.1])
def test_step_count_follows_the_measured_step_time(step_seconds):
    clock, weight = FakeClock(), torch.nn.Parameter(torch.ones(3))

    def step_loss(step):
        clock.now += step_seconds
        return weight.pow(2).sum()

    losses = train_steps([weight], step_loss, 0.1, None, seconds=10, clock=clock)
    assert len(losses) == round(10 / step_seconds)
    assert clock.now <= 10 + 1e-9
    assert losses[-1] < losses[0]


def test_steps_of_varying_length_fill_the_budget():
    """Batches of different lengths: slow steps first must not end training early."""
    clock, weight = FakeClock(), torch.nn.Parameter(torch.ones(3))
    step_times = [1.0, 1.0, 1.0] + [0.2, 0.6] * 100  # mean 0.4 s after the first three

    def step_loss(step):
        clock.now += step_times[step]
        return weight.pow(2).sum()

    train_steps([weight], step_loss, 0.1, None, seconds=20, clock=clock)
    assert 20 - 0.6 < clock.now <= 20 + 1e-9


def test_fixed_steps_win_over_the_budget():
    clock, weight = FakeClock(), torch.nn.Parameter(torch.ones(3))

    def step_loss(step):
        clock.now += 1.0
        return weight.pow(2).sum()

    assert len(train_steps([weight], step_loss, 0.1, 7, seconds=2, clock=clock)) == 7
    assert steps_to_fit(10, 2.5, 3) == 7 and steps_to_fit(-1, 2.5, 3) == 3


def _models(model_dir, tmp_path):
    # plain factors: compensated ones leave the blocks less to learn than this test asks for
    out = compress(model_dir, tmp_path, factorize={"compensate": False}).output
    return lowrank.load(out), load_dense(model_dir)


def _batches(model_dir, samples=16):
    from transformers import AutoTokenizer

    texts = read_calibration_text(None, samples)
    return list(model_batches(texts, AutoTokenizer.from_pretrained(model_dir), 8, 32))


def test_budgeted_distillation_stops_at_the_budget(tiny_llama_dir, tmp_path):
    """minutes=0.02 on a clock that advances 0.05 s per forward pass of the student: the held-out
    loss is measured twice and the steps fill the rest, within one step of the budget."""
    student, teacher = _models(tiny_llama_dir, tmp_path)
    clock, forward_s = FakeClock(), 0.05

    def tick(module, args, output):
        clock.now += forward_s

    student.register_forward_hook(tick)
    from transformers import AutoTokenizer

    settings = RecoverSettings(method="lora", rank=4, minutes=0.02, samples=64, batch_size=8,
                               max_length=32, mode="end-to-end")
    log = distill(student, teacher, AutoTokenizer.from_pretrained(tiny_llama_dir),
                  read_calibration_text(None, 64), settings, clock=clock)
    held = 1  # one batch held back
    assert log.steps == round((0.02 * 60 - 2 * held * forward_s) / forward_s)
    assert log.seconds <= 0.02 * 60 + forward_s
    assert log.to_json()["tokens_per_second"] > 0


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_bert_dir"])
def test_blockwise_training_lowers_every_blocks_error(model, request, tmp_path):
    model_dir = request.getfixturevalue(model)
    student, teacher = _models(model_dir, tmp_path)
    trainable = add_adapters_(student, RecoverSettings(method="lora", rank=4))
    records = blockwise_distill(student, teacher, _batches(model_dir), trainable, 1e-2,
                                seconds=0, steps=15)
    assert len(records) == 2
    for record in records:
        assert record.steps == 15
        assert record.loss_after < 0.9 * record.loss_before, record


def test_blockwise_needs_blocks(toy_model):
    from lowrank.errors import InputError
    from lowrank.stages.blockwise import find_blocks

    with pytest.raises(InputError, match="end-to-end"):
        find_blocks(toy_model)


def test_cli_recovers_a_causal_lm_blockwise_within_minutes(tiny_llama_dir, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("\n".join(read_calibration_text(None, 64)) + "\n")
    out = tmp_path / "out"
    result = invoke("compress", tiny_llama_dir, out, "--rank", "8", "--calibration", text,
                    "--calibration-samples", "64", "--recover", "lora",
                    "--recover-mode", "blockwise", "--recover-minutes", "0.5", "--recover-steps", "3",
                    "--recover-batch-size", "8",
                    "--json",
                    tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    recovery = json.loads((tmp_path / "r.json").read_text())["recovery"]
    assert recovery["mode"] == "blockwise"
    assert recovery["settings"]["calibration_file"] == str(text)
    assert recovery["settings"]["minutes"] == 0.5  # recorded, but explicit steps win:
    assert recovery["block_steps"] == 2 * 3 and recovery["steps"] == 3  # per block, then 3
    assert recovery["tokens_per_second"] > 0
    assert [b["block"] for b in recovery["blocks"]] == ["model.layers.0", "model.layers.1"]
    assert lowrank.load(out)(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


@pytest.mark.parametrize("bad", [{"mode": "layerwise"}, {"minutes": 0}, {"final_share": 1.0},
                                 {"samples": 0}, {"steps": 0}])
def test_bad_recovery_settings_are_one_line_errors(bad):
    from lowrank.errors import InputError

    with pytest.raises(InputError):
        RecoverSettings(**bad)
    assert RecoverSettings(mode="blockwise").mode == "blockwise"
