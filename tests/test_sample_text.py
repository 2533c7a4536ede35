"""Calibration text sampled from a causal LM itself (lowrank.sample_text, `lowrank sample`)."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from lowrank.cli import main
from lowrank.errors import InputError
from lowrank.models import load_dense
from lowrank.sample_text import SampleTextSettings, sample_text, start_token


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    from transformers import AutoTokenizer

    return load_dense(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_sampled_lines_are_seeded_one_sequence_a_line(tiny_lm):
    model, tokenizer = tiny_lm
    settings = SampleTextSettings(tokens=40, length=8, batch_size=2)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    lines = sample_text(model, tokenizer, settings)
    assert torch.equal(torch.rand(1), before)  # the caller's random stream is left alone
    assert len(lines) == 5  # ⌈40 / 8⌉ sequences, over three batches
    assert all(line == " ".join(line.split()) for line in lines)
    assert sample_text(model, tokenizer, settings) == lines
    other = sample_text(model, tokenizer, SampleTextSettings(tokens=40, length=8, seed=1))
    assert other != lines
    # float32 weights (the model itself) or a bfloat16 copy: the model is left as it was
    float32 = SampleTextSettings(tokens=40, length=8, batch_size=2, dtype="float32")
    assert len(sample_text(model, tokenizer, float32)) == 5
    bf16 = SampleTextSettings(tokens=40, length=8, batch_size=2, dtype="bfloat16")
    assert len(sample_text(model, tokenizer, bf16)) == 5
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_inverse_cdf_draws_follow_the_softmax_and_never_a_masked_token():
    from lowrank.sample_text import InverseCdfDraw

    logits = torch.tensor([[2.0, 1.0, -math.inf, 0.0, 1.5]])
    for temperature in (1.0, 0.5):
        draw = InverseCdfDraw(temperature, torch.Generator().manual_seed(0))
        picks = torch.cat([draw(None, logits.repeat(1000, 1)).argmax(-1) for _ in range(20)])
        freq = torch.bincount(picks, minlength=5) / len(picks)
        expected = torch.softmax(logits[0] / temperature, -1)
        assert freq[2] == 0  # probability 0: never drawn
        assert torch.allclose(freq, expected, atol=0.01), (freq, expected)  # 20,000 draws
        kept = draw(None, logits)
        assert (kept == 0).sum() == 1 and torch.isinf(kept).sum() == 4  # only the draw is left


def test_start_token_prefers_the_document_separator(tiny_lm, tiny_llama_dir):
    from transformers import AutoTokenizer

    model, _ = tiny_lm
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)  # BERT's: no BOS, no EOS
    with pytest.raises(InputError, match="no BOS or EOS"):
        start_token(tokenizer)
    assert start_token(tokenizer, model.config) == model.config.bos_token_id
    tokenizer.bos_token = "[CLS]"
    assert start_token(tokenizer, model.config) == tokenizer.cls_token_id
    assert start_token(tokenizer, start="[SEP]") == tokenizer.sep_token_id
    with pytest.raises(InputError, match="not one"):
        start_token(tokenizer, start="two words")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    assert start_token(tokenizer, model.config) == tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_sample_command_writes_the_file_and_refuses_bad_input(tiny_llama_dir, tiny_bert_dir,
                                                              tmp_path):
    runner = CliRunner()
    out = tmp_path / "sampled.txt"
    result = runner.invoke(main, ["sample", str(tiny_llama_dir), str(out), "--tokens", "48",
                                  "--length", "16", "--json", "-"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["lines"] == 3 == len(out.read_text().splitlines())
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temporary file, then renamed

    config = tiny_llama_dir / "config.json"
    before = config.read_bytes()
    refused = runner.invoke(main, ["sample", str(tiny_llama_dir), str(config)])
    assert refused.exit_code == 3 and "would write into the input" in refused.output
    assert config.read_bytes() == before

    nowhere = runner.invoke(main, ["sample", str(tiny_llama_dir), str(tmp_path / "no" / "s.txt")])
    assert nowhere.exit_code == 3 and "does not exist" in nowhere.output

    encoder = runner.invoke(main, ["sample", str(tiny_bert_dir), str(tmp_path / "e.txt")])
    assert encoder.exit_code == 3 and "needs a causal LM" in encoder.output
    assert "Traceback" not in encoder.output and not (tmp_path / "e.txt").exists()


def test_calibration_text_short_of_the_budget_is_topped_up_with_sampled_lines(
        tiny_llama_dir, tiny_bert_dir, tmp_path):
    """A causal LM's calibration text with fewer tokens than the budget gets lines sampled from
    the model after its own; the statistics keep them (compensation reruns the same lines)."""
    from lowrank.io.checkpoint import open_checkpoint
    from lowrank.stages.calibrate import CalibrateSettings, calibrate, load_stats, save_stats

    text = tmp_path / "calib.txt"
    text.write_text("a short line\nanother short line\n")
    settings = CalibrateSettings(calibration_file=str(text), tokens=100, max_length=16,
                                 batch_size=4)
    stats = calibrate(open_checkpoint(tiny_llama_dir), settings)
    assert len(stats.sampled_lines) >= 5  # ~90 tokens missing, at most 16 a line
    assert stats.samples == 2 + len(stats.sampled_lines)
    assert 100 - 16 < stats.tokens <= 100
    save_stats(stats, tmp_path)
    assert load_stats(tmp_path).sampled_lines == stats.sampled_lines

    # sampled lines of sampled_length new tokens: more of them for the same budget
    short = calibrate(open_checkpoint(tiny_llama_dir), CalibrateSettings(
        calibration_file=str(text), tokens=100, max_length=16, batch_size=4, sampled_length=8))
    assert len(short.sampled_lines) > len(stats.sampled_lines) and 100 - 16 < short.tokens <= 100
    for other in (CalibrateSettings(calibration_file=str(text), tokens=100, sampled_text=False),
                  CalibrateSettings(calibration_file=str(text), tokens=100, samples=2)):
        assert calibrate(open_checkpoint(tiny_llama_dir), other).samples == 2
    encoder = calibrate(open_checkpoint(tiny_bert_dir),
                        CalibrateSettings(calibration_file=str(text), tokens=100))
    assert encoder.samples == 2 and encoder.sampled_lines == []
    assert (short.causal_lm, encoder.causal_lm) == (True, False)  # compensation's "auto" reads it


@pytest.mark.parametrize("flags,sampled", [([], True), (["--no-sampled-text"], False)])
def test_compress_tops_up_a_causal_lms_calibration_text(flags, sampled, tiny_llama_dir, tmp_path,
                                                       monkeypatch):
    from lowrank.stages import compensate

    fitted = []  # what compensation's passes run on
    batches = compensate.model_batches
    monkeypatch.setattr(compensate, "model_batches",
                        lambda data, *a, **k: fitted.append(list(data)) or batches(data, *a, **k))
    text = tmp_path / "calib.txt"
    text.write_text("a short line\nanother short line\n")
    result = CliRunner().invoke(main, [
        "compress", str(tiny_llama_dir), str(tmp_path / "out"), "--rank-fraction", "0.25",
        "--calibration", str(text), "--calibration-tokens", "64", "--max-length", "16",
        "--cache-dir", str(tmp_path / "cache"), *flags])
    assert result.exit_code == 0, result.output
    [meta] = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("stats.json")]
    assert bool(meta["sampled_lines"]) is sampled and (meta["samples"] > 2) is sampled
    # compensation's "auto" damping and residual share follow the top-up, and say so
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    [factorize] = [r for r in manifest["stages"] if r["stage"] == "factorize"]
    assert (factorize["resolved"]["compensate_damping"],
            factorize["resolved"]["compensate_residual_share"],
            factorize["resolved"]["compensate_lines"]) == ((0.1, 0.6, 0.5) if sampled
                                                           else (0.3, 0.3, 1.0))
    # with a top-up, every other line of the file and every sampled line
    assert fitted == [["a short line", *meta["sampled_lines"]] if sampled
                      else ["a short line", "another short line"]]


def test_compensation_auto_values_follow_the_text_and_model_and_explicit_values_win(tmp_path):
    from lowrank.stages import factorize as factorize_mod
    from lowrank.stages.calibrate import ActivationStats, load_stats, save_stats

    own = ActivationStats(causal_lm=True)
    topped_up = ActivationStats(sampled_lines=["a sampled line"], causal_lm=True)
    encoder, before = ActivationStats(causal_lm=False), ActivationStats()  # None: saved before
    auto = factorize_mod.FactorizeSettings()
    assert [auto.compensation(s) for s in (own, topped_up, encoder, before)] == [
        (0.3, 0.3, 1), (0.1, 0.6, 0.5), (0.1, 0.3, 1), (0.3, 0.3, 1)]
    fixed = factorize_mod.FactorizeSettings(compensate_damping=0.2, compensate_residual_share=None,
                                            compensate_lines=0.25)
    assert fixed.compensation(topped_up) == fixed.compensation(encoder) == (0.2, None, 0.25)
    save_stats(encoder, tmp_path)  # the kind survives the stage cache
    assert auto.compensation(load_stats(tmp_path)) == (0.1, 0.3, 1)


@pytest.mark.parametrize("settings,uses", [
    ({}, False), ({"minutes": 6.5}, True), ({"minutes": 6.5, "steps": 300}, False),
    ({"minutes": 6.5, "sampled_text": False}, False), ({"sampled_text": True}, True)])
def test_recovery_trains_on_the_top_up_by_default_only_with_a_long_time_budget(settings, uses):
    """The top-up pays only once training has time for it (SAMPLED_TEXT_MINUTES); asked for or
    refused, it is what the user said."""
    from lowrank.stages.recover import RecoverSettings
    from lowrank.stages.recovery_text import uses_sampled_text

    assert uses_sampled_text(RecoverSettings(**settings)) is uses


@pytest.mark.parametrize("flags,top_up,new_lines", [
    ([], False, 0), (["--recover-sampled-text", "--recover-sampled-tokens", "0"], True, 0),
    (["--recover-sampled-text", "--recover-sampled-tokens", "128"], True, 2),
    (["--recover-sampled-text", "--recover-sampled-tokens", "128", "--recover-text", "OTHER"],
     False, 2)])
def test_recovery_also_trains_on_the_models_own_text_when_asked(
        flags, top_up, new_lines, tiny_llama_dir, tmp_path):
    """Asked to, recovery trains on what calibration read (the user's lines and the sampled
    top-up, when it trains on the calibration file) and on lines it samples itself, 64 new
    tokens a line; by default (3 minutes), on the training file's lines only."""
    text, other = tmp_path / "calib.txt", tmp_path / "other.txt"
    text.write_text("a short line\nanother short line\n")
    other.write_text("a third line\n")
    flags = [str(other) if f == "OTHER" else f for f in flags]
    result = CliRunner().invoke(main, [
        "compress", str(tiny_llama_dir), str(tmp_path / "out"), "--rank-fraction", "0.25",
        "--calibration", str(text), "--calibration-tokens", "64", "--max-length", "16",
        "--recover", "lora", "--recover-steps", "1", "--recover-batch-size", "4",
        "--cache-dir", str(tmp_path / "cache"), "--json", "-", *flags])
    assert result.exit_code == 0, result.output
    [meta] = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("stats.json")]
    recovery = json.loads((tmp_path / "out" / "report.json").read_text())["recovery"]
    sampled = (len(meta["sampled_lines"]) if top_up else 0) + new_lines
    assert meta["sampled_lines"] and recovery["sampled_samples"] == sampled
    own_lines = 1 if "--recover-text" in flags else 2
    assert recovery["samples"] == own_lines + sampled
    assert recovery["settings"]["sampled_tokens"] == (int(flags[2]) if flags else 0)
    if not flags:  # once: a negative count is refused in one line
        bad = CliRunner().invoke(main, ["compress", str(tiny_llama_dir), str(tmp_path / "bad"),
                                        "--rank-fraction", "0.25", "--recover", "lora",
                                        "--recover-sampled-tokens", "-1", "--no-cache"])
        assert bad.exit_code != 0 and "recovery sampled_tokens must be >= 0" in bad.output
        assert "Traceback" not in bad.output and not (tmp_path / "bad").exists()


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


