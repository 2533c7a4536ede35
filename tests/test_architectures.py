"""Architectures beyond Linear/Embedding/Conv: GPT-2's transposed Conv1D, fused projections
(GPT-NeoX ``query_key_value``, Phi-3 ``qkv_proj``/``gate_up_proj``), encoder-decoder models
(T5, BART), an untied LM head saved as a copy of the embedding, and nn.MultiheadAttention.

Tiny models with random weights, built from configs (no download): they show the mechanics
(equality at full rank, loading, calibration, evaluation), not quality.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank
from lowrank.io.checkpoint import open_checkpoint
from lowrank.linalg import factorize_matrix
from lowrank.models import Models
from lowrank.nn.attention import LowRankMultiheadAttention
from lowrank.nn.layers import LowRankLinear
from lowrank.nn.swap import kept_dense, swap_lowrank_, transposed_weights
from lowrank.pipeline import PipelineSpec
from lowrank.stages.factored import reconstruct_dense
from lowrank.stages.factorize import factorize, factorize_
from lowrank.stages.plan import LayerPlan, RankPlan

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(kind: str):
    T = transformers
    torch.manual_seed(0)
    common = {"vocab_size": 30522}
    if kind == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                              bos_token_id=101, eos_token_id=102, **common))
    if kind == "neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=101, eos_token_id=102, **common))
    if kind == "phi3":
        return T.Phi3ForCausalLM(T.Phi3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
            bos_token_id=101, eos_token_id=102, **common))
    if kind == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(
            d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, pad_token_id=0,
            decoder_start_token_id=0, eos_token_id=102, **common))
    if kind == "bart":
        return T.BartForConditionalGeneration(T.BartConfig(
            d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
            max_position_embeddings=128, pad_token_id=0, bos_token_id=101, eos_token_id=102,
            decoder_start_token_id=101, forced_eos_token_id=102, **common))
    if kind == "llama-copy":  # untied head, saved as an exact copy of the embedding
        model = T.LlamaForCausalLM(T.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=False,
            **common))
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
        return model
    raise ValueError(kind)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, minilm_path):
    made = {}

    def get(kind):
        if kind not in made:
            path = tmp_path_factory.mktemp(kind)
            _build(kind).save_pretrained(path, safe_serialization=True)
            for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                         "special_tokens_map.json"):
                if (Path(minilm_path) / name).exists():
                    shutil.copy(Path(minilm_path) / name, path / name)
            made[kind] = path
        return made[kind]
    return get


def _compress(model_dir, out, calibration: bool, plan=None):
    stages = (["calibrate"] if calibration else []) + ["analyze", "plan", "factorize", "evaluate"]
    spec = PipelineSpec(stages, {"calibrate": {"samples": 16, "max_length": 32},
                                 "plan": plan or {"rank_fraction": 0.5, "min_numel": 1000},
                                 "evaluate": {"samples": 24, "max_length": 32}})
    return lowrank.run_pipeline(spec, model_dir, out)


def _ids(seed=0, shape=(2, 12)):
    return torch.randint(1000, 5000, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids).logits
        return model(input_ids=ids).logits


def _full_rank(model_dir, names=None) -> tuple:
    """Factor ``names`` (default: every matrix a module weight) of a checkpoint at full rank,
    through the checkpoint path (factorize + instantiate)."""
    ckpt = open_checkpoint(model_dir)
    models = Models(ckpt)
    arch = models.architecture(meta=True)
    layers = {}
    for info in ckpt.infos():
        if len(info.shape) == 2 and info.name.endswith(".weight") and (
                names is None or info.name in names) and info.name not in kept_dense(arch):
            layers[info.name] = LayerPlan(list(info.shape), min(info.shape))
    plan = RankPlan(layers, ckpt.num_params())
    result = factorize(ckpt, plan, transposed=transposed_weights(arch))
    return models.dense(), models.compressed(result.tensors, result.layers), result


# --------------------------------------------------------------------------------------------
# GPT-2 Conv1D (weight stored in × out)


def test_gpt2_conv1d_full_rank_equals_dense_lower_rank_loses(hf_dirs, tmp_path):
    d = hf_dirs("gpt2")
    dense, compressed, result = _full_rank(d, {n for n in open_checkpoint(d).names()
                                               if ".attn." in n or ".mlp." in n})
    assert result.layers["transformer.h.0.attn.c_attn.weight"].transposed
    assert isinstance(compressed.transformer.h[0].attn.c_attn, LowRankLinear)
    assert compressed.transformer.h[0].attn.c_attn.A.shape == (192, 64)  # (out, r): the rule
    ids = _ids()
    torch.testing.assert_close(_logits(compressed, ids), _logits(dense, ids), atol=1e-5, rtol=0)
    # in place (factorize_), full rank then rank 4
    for rank, close in ((64, True), (4, False)):
        model = Models(open_checkpoint(d)).dense()
        factorize_(model, {"transformer.h.0.mlp.c_fc.weight": rank,
                           "transformer.h.1.attn.c_attn.weight": rank})
        err = (_logits(model, ids) - _logits(dense, ids)).abs().max()
        assert (err < 1e-4) == close, (rank, float(err))
    # the pipeline with calibration: Conv1D inputs reach the hooks, outputs load back
    run = _compress(d, tmp_path / "out", calibration=True)
    layer = run.report["layers"]["transformer.h.0.mlp.c_fc.weight"]
    assert layer["rank"] == 32 and "+whiten" in layer["method"] and layer["transposed"]
    # a pre-norm block: its last layer (a Conv1D) adds to the block output as is
    assert run.report["layers"]["transformer.h.1.mlp.c_proj.weight"]["method"].startswith(
        "gram+whiten+compensated+residual")  # then "+bf16" where the CPU has native bf16
    assert run.report["fidelity"]["kind"] == "causal-lm"
    loaded = lowrank.load(tmp_path / "out")
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert state["transformer.h.0.mlp.c_fc.A"].shape == (256, 32)
    config = json.loads((tmp_path / "out" / "lowrank_config.json").read_text())
    reference = _build("gpt2")
    reference.load_state_dict(reconstruct_dense(state, config), strict=False)
    torch.testing.assert_close(_logits(loaded, ids), _logits(reference.eval(), ids),
                               atol=1e-4, rtol=1e-4)
    assert (_logits(loaded, ids) - _logits(dense, ids)).abs().max() > 1e-3  # rank 32 < 64


# --------------------------------------------------------------------------------------------
# Fused projections factored as one matrix


@pytest.mark.parametrize("kind,fused", [
    ("neox", "gpt_neox.layers.0.attention.query_key_value.weight"),
    ("phi3", "model.layers.0.self_attn.qkv_proj.weight"),
])
def test_fused_projection_factored_as_one_end_to_end(hf_dirs, tmp_path, kind, fused):
    d = hf_dirs(kind)
    dense, compressed, _ = _full_rank(d, {fused})
    ids = _ids()
    torch.testing.assert_close(_logits(compressed, ids), _logits(dense, ids), atol=1e-5, rtol=0)
    run = _compress(d, tmp_path / "out", calibration=True)
    assert "+whiten" in run.report["layers"][fused]["method"]
    assert run.report["fidelity"]["kind"] == "causal-lm"
    model = lowrank.load(tmp_path / "out")
    assert torch.isfinite(_logits(model, ids)).all()
    if kind == "phi3":
        assert run.report["layers"]["model.layers.0.mlp.gate_up_proj.weight"]["rank"] == 32


# --------------------------------------------------------------------------------------------
# Encoder-decoder models


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_encoder_decoder_compress_load_calibrate_evaluate(hf_dirs, tmp_path, kind):
    d = hf_dirs(kind)
    dense, compressed, _ = _full_rank(d)
    ids = _ids()
    torch.testing.assert_close(_logits(compressed, ids), _logits(dense, ids), atol=1e-4, rtol=0)
    plain = _compress(d, tmp_path / "plain", calibration=False)
    calibrated = _compress(d, tmp_path / "calibrated", calibration=True)
    for run in (plain, calibrated):
        f = run.report["fidelity"]
        assert f["kind"] == "seq2seq" and f["perplexity"] > 0
    layers = calibrated.report["layers"]
    decoder_ff = next(n for n, e in layers.items() if n.startswith(("decoder.", "model.decoder."))
                      and e["rank"] is not None)
    assert "+whiten" in layers[decoder_ff]["method"]  # the decoder saw the text
    model = lowrank.load(tmp_path / "calibrated")
    assert torch.isfinite(_logits(model, ids)).all()
    if kind == "bart":  # scaled/offset embeddings have their own forward: kept dense
        assert "own forward" in layers["model.decoder.embed_positions.weight"]["reason"]


# --------------------------------------------------------------------------------------------
# An untied LM head that is a copy of the embedding


def test_untied_head_copy_of_embedding_stored_once(hf_dirs, tmp_path):
    d = hf_dirs("llama-copy")
    run = _compress(d, tmp_path / "out", calibration=False)
    layers = run.report["layers"]
    assert layers["lm_head.weight"]["tied_to"] == "model.embed_tokens.weight"
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any(k.startswith("lm_head.") for k in state)
    config = json.loads((tmp_path / "out" / "lowrank_config.json").read_text())
    assert config["layers"]["lm_head.weight"]["tied_to"] == "model.embed_tokens.weight"
    loaded = lowrank.load(tmp_path / "out")
    reference = _build("llama-copy")
    reference.load_state_dict(reconstruct_dense(state, config))
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(reference.eval(), ids),
                               atol=1e-4, rtol=1e-4)
    # a head that differs by one value is not a copy: factored on its own
    other = _build("llama-copy")
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1
    other.save_pretrained(tmp_path / "differs", safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(d / name, tmp_path / "differs" / name)
    run = _compress(tmp_path / "differs", tmp_path / "out2", calibration=False)
    assert "tied_to" not in run.report["layers"]["lm_head.weight"]


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention's in_proj_weight (used inside MHA's forward, not a module weight)


class TinyEncoder(nn.Module):
    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2)  # nested-tensor fast path on (default)
        self.batch_first = batch_first

    def forward(self, ids, pad=None):
        x = self.emb(ids) if self.batch_first else self.emb(ids).transpose(0, 1)
        out = self.encoder(x, src_key_padding_mask=pad)
        return out if self.batch_first else out.transpose(0, 1)


def tiny_encoder():
    torch.manual_seed(0)
    return TinyEncoder().eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_in_proj_full_rank_equals_dense(batch_first):
    torch.manual_seed(0)
    dense = TinyEncoder(batch_first).eval()
    ids = torch.randint(0, 100, (3, 7))
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:] = True
    reference = dense(ids, pad)
    names = [n for n, _ in dense.named_parameters() if n.endswith(("in_proj_weight",
                                                                    "out_proj.weight"))]
    assert len(names) == 4
    for rank, close in ((32, True), (4, False)):
        model = TinyEncoder(batch_first).eval()
        model.load_state_dict(dense.state_dict())
        factorize_(model, {n: rank for n in names})
        attn = model.encoder.layers[0].self_attn
        assert isinstance(attn, LowRankMultiheadAttention)
        assert attn.in_proj_weight.A.shape == (96, rank)
        assert "encoder.layers.0.self_attn.in_proj_weight.A" in model.state_dict()
        out = model(ids, pad)
        assert torch.allclose(out[1:], reference[1:], atol=1e-5) == close
        assert torch.allclose(out[0, :5], reference[0, :5], atol=1e-5) == close
    # need_weights and a causal mask, unbatched, cross-attention (query != key)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    low = swap_lowrank_(nn.ModuleDict({"a": mha}), {"a.in_proj_weight": 32},
                        {"a.in_proj_weight": factorize_matrix(mha.in_proj_weight.detach(), 32,
                                                              "exact")[:2]})["a"]
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    for args, kwargs in (((q, kv, kv), {}), ((q, q, q), {"attn_mask": nn.Transformer.
                         generate_square_subsequent_mask(5), "average_attn_weights": False}),
                         ((q[:, 0],) * 3, {})):
        expected, got = mha(*args, **kwargs), low(*args, **kwargs)
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-4)


def test_multihead_attention_through_pipeline_with_calibration(tmp_path):
    model = tiny_encoder()
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    ids = torch.randint(0, 100, (64, 9), generator=torch.Generator().manual_seed(1))
    save_file({"ids": ids[:48].contiguous()}, str(tmp_path / "calib.safetensors"))
    save_file({"ids": ids[48:].contiguous()}, str(tmp_path / "eval.safetensors"))
    spec = PipelineSpec(["calibrate", "analyze", "plan", "factorize", "evaluate"], {
        "calibrate": {"calibration_file": str(tmp_path / "calib.safetensors"), "samples": 48},
        "plan": {"rank": 8, "min_numel": 1000},
        "evaluate": {"eval_file": str(tmp_path / "eval.safetensors")}})
    run = lowrank.run_pipeline(spec, path, tmp_path / "out", model_factory=tiny_encoder)
    layer = run.report["layers"]["encoder.layers.0.self_attn.in_proj_weight"]
    assert layer["rank"] == 8 and "+whiten" in layer["method"]
    loaded = lowrank.load(tmp_path / "out", model=tiny_encoder())
    assert isinstance(loaded.encoder.layers[1].self_attn, LowRankMultiheadAttention)
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    config = json.loads((tmp_path / "out" / "lowrank_config.json").read_text())
    reference = tiny_encoder()
    reference.load_state_dict(reconstruct_dense(state, config))
    torch.testing.assert_close(loaded(ids[48:]), reference(ids[48:]), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Fused projections split per part (split_fused; off by default: measured worse)


def test_split_fused_factors_each_part_at_equal_parameters(hf_dirs, tmp_path):
    d = hf_dirs("phi3")
    qkv, gate_up = ("model.layers.0.self_attn.qkv_proj.weight",
                    "model.layers.0.mlp.gate_up_proj.weight")
    spec = PipelineSpec(["calibrate", "analyze", "plan", "factorize", "evaluate"], {
        "calibrate": {"samples": 16, "max_length": 32},
        "plan": {"rank": 24, "min_numel": 1000}, "factorize": {"split_fused": True},
        "evaluate": {"samples": 24, "max_length": 32}})
    run = lowrank.run_pipeline(spec, d, tmp_path / "split")
    fused = _compress(d, tmp_path / "fused", True, {"rank": 24, "min_numel": 1000})
    layers = run.report["layers"]
    assert layers[qkv]["split"] == [64, 32, 32] and layers[gate_up]["split"] == [128, 128]
    # per-part rank keeps the parameters of rank 24 as one: 24·(128+64) // (128+3·64) = 14
    assert layers[qkv]["rank"] == 14 and layers[gate_up]["rank"] == 24 * 320 // 384
    assert run.report["params"]["after"] <= fused.report["params"]["after"]
    state = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert state["model.layers.0.self_attn.qkv_proj.A"].shape == (128, 14)
    assert state["model.layers.0.self_attn.qkv_proj.B"].shape == (3 * 14, 64)
    loaded = lowrank.load(tmp_path / "split")
    assert loaded.model.layers[0].self_attn.qkv_proj.split == [64, 32, 32]
    config = json.loads((tmp_path / "split" / "lowrank_config.json").read_text())
    reference = _build("phi3")
    reference.load_state_dict(reconstruct_dense(state, config))
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(reference.eval(), ids),
                               atol=1e-4, rtol=1e-4)
    # in place, GPT-2's transposed c_attn: each part at full rank gives the dense outputs
    from lowrank.stages.factorize import FactorizeSettings

    g = hf_dirs("gpt2")
    dense, model = Models(open_checkpoint(g)).dense(), Models(open_checkpoint(g)).dense()
    factorize_(model, {"transformer.h.0.attn.c_attn.weight": 96},  # 96·256//384: 64 per part
               FactorizeSettings(split_fused=True))
    assert model.transformer.h[0].attn.c_attn.split == [64, 64, 64]
    torch.testing.assert_close(_logits(model, ids), _logits(dense, ids), atol=1e-5, rtol=0)


def test_tokenizer_loaded_once_until_its_files_change(tiny_bert_dir, tmp_path):
    """Each stage that runs the model asks for the tokenizer: loaded once per process, and
    again (here: a clear error) when a file of the directory changes."""
    from lowrank.errors import InputError

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model_dir)
    models = Models(open_checkpoint(model_dir))
    first = models.tokenizer()
    assert Models(open_checkpoint(model_dir)).tokenizer() is first
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (model_dir / name).exists():
            (model_dir / name).write_text("not a tokenizer")
    with pytest.raises(InputError, match="no usable tokenizer"):
        models.tokenizer()


@pytest.mark.parametrize("tied", [True, False])
def test_dense_model_skips_initialization_and_equals_an_initialized_one(tmp_path, tied):
    """Models.dense builds without initializing the weights it then loads (and ties them
    again): parameters and buffers equal those of a model initialized first; a weight the
    checkpoint lacks keeps its initialization (the model is built again the usual way)."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=tied)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    models = Models(open_checkpoint(tmp_path))
    fast, reference = models.dense(), models.architecture()
    reference.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    for (name, a), (_, b) in zip(fast.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert (fast.lm_head.weight is fast.model.embed_tokens.weight) == tied
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(Models(open_checkpoint(tmp_path)).dense().model.norm.weight,
                       torch.ones(32))  # LayerNorm-style initialization, not leftover memory
