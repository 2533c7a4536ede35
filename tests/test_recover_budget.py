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
    held = log.heldout_batches  # the batches held back, measured before and after
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
                                 {"samples": 0}, {"steps": 0}, {"replace_share": 1.0},
                                 {"replace_share": -0.1}, {"replace_share": "0.1"}])
def test_bad_recovery_settings_are_one_line_errors(bad):
    from lowrank.errors import InputError

    with pytest.raises(InputError):
        RecoverSettings(**bad)
    assert RecoverSettings(mode="blockwise").mode == "blockwise"


def test_token_replacement_keeps_special_tokens_and_padding():
    """About `share` of the real tokens are replaced, each by a real, non-special token of the
    same batch; special tokens, padding and the caller's batch stay as they are; share 0 is a
    no-op; the same generator seed draws the same batch."""
    from lowrank.io.samples import replace_tokens

    ids = torch.arange(1000, 1000 + 64 * 32).reshape(64, 32)  # distinct: a change shows
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[::2, 20:] = False  # padded rows
    ids[~mask] = 0
    batch = {"input_ids": ids.clone(), "attention_mask": mask.long()}
    special = torch.tensor([0, 101, 102])
    out = replace_tokens(batch, mask, 0.3, special, torch.Generator().manual_seed(0))
    assert torch.equal(batch["input_ids"], ids)  # not modified in place
    assert out["attention_mask"] is batch["attention_mask"]
    new = out["input_ids"]
    real = mask & ~torch.isin(ids, special)
    assert torch.equal(new[~real], ids[~real])
    changed = new != ids
    assert 0.25 < changed[real].float().mean() < 0.35
    assert torch.isin(new[changed], ids[real]).all()
    again = replace_tokens(batch, mask, 0.3, special, torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], new)
    assert replace_tokens(batch, mask, 0.0, special, torch.Generator()) is batch
    assert replace_tokens(batch, None, 0.3, special, torch.Generator()) is batch


def test_teacher_and_student_see_the_same_replaced_batch(tiny_bert_dir, monkeypatch):
    """Each training step feeds teacher and student one batch with tokens replaced, a new draw
    per step; the held-out batch is measured as it is."""
    from transformers import AutoTokenizer

    from lowrank.stages import recover

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    teacher, student = load_dense(tiny_bert_dir), load_dense(tiny_bert_dir)
    lowrank.factorize_(student, {"encoder.layer.0.intermediate.dense.weight": 4})
    seen = []
    real_loss = recover.distillation_loss

    def spy(student_out, teacher_out, mask, kind, pooled_weight=0.0):
        seen.append(calls[-2:])
        return real_loss(student_out, teacher_out, mask, kind, pooled_weight)

    calls = []
    for model, name in ((teacher, "teacher"), (student, "student")):
        model.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: calls.append((name, kwargs["input_ids"].clone())),
            with_kwargs=True)
    monkeypatch.setattr(recover, "distillation_loss", spy)
    texts = read_calibration_text(None, 64)
    log = recover.distill(student, teacher, tokenizer, texts,
                          RecoverSettings(steps=3, batch_size=16, replace_share=0.5))
    assert log.to_json()["settings"]["replace_share"] == 0.5
    def unpadded(row):
        return tuple(t for t in row.tolist() if t != tokenizer.pad_token_id)

    original = {unpadded(ids) for b, _ in model_batches(texts, tokenizer, 16, 128)
                for ids in b["input_ids"]}
    held = log.heldout_batches  # their loss measured before and after
    train = seen[held:-held]
    assert len(train) == 3
    for (first, a), (second, b) in train:
        assert {first, second} == {"teacher", "student"} and torch.equal(a, b)
        assert any(unpadded(row) not in original for row in a)  # replaced
    for (_, a), _ in seen[:held] + seen[-held:]:
        assert all(unpadded(row) in original for row in a)  # held out as it is


def test_a_token_cap_gives_long_lines_smaller_batches_and_leaves_even_text_whole(tiny_llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    short = [" ".join(["word"] * (2 + i % 3)) for i in range(24)]  # 3-5 tokens (median 4)
    long = [" ".join(["word"] * 40)] * 6

    def shapes(lines, cap):
        return [tuple(inputs["input_ids"].shape)
                for inputs, _ in model_batches(lines, tokenizer, 8, 64, by_length=True,
                                               token_cap=cap)]

    assert shapes(short, 2.0) == shapes(short, None)  # even text: the same whole batches
    capped = shapes(short + long, 2.0)
    assert capped[:3] == shapes(short, None)
    lengths = sorted(len(ids) for ids in tokenizer(short + long)["input_ids"])
    most = 2.0 * 8 * lengths[len(lengths) // 2]  # 2 × the tokens of 8 median-length lines
    assert all(rows * width <= most or rows == 1 for rows, width in capped)
    assert capped[3:] == [(1, lengths[-1])] * 6  # one long line a batch, none dropped


@pytest.mark.parametrize("held_tokens", [1, 10**6])
def test_the_heldout_batches_hold_enough_tokens_and_leave_training_some(
        held_tokens, tiny_llama_dir, tmp_path, monkeypatch):
    """Batches are held back until they hold HELD_TOKENS real tokens, but never more than a
    quarter of them: a token is one batch, a million a quarter."""
    from transformers import AutoTokenizer

    from lowrank.stages import recover

    monkeypatch.setattr(recover, "HELD_TOKENS", held_tokens)
    student, teacher = _models(tiny_llama_dir, tmp_path)
    tokenizer, texts = AutoTokenizer.from_pretrained(tiny_llama_dir), read_calibration_text(None, 64)
    settings = RecoverSettings(method="lora", rank=4, steps=1, batch_size=8, max_length=32)
    batches = len(list(model_batches(texts, tokenizer, 8, 32, by_length=True,
                                     token_cap=settings.batch_token_cap)))
    log = distill(student, teacher, tokenizer, texts, settings)
    assert batches >= 8 and log.steps == 1
    assert log.heldout_batches == (1 if held_tokens == 1 else batches // 4)
