"""Causal LM export with a KV cache (Optimum's layout), greedy checks, int8, decoder latency,
``lowrank generate``."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import lowrank
from lowrank.errors import ValidationError
from lowrank.generate import OnnxLM, TorchLM, generate_ids, onnx_session
from lowrank.stages.export import export_onnx
from lowrank.stages.export_decoder import random_prompts, validate_generation


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    model = lowrank.models.load_dense(tiny_llama_dir)
    lowrank.factorize_(model, {"model.layers.0.mlp.down_proj.weight": 16,
                               "model.layers.1.self_attn.q_proj.weight": 16,
                               "lm_head.weight": 16})
    return model.eval()


@pytest.fixture(scope="module")
def exported(tiny_lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("decoder") / "model.onnx"
    return export_onnx(tiny_lm, path), path


def test_decoder_export_has_the_optimum_layout_and_validates(exported):
    result, path = exported
    graph = onnx.load(str(path)).graph
    names = [i.name for i in graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{k}" for i in (0, 1) for k in ("key", "value")]
    assert [o.name for o in graph.output] == ["logits"] + [
        f"present.{i}.{k}" for i in (0, 1) for k in ("key", "value")]
    past = [d.dim_param or d.dim_value for d in graph.input[3].type.tensor_type.shape.dim]
    assert past == ["batch_size", 4, "past_sequence_length", 16]  # (batch, kv heads, past, dim)
    assert result.factors["factors"] == 6
    assert all(v["ok"] and v["top1_agreement"] == 1.0 for v in result.validation)
    assert len(result.generation) == 3
    assert all(g["ok"] and g["match_length"] == 16 for g in result.generation)
    assert "greedy decoding with the KV cache" in result.rule


def test_onnx_greedy_equals_pytorch_generate(tiny_lm, exported):
    """Our ONNX loop against transformers' own generate (16 tokens, no EOS stop)."""
    import torch

    session = onnx_session(exported[1])
    for prompt in random_prompts(tiny_lm.config.vocab_size, 7, (4, 11)):
        ids = torch.tensor([prompt])
        ref = tiny_lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                               min_new_tokens=16, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert generate_ids(OnnxLM(session), prompt, 16) == ref
        assert generate_ids(TorchLM(tiny_lm), prompt, 16) == ref


def test_a_corrupted_factor_fails_the_greedy_check(tiny_lm, exported, tmp_path):
    proto = onnx.load(str(exported[1]))
    name = "model.model.layers.0.mlp.down_proj.A"
    init = next(i for i in proto.graph.initializer if i.name == name)
    array = numpy_helper.to_array(init)
    wrong = np.random.default_rng(0).standard_normal(array.shape) * array.std() * 3
    init.CopyFrom(numpy_helper.from_array(wrong.astype(array.dtype), name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(ValidationError, match="greedy decoding with the ONNX cache differs"):
        validate_generation(tiny_lm, bad, random_prompts(tiny_lm.config.vocab_size, 2))


def test_int8_decoder_runs_is_smaller_and_reports_fidelity(tiny_lm, tiny_llama_dir, exported,
                                                           tmp_path):
    from transformers import AutoTokenizer

    from lowrank.generate import decoder_fidelity
    from lowrank.stages.int8 import quantize_int8

    info = quantize_int8(exported[1], tmp_path / "int8.onnx")
    assert info["bytes"] < exported[1].stat().st_size / 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    fid = decoder_fidelity(tiny_lm, tmp_path / "int8.onnx", tokenizer,
                           ["the cat sat on the mat", "a low rank model is small"], new_tokens=8)
    assert 0 <= fid["top1_agreement"] <= 1 and fid["tokens"] > 5
    assert len(fid["greedy_match_lengths"]) == 2
    exact = decoder_fidelity(tiny_lm, exported[1], tokenizer, ["the cat sat on the mat"], 8)
    assert exact["top1_agreement"] == 1.0 and exact["greedy_match_lengths"] == [8]  # fp32


def test_decoder_bench_has_prefill_and_decode_rows(exported):
    from lowrank.stages.report import latency_rows
    from lowrank.timing import BenchSettings, bench

    path = exported[1]
    result = bench({"dense": path, "compressed": path},
                   BenchSettings((1,), (8,), runs=2, warmup=1, rounds=1, intra_threads=1))
    phases = {(r["model"], r["phase"]) for r in result["results"]}
    assert phases == {(m, p) for m in ("dense", "compressed") for p in ("prefill", "decode")}
    rows = latency_rows({"latency": result})
    assert any("1×8 prefill" in r[1] for r in rows) and any("decode" in r[1] for r in rows)


def test_generate_command(tiny_llama_dir, exported, tmp_path):
    import shutil

    from click.testing import CliRunner

    from lowrank.cli import main

    out = tmp_path / "OUT"
    (out / "onnx").mkdir(parents=True)
    shutil.copy(exported[1], out / "onnx" / "model.onnx")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (tiny_llama_dir / name).exists():
            shutil.copy(tiny_llama_dir / name, out / name)
    runner = CliRunner()
    onnx_run = runner.invoke(main, ["generate", str(out / "onnx" / "model.onnx"), "hello there",
                                    "--max-new-tokens", "5", "--json", "-"])
    assert onnx_run.exit_code == 0, onnx_run.output
    data = json.loads(onnx_run.stdout)
    assert data["prompt"] == "hello there" and len(data["new_tokens"]) == 5
    torch_run = runner.invoke(main, ["generate", str(tiny_llama_dir), "hello there",
                                     "--max-new-tokens", "5", "--sample", "--top-k", "5"])
    assert torch_run.exit_code == 0, torch_run.output
    assert torch_run.stdout.strip()
