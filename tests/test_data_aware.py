import json

import pytest
import torch
from click.testing import CliRunner

from lowrank.cli import main
from lowrank.errors import InputError
from lowrank.io.checkpoint import open_checkpoint
from lowrank.io.samples import read_calibration_text
from lowrank.linalg import factorize_matrix
from lowrank.stages.calibrate import ActivationStats, CalibrateSettings
from lowrank.weighting import make_weighting, psd_root, psd_sqrt


def correlated_inputs(n_in=64, tokens=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) * torch.logspace(0, -3, n_in)  # strongly anisotropic
    return (torch.randn(tokens, n_in, generator=g) @ mix.T).double()


def stats_for(name, x, method="whiten"):
    return ActivationStats(grams={name: x.T @ x}, abs_sums={name: x.abs().sum(0)},
                           tokens=x.shape[0], settings=CalibrateSettings(method=method))


def output_error(w, A, B, x):
    return torch.linalg.matrix_norm(x @ (w - A.double() @ B.double()).T).item()


@pytest.mark.parametrize("method", ["whiten", "scale"])
def test_data_aware_beats_plain_svd_on_output_error(method):
    x = correlated_inputs()
    # Seeded: the global RNG depends on which tests ran before. Whitening is optimal for any W;
    # ASVD scaling is a heuristic that beat plain SVD at all three ranks on 17 of 20 seeds.
    w = torch.randn(48, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    stats = stats_for("fc.weight", x, method)
    for rank in (4, 8, 16):
        A0, B0, _, _ = factorize_matrix(w, rank)
        A1, B1, _, _ = factorize_matrix(w, rank, weighting=stats.weighting("fc.weight", 64))
        assert output_error(w, A1, B1, x) < output_error(w, A0, B0, x)


def test_whitening_equals_cholesky_whitened_svd_llm_solution():
    x = correlated_inputs(n_in=32) + 0.1 * torch.randn(4000, 32, dtype=torch.float64)
    w = torch.randn(24, 32, dtype=torch.float64)
    G = x.T @ x
    A, B, _, _ = factorize_matrix(w, 6, weighting=make_weighting("w", stats_for("w", x)))
    L = torch.linalg.cholesky(G)  # SVD-LLM: truncate W·L, map back with L⁻¹
    U, S, Vh = torch.linalg.svd(w @ L)
    reference = (U[:, :6] * S[:6]) @ Vh[:6] @ torch.linalg.inv(L)
    torch.testing.assert_close(A.double() @ B.double(), reference, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("tokens", [4000, 10])  # 10 tokens: G singular, G^½ instead of Cholesky
def test_any_root_of_the_gram_gives_the_same_whitened_factors(tokens):
    x = correlated_inputs(n_in=32, tokens=tokens)
    w = torch.randn(24, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    G = x.T @ x
    root = psd_root(G)
    torch.testing.assert_close(root @ root.T, G, atol=1e-9 * float(G.diagonal().max()), rtol=0)
    symmetric = make_weighting("w", stats_for("w", x), root=psd_sqrt)
    for rank in (4, 8):
        A, B, _, _ = factorize_matrix(w, rank, weighting=make_weighting("w", stats_for("w", x)))
        As, Bs, _, _ = factorize_matrix(w, rank, weighting=symmetric)
        torch.testing.assert_close(x @ (A @ B).T, x @ (As @ Bs).T, atol=1e-6, rtol=1e-6)


def test_rank_deficient_gram_is_handled():
    x = correlated_inputs(n_in=32, tokens=10)  # 10 tokens: G has rank 10 of 32
    w = torch.randn(16, 32, dtype=torch.float64)
    A, B, energy, _ = factorize_matrix(w, 10, weighting=make_weighting("w", stats_for("w", x)))
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert energy == pytest.approx(1.0, abs=1e-9)  # rank 10 keeps all output energy on 10 tokens
    assert output_error(w, A, B, x) < 1e-6 * torch.linalg.matrix_norm(x @ w.T).item()


def test_embedding_rows_weighted_by_frequency_are_reconstructed_better():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(500, 32, generator=g, dtype=torch.float64)
    counts = torch.zeros(500, dtype=torch.float64)
    counts[:20] = 1000.0  # 20 frequent tokens
    stats = ActivationStats(token_counts={"emb.weight": counts})
    A, B, _, _ = factorize_matrix(w, 20, weighting=stats.weighting("emb.weight", 32))
    A0, B0, _, _ = factorize_matrix(w, 20)
    frequent_err = (w[:20] - A[:20] @ B).norm() / w[:20].norm()
    plain_err = (w[:20] - A0[:20] @ B0).norm() / w[:20].norm()
    assert frequent_err < 0.2 * plain_err


def test_calibration_text_errors_and_warning(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_calibration_text(tmp_path / "nope.txt", 10)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(InputError, match="empty"):
        read_calibration_text(tmp_path / "empty.txt", 10)
    (tmp_path / "bin.txt").write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(InputError, match="binary"):
        read_calibration_text(tmp_path / "bin.txt", 10)
    (tmp_path / "few.txt").write_text("one\ntwo\n")
    with pytest.warns(UserWarning, match="2 calibration samples, fewer than the 10"):
        assert read_calibration_text(tmp_path / "few.txt", 10) == ["one", "two"]
    assert len(read_calibration_text(None, 50)) == 50  # the bundled default text


def test_data_aware_on_checkpoint_without_architecture_is_a_clear_error(tmp_path, toy_checkpoint):
    result = CliRunner().invoke(main, ["compress", str(toy_checkpoint), str(tmp_path / "o"),
                                       "--calibration"])
    assert result.exit_code == 3
    assert "no architecture: give an HF model directory" in result.stderr
    assert not (tmp_path / "o").exists()


def test_batches_by_length_pad_less_and_give_the_same_statistics(tiny_llama_dir):
    import transformers

    from lowrank.io.samples import model_batches
    from lowrank.stages.calibrate import collect_stats

    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    lines = [" ".join(["word"] * (1 + (7 * i) % 23)) for i in range(24)]  # lengths mixed

    def padded_and_rows(by_length):
        batches = list(model_batches(lines, tokenizer, 4, 16, by_length=by_length))
        rows = sorted(tuple(ids[m].tolist()) for inputs, mask in batches
                      for ids, m in zip(inputs["input_ids"], mask))
        return sum(mask.numel() for _, mask in batches), rows

    (sorted_padded, sorted_rows), (file_padded, file_rows) = map(padded_and_rows, (True, False))
    assert sorted_rows == file_rows  # every line once, whatever the order
    assert sorted_padded < 0.8 * file_padded

    # kfac's passes are float32, and it records every Linear's input Gram
    fp32 = CalibrateSettings(batch_size=4, forward_dtype="float32", output_grams=False)
    by_length = collect_stats(model, tokenizer, lines, fp32)
    in_order = collect_stats(model, tokenizer, lines,  # kfac batches in file order
                             CalibrateSettings(batch_size=4, method="kfac"))
    assert by_length.tokens == in_order.tokens
    for name, gram in in_order.grams.items():  # equal up to float32 rounding of the sums
        assert (by_length.grams[name] - gram).norm() <= 1e-5 * gram.norm(), name


def test_calibration_takes_lines_up_to_a_token_budget(tiny_llama_dir, tmp_path):
    """Without a line count, calibration takes the first lines whose tokens (each line
    truncated at max_length) fit the budget: short lines give as many tokens as long ones."""
    import transformers

    from lowrank.io.samples import lines_within_tokens
    from lowrank.models import Models
    from lowrank.stages.calibrate import calibrate
    from lowrank.stages.calibration_text import calibration_data

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    lines = [" ".join(["word"] * (1 + i % 9)) for i in range(60)]
    counts = [len(ids) for ids in tokenizer(lines, truncation=True, max_length=6)["input_ids"]]
    kept = lines_within_tokens(lines, tokenizer, 40, 6, chunk=7)  # chunks: as if all at once
    assert kept == lines[:len(kept)]
    assert sum(counts[:len(kept)]) <= 40 < sum(counts[:len(kept) + 1])
    assert lines_within_tokens(lines, tokenizer, 1, 6) == lines[:1]  # never none

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(lines))
    ckpt = open_checkpoint(tiny_llama_dir)
    budget = CalibrateSettings(calibration_file=str(text), tokens=120, max_length=16)
    _, _, data = calibration_data(Models(ckpt), budget)
    stats = calibrate(ckpt, budget)
    assert stats.samples == len(data) and 120 - 16 < stats.tokens <= 120
    counted = CalibrateSettings(calibration_file=str(text), samples=50, tokens=120, pack=0)
    assert calibration_data(Models(ckpt), counted)[2] == lines[:50]  # a line count wins
    with pytest.raises(InputError, match="tokens"):
        CalibrateSettings(tokens=0)
    with pytest.raises(InputError, match="sampled_length"):
        CalibrateSettings(sampled_length=0)


def test_calibration_packs_the_last_share_of_its_lines(tiny_llama_dir, tmp_path):
    """The last share of the calibration lines are joined, in order, into samples of at most
    max_length tokens; a line that long alone stays alone; statistics saved before packing
    existed load as unpacked (compensation reruns the lines they were made from)."""
    import transformers

    from lowrank.io.samples import packed_lines
    from lowrank.models import Models
    from lowrank.stages.calibrate import calibrate, load_stats, save_stats
    from lowrank.stages.calibration_text import calibration_data

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    lines = [" ".join(["word"] * (1 + i % 5)) for i in range(40)]
    lines[30] = " ".join(["long"] * 40)  # longer than max_length by itself
    packed = packed_lines(lines, tokenizer, 16, 0.5)
    assert packed[:20] == lines[:20]
    tail = packed[20:]
    assert " ".join(tail) == " ".join(lines[20:]) and len(tail) < 20
    assert lines[30] in tail  # alone
    counts = [len(ids) for ids in tokenizer(tail)["input_ids"]]
    assert all(n <= 16 for line, n in zip(tail, counts) if line != lines[30])
    assert max(n for line, n in zip(tail, counts) if line != lines[30]) > 10  # really packed
    assert packed_lines(lines, tokenizer, 16, 0) == lines
    assert packed_lines(lines, tokenizer, 16, 1)[0] != lines[0]

    text = tmp_path / "calib.txt"
    text.write_text("\n".join(lines))
    ckpt = open_checkpoint(tiny_llama_dir)
    assert CalibrateSettings().pack > 0  # packing is the default
    settings = CalibrateSettings(calibration_file=str(text), max_length=16, pack=0.5,
                                 sampled_text=False)
    assert calibration_data(Models(ckpt), settings)[2] == packed
    stats = calibrate(ckpt, settings)
    assert stats.samples == len(packed)
    save_stats(stats, tmp_path / "stats")
    meta = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert load_stats(tmp_path / "stats").settings.pack == 0.5
    del meta["settings"]["pack"]  # as saved before packing existed
    (tmp_path / "stats" / "stats.json").write_text(json.dumps(meta))
    assert load_stats(tmp_path / "stats").settings.pack == 0
    for share in (1.5, -0.1, "x"):  # a pipeline file's string too: one line, not a TypeError
        with pytest.raises(InputError, match="calibration pack must be in"):
            CalibrateSettings(pack=share)


def test_a_share_of_the_calibration_samples_is_spread_over_them_and_keeps_the_sampled_lines(
        tiny_llama_dir, tmp_path):
    """Compensation's fits on a topped-up text run on a share of the file's lines
    (factorize.compensate_lines) and every sampled line."""
    from lowrank.models import Models
    from lowrank.stages.calibration_text import calibration_data, spread

    lines = [f"line {i}" for i in range(10)]
    assert spread(lines, 1.0) is lines
    assert spread(lines, 0.5) == lines[::2]
    assert spread(lines, 0.3) == ["line 0", "line 4", "line 7"]
    assert spread(lines, 0.05) == ["line 0"]  # never none
    rows = {"input_ids": torch.arange(10)[:, None], "attention_mask": torch.ones(10, 1)}
    half = spread(rows, 0.5)  # a tensor file's rows
    assert half["input_ids"].flatten().tolist() == [0, 2, 4, 6, 8]
    assert half["attention_mask"].shape == (5, 1)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(lines))
    settings = CalibrateSettings(calibration_file=str(text), pack=0, sampled_text=False)
    assert calibration_data(Models(open_checkpoint(tiny_llama_dir)), settings,
                            sampled=["sampled"], file_share=0.5)[2] == [*lines[::2], "sampled"]


@pytest.mark.parametrize("share,code", [("0", 0), ("0.5", 0), ("1.5", 3)])
def test_compress_packs_as_asked_and_refuses_a_share_outside_0_1(share, code, tiny_bert_dir,
                                                                  tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(f"line number {i}" for i in range(12)))
    result = CliRunner().invoke(main, [
        "compress", str(tiny_bert_dir), str(tmp_path / "out"), "--rank-fraction", "0.25",
        "--calibration", str(text), "--calibration-pack", share,
        "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == code, result.output
    if code:
        assert "calibration pack must be in [0, 1]" in result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
        return
    [meta] = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("stats.json")]
    assert meta["settings"]["pack"] == float(share)
    assert (meta["samples"] == 12) is (share == "0")  # six lines packed into fewer samples


def test_statistics_over_more_rows_than_one_float32_sum_holds(tiny_llama_dir, monkeypatch):
    """Each layer's float32 running sum goes into its float64 Gram every FLUSH_ROWS rows, in a
    hook (under torch.inference_mode), and once more after the passes: calibration text longer
    than FLUSH_ROWS tokens failed there (an inference tensor updated in place)."""
    import transformers

    from lowrank.stages import recorder
    from lowrank.stages.calibrate import collect_stats

    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    lines = [" ".join(["word"] * (1 + (7 * i) % 23)) for i in range(24)]
    one_sum = collect_stats(model, tokenizer, lines, CalibrateSettings(batch_size=4))
    monkeypatch.setattr(recorder, "FLUSH_ROWS", one_sum.tokens * 2 // 3)
    in_inference_mode = []  # where each flush ran: in a hook, or after the passes
    flush = recorder.Recorder._flush
    monkeypatch.setattr(recorder.Recorder, "_flush", lambda self, name: (
        in_inference_mode.append(torch.is_inference_mode_enabled()), flush(self, name)))
    flushed = collect_stats(model, tokenizer, lines, CalibrateSettings(batch_size=4))
    assert set(in_inference_mode) == {True, False}
    for name, gram in one_sum.grams.items():
        assert (flushed.grams[name] - gram).norm() <= 1e-5 * gram.norm(), name


def test_calibration_records_the_lm_head_input_without_computing_logits(tiny_llama_dir):
    import transformers

    from lowrank.io.samples import model_batches
    from lowrank.stages.calibrate import collect_stats

    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    lines = [" ".join(["word"] * (1 + (7 * i) % 23)) for i in range(12)]
    logit_rows = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: logit_rows.append(out.shape[1]))
    stats = collect_stats(model, tokenizer, lines,
                          CalibrateSettings(batch_size=4, forward_dtype="float32"))
    handle.remove()
    assert logit_rows == [0, 0, 0]  # the head ran on no positions

    expected = 0  # yet its input's Gram is recorded: the real tokens' final hidden states
    with torch.no_grad():
        for inputs, mask in model_batches(lines, tokenizer, 4, 128):
            hidden = model.model(**inputs).last_hidden_state[mask].double()
            expected = expected + hidden.T @ hidden
    gram = stats.grams["lm_head.weight"]
    assert (gram - expected).norm() <= 1e-5 * expected.norm()
    inputs, _ = next(model_batches(lines, tokenizer, 4, 128))  # and the hook is gone
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_bfloat16_forward_passes_give_grams_close_to_float32(tiny_llama_dir):
    """forward_dtype bfloat16 (the default where the CPU has it): the layers' inputs carry 8
    significant bits, the Grams are still float64 sums of their float32 products."""
    import transformers

    from lowrank.stages.calibrate import collect_stats

    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)
    lines = [" ".join(["word"] * (1 + (7 * i) % 23)) for i in range(24)]
    full, half = (collect_stats(model, tokenizer, lines,
                                CalibrateSettings(batch_size=4, forward_dtype=dtype))
                  for dtype in ("float32", "bfloat16"))
    full_grams, half_grams = ({**s.grams, **s.output_grams} for s in (full, half))
    assert full_grams.keys() == half_grams.keys() and full.tokens == half.tokens
    errors = {name: float((half_grams[name] - gram).norm() / gram.norm())
              for name, gram in full_grams.items()}
    assert all(g.dtype == torch.float64 for g in half_grams.values())
    assert max(errors.values()) < 2e-2, errors
    # the first block's query input (RMSNorm, float32 under autocast) is the same; after a
    # bf16 GEMM they differ: the bf16 path really ran
    assert errors["model.layers.0.self_attn.q_proj.weight"] == 0
    assert errors["model.layers.0.mlp.down_proj.weight"] > 0
    with pytest.raises(InputError, match="forward_dtype must be one of"):
        CalibrateSettings(forward_dtype="float16")


# BERT's Linears and GPT-2's Conv1Ds (weights stored (in, out)) have a bias
@pytest.mark.parametrize("model_dir", ["tiny_llama_dir", "tiny_bert_dir", "gpt2"])
def test_wide_linears_record_output_grams_with_the_same_factors(model_dir, request, minilm_path):
    """A Linear with fewer outputs than inputs (an FFN's down projection) records
    Σ (Wx)(Wx)ᵀ = W·G·Wᵀ instead of G, and its whitened spectrum and factors, whole or by row
    blocks, are the input Gram's."""
    import transformers

    from lowrank.linalg import factorize_split, gram_svdvals, matrix_view
    from lowrank.nn.layers import is_transposed
    from lowrank.stages.calibrate import collect_stats
    from lowrank.weighting import weighted

    if model_dir == "gpt2":
        torch.manual_seed(0)
        model = transformers.GPT2Model(transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=30522)).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    else:
        model = transformers.AutoModel.from_pretrained(request.getfixturevalue(model_dir)).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(request.getfixturevalue(model_dir))
    with torch.no_grad():  # biases initialized to zero: make them count
        for m in model.modules():
            if (isinstance(m, torch.nn.Linear) or is_transposed(m)) and m.bias is not None:
                m.bias.normal_(generator=torch.Generator().manual_seed(0))
    lines = read_calibration_text(None, 64)  # varied text: a G with no near-equal eigenvalues
    outputs, inputs = (collect_stats(model, tokenizer, lines, CalibrateSettings(
        batch_size=4, forward_dtype="float32", output_grams=on)) for on in (True, False))

    def out_in(m):  # a Conv1D's weight is stored (in, out)
        return m.weight.shape[::-1] if is_transposed(m) else m.weight.shape
    wide = {f"{fqn}.weight" for fqn, m in model.named_modules()
            if (isinstance(m, torch.nn.Linear) or is_transposed(m)) and out_in(m)[0] < out_in(m)[1]}
    assert wide and set(outputs.output_grams) == wide and not inputs.output_grams
    assert set(outputs.grams) == set(inputs.grams) - wide
    params = dict(model.named_parameters())
    for name in wide:
        w = matrix_view(params[name].detach(), name in inputs.transposed).double()
        expected = w @ inputs.grams[name] @ w.T
        assert (outputs.output_grams[name] - expected).norm() <= 1e-5 * expected.norm()
        by_output = outputs.weighting(name, w.shape[1])
        by_input = inputs.weighting(name, w.shape[1])
        assert by_output.kind == "whiten-output" and by_input.kind == "whiten"
        # the output energy of each direction, to the Grams' float32 products' rounding
        energy = gram_svdvals(weighted(w, by_input)) ** 2
        torch.testing.assert_close(gram_svdvals(weighted(w, by_output)) ** 2, energy,
                                   rtol=0, atol=1e-6 * float(energy[0]))
        gram = inputs.grams[name]

        def output_error(A, B, blocks=None, w=w, gram=gram):  # Σ‖(W − AB)x‖² / Σ‖Wx‖²
            if blocks:  # factorize_split's: row block i of W is A_i·B_i
                A = torch.block_diag(*A.split(blocks))
            d = w - A.double() @ B.double()
            return float(torch.trace(d @ gram @ d.T) / torch.trace(w @ gram @ w.T))

        half = w.shape[0] // 2
        for rank in (2, half // 2):  # the same least output error, whole and by row blocks
            A1, B1, energy1, _ = factorize_matrix(w, rank, "gram", weighting=by_output)
            A0, B0, energy0, _ = factorize_matrix(w, rank, "gram", weighting=by_input)
            # (errors are relative to Σ‖Wx‖²: equal up to the float32 Grams' rounding)
            assert output_error(A1, B1) == pytest.approx(output_error(A0, B0), rel=1e-5, abs=1e-7)
            assert energy1 == pytest.approx(energy0, rel=1e-6)
            sizes = [half, w.shape[0] - half]
            split = [factorize_split(w, sizes, rank, "gram", weighting=wt)[:2]
                     for wt in (by_output, by_input)]
            errors = [output_error(A, B, sizes) for A, B in split]
            assert errors[0] == pytest.approx(errors[1], rel=1e-5, abs=1e-7)
            plain = factorize_split(w, sizes, rank, "gram")[:2]
            assert errors[0] < output_error(*plain, sizes)  # and the weighting is used
