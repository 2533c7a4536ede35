"""Encoder-decoder export (BART, T5) in Optimum's seq2seq layout: encoder_model.onnx + a merged
decoder with its cache, validation, greedy decoding equal to PyTorch's ``generate``, int8,
``lowrank export``/``compress --export onnx``/``lowrank generate``. Tiny random models."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import lowrank
from lowrank.errors import InputError, ValidationError
from lowrank.generate import engine, generate_batch
from lowrank.generate_seq2seq import DECODER_FILE, ENCODER_FILE
from lowrank.pipeline import PipelineSpec
from lowrank.stages.export import ExportSettings, export_onnx
from lowrank.stages.export_decoder import random_prompts
from lowrank.stages.export_seq2seq import validate_seq2seq, validate_seq2seq_generation

transformers = pytest.importorskip("transformers")
CLS, SEP = 101, 102  # MiniLM's tokenizer: decoder start and EOS


pytestmark = pytest.mark.usefixtures("one_thread")


def _bart():
    torch.manual_seed(0)
    # init_std 0.2: a random BART with the default 0.02 emits one token whatever the prompt
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=30522, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=128, init_std=0.2, pad_token_id=0,
        bos_token_id=CLS, eos_token_id=SEP, decoder_start_token_id=CLS,
        forced_eos_token_id=SEP)).eval()


@pytest.fixture(scope="module")
def bart_out(tmp_path_factory, minilm_path):
    """A tiny BART compressed by the pipeline with its ONNX export (`compress --export onnx`)."""
    source = tmp_path_factory.mktemp("bart")
    _bart().save_pretrained(source, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (Path(minilm_path) / name).exists():
            shutil.copy(Path(minilm_path) / name, source / name)
    out = tmp_path_factory.mktemp("bart-out") / "out"
    spec = PipelineSpec(["analyze", "plan", "factorize", "export"],
                        {"plan": {"rank_fraction": 0.5, "min_numel": 1000}})
    lowrank.run_pipeline(spec, source, out)
    return source, out


def test_compress_exports_the_optimum_seq2seq_layout_and_validates(bart_out):
    _, out = bart_out
    onnx_dir = out / "onnx"
    assert {p.name for p in onnx_dir.iterdir()} == {ENCODER_FILE, DECODER_FILE, "export.json"}
    encoder = onnx.load(str(onnx_dir / ENCODER_FILE)).graph
    assert [i.name for i in encoder.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in encoder.output] == ["last_hidden_state"]
    decoder = onnx.load(str(onnx_dir / DECODER_FILE))
    kv = [f"{i}.{kind}.{x}" for i in (0, 1) for kind in ("decoder", "encoder")
          for x in ("key", "value")]
    assert [i.name for i in decoder.graph.input] == [
        "input_ids", "encoder_attention_mask", "encoder_hidden_states",
        *(f"past_key_values.{n}" for n in kv), "use_cache_branch"]
    assert [o.name for o in decoder.graph.output] == ["logits", *(f"present.{n}" for n in kv)]
    assert [n.op_type for n in decoder.graph.node] == ["If"]
    result = json.loads((onnx_dir / "export.json").read_text())
    assert result["factors"]["factors"] > 0 and not result["factors"]["unused_modules"]
    assert len(result["validation"]) == 3
    assert all(v["ok"] and v["top1_agreement"] == 1 and v["encoder"]["ok"]
               for v in result["validation"])
    assert all(g["ok"] and g["match_length"] == g["tokens"] for g in result["generation"])


def test_onnx_greedy_equals_pytorch_generate_and_batches(bart_out):
    _, out = bart_out
    model = lowrank.load(out).eval()
    onnx_engine, torch_engine = engine(out / "onnx"), engine(model)
    prompts = random_prompts(model.config.vocab_size, 7, (4, 11, 7))
    one_by_one = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             min_new_tokens=12, do_sample=False, num_beams=1,
                             eos_token_id=None, forced_eos_token_id=None,
                             forced_bos_token_id=None)[0, 1:].tolist()  # [0]: the start token
        assert generate_batch(onnx_engine, [prompt], 12) == [ref]
        one_by_one.append(ref)
    assert len({tuple(r) for r in one_by_one}) == 3  # the prompts matter
    assert generate_batch(onnx_engine, prompts, 12) == one_by_one  # padded on the right
    assert generate_batch(torch_engine, prompts, 12) == one_by_one


def test_a_corrupted_decoder_factor_fails_validation(bart_out, tmp_path):
    _, out = bart_out
    model = lowrank.load(out).eval()
    directory = tmp_path / "bad"
    shutil.copytree(out / "onnx", directory)
    proto = onnx.load(str(directory / DECODER_FILE))
    init = next(i for i in proto.graph.initializer
                if i.name.startswith("model.model.decoder.") and i.name.endswith(".A"))
    array = numpy_helper.to_array(init)
    wrong = np.random.default_rng(0).standard_normal(array.shape) * array.std() * 3
    init.CopyFrom(numpy_helper.from_array(wrong.astype(array.dtype), init.name))
    onnx.save(proto, str(directory / DECODER_FILE))
    with pytest.raises(ValidationError, match="logits differs from PyTorch"):
        validate_seq2seq(model, directory, ExportSettings())
    with pytest.raises(ValidationError, match="greedy decoding with the ONNX encoder"):
        validate_seq2seq_generation(model, directory, random_prompts(30522, 2), 12, 2e-2)


def test_t5_exports_and_generates_like_pytorch(tmp_path):
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=0, decoder_start_token_id=0, eos_token_id=1, initializer_factor=2.0)).eval()
    lowrank.factorize_(model, {"encoder.block.0.layer.1.DenseReluDense.wi.weight": 8,
                               "decoder.block.1.layer.2.DenseReluDense.wo.weight": 8})
    with pytest.raises(InputError, match="with its cache only"):
        export_onnx(model, tmp_path / "model.onnx", ExportSettings(cache=False))
    result = export_onnx(model, tmp_path / "model.onnx")
    assert result.factors["factors"] == 4
    assert all(g["match_length"] == g["tokens"] for g in result.generation)
    prompt = random_prompts(1000, 5, (9,))[0]
    ids = torch.tensor([prompt])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                         min_new_tokens=10, do_sample=False, eos_token_id=None)[0, 1:].tolist()
    assert generate_batch(engine(tmp_path), [prompt], 10) == [ref]


def test_int8_quantizes_both_files_and_both_branches(bart_out, tmp_path):
    from lowrank.stages.int8 import quantize_int8

    _, out = bart_out
    fp32 = sum((out / "onnx" / f).stat().st_size for f in (ENCODER_FILE, DECODER_FILE))
    int8 = sum(quantize_int8(out / "onnx" / f, tmp_path / f)["bytes"]
               for f in (ENCODER_FILE, DECODER_FILE))
    assert int8 < fp32 / 2
    merged = onnx.load(str(tmp_path / DECODER_FILE)).graph
    branches = {a.name: {n.op_type for n in a.g.node} for a in merged.node[0].attribute}
    assert all("MatMulInteger" in ops for ops in branches.values())
    tokens = generate_batch(engine(tmp_path), random_prompts(30522, 3, (5, 8)), 6)
    assert [len(t) for t in tokens] == [6, 6]


def test_export_and_generate_commands(bart_out, tmp_path):
    from click.testing import CliRunner

    from lowrank.cli import main

    _, out = bart_out
    runner = CliRunner()
    exported = runner.invoke(main, ["export", str(out), str(tmp_path / "onnx")])
    assert exported.exit_code == 0, exported.output
    assert "decoder_model_merged.onnx" in exported.stdout
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (out / name).exists():
            shutil.copy(out / name, tmp_path / name)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a third one\n\n")
    run = runner.invoke(main, ["generate", str(tmp_path / "onnx"), "hello there", "low rank",
                               "--prompts-file", str(prompts), "--max-new-tokens", "5",
                               "--json", "-"])
    assert run.exit_code == 0, run.output
    batched = json.loads(run.stdout)["generations"]
    assert [g["prompt"] for g in batched] == ["hello there", "low rank", "a third one"]
    single = runner.invoke(main, ["generate", str(out), "low rank", "--max-new-tokens", "5",
                                  "--json", "-"])  # PyTorch, from the lowrank output
    assert single.exit_code == 0, single.output
    assert json.loads(single.stdout)["new_tokens"] == batched[1]["new_tokens"]