def test_sampled_replies_follow_each_prompt_in_the_chat_template(tiny_lm):
    import copy

    from lowrank.sample_text import sample_replies

    model, tokenizer = tiny_lm
    tokenizer = copy.deepcopy(tokenizer)
    prompts = ["a short line", "a much longer line than the first one"]
    with pytest.raises(InputError, match="chat template"):
        sample_replies(model, tokenizer, prompts)
    tokenizer.chat_template = CHAT_TEMPLATE
    settings = SampleTextSettings(length=6, batch_size=2)
    transcripts = sample_replies(model, tokenizer, prompts, settings)
    assert tokenizer.padding_side == "right"  # as it was: generation padded on the left
    assert transcripts == sample_replies(model, tokenizer, prompts, settings)  # seeded
    assert transcripts != sample_replies(model, tokenizer, prompts,
                                         SampleTextSettings(length=6, seed=1))
    for prompt, transcript in zip(prompts, transcripts):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
        head = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = tokenizer(transcript, add_special_tokens=False)["input_ids"]
        assert ids[:len(head)] == head and 1 <= len(ids) - len(head) <= 6  # the padded one too


def test_recovery_trains_on_chat_transcripts_when_the_tokenizer_has_a_template(
        tiny_llama_dir, tmp_path):
    """--recover-chat N: the first N training lines as user turns with the dense model's
    replies, trained on beside the lines; none for a tokenizer without a chat template."""
    import shutil

    from transformers import AutoTokenizer

    chat_lm = tmp_path / "chat-lm"
    shutil.copytree(tiny_llama_dir, chat_lm)
    tokenizer = AutoTokenizer.from_pretrained(chat_lm)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(chat_lm)
    text = tmp_path / "calib.txt"
    text.write_text("a short line\nanother short line\nthird line\n")
    for model, chats in ((chat_lm, 2), (tiny_llama_dir, 0)):
        out = tmp_path / f"out-{chats}"
        result = CliRunner().invoke(main, [
            "compress", str(model), str(out), "--rank-fraction", "0.25", "--calibration",
            str(text), "--no-sampled-text", "--max-length", "16", "--recover", "lora",
            "--recover-steps", "1", "--recover-chat", "2", "--no-cache", "--json", "-"])
        assert result.exit_code == 0, result.output
        recovery = json.loads((out / "report.json").read_text())["recovery"]
        assert (recovery["chat_samples"], recovery["samples"]) == (chats, 3 + chats)
    bad = CliRunner().invoke(main, ["compress", str(chat_lm), str(tmp_path / "bad"),
                                    "--rank-fraction", "0.25", "--recover", "lora",
                                    "--recover-chat", "-1", "--no-cache"])
    assert bad.exit_code != 0 and "recovery chat must be >= 0" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "bad").exists()
