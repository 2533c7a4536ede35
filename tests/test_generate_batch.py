"""Batched generation on a causal LM: prompts of different lengths padded on the left, positions
from the mask, each row stopping at its own EOS; batched greedy equals one-by-one greedy, on
PyTorch and on the ONNX decoder with its cache."""

import pytest
import torch

import lowrank
from lowrank.errors import InputError
from lowrank.generate import OnnxLM, TorchLM, generate, generate_batch, onnx_session
from lowrank.generate_engines import pad, positions
from lowrank.stages.export import export_onnx
from lowrank.stages.export_decoder import random_prompts


@pytest.fixture(scope="module")
def lm_and_onnx(tiny_llama_dir, tmp_path_factory):
    model = lowrank.models.load_dense(tiny_llama_dir)
    lowrank.factorize_(model, {"model.layers.0.mlp.down_proj.weight": 16, "lm_head.weight": 16})
    path = tmp_path_factory.mktemp("batch") / "model.onnx"
    export_onnx(model.eval(), path)
    return model.eval(), path


def test_left_padding_and_positions():
    ids, mask = pad([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions(mask).tolist() == [[0, 1, 2], [1, 1, 0]]
    with pytest.raises(InputError):
        pad([[1], []])


@pytest.mark.parametrize("path", ["torch", "onnx"])
def test_batched_greedy_equals_one_by_one(lm_and_onnx, path):
    model, onnx_path = lm_and_onnx
    lm = TorchLM(model) if path == "torch" else OnnxLM(onnx_session(onnx_path))
    prompts = random_prompts(model.config.vocab_size, 11, (3, 12, 7, 1))
    alone = [generate_batch(lm, [p], 12)[0] for p in prompts]
    assert len({tuple(a) for a in alone}) == len(prompts)  # the prompts matter
    assert generate_batch(lm, prompts, 12) == alone


def test_batch_matches_transformers_generate_with_left_padding(lm_and_onnx):
    model, _ = lm_and_onnx
    prompts = random_prompts(model.config.vocab_size, 13, (4, 9))
    ids, mask = pad(prompts)
    ref = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         max_new_tokens=8, min_new_tokens=8, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].tolist()
    assert generate_batch(TorchLM(model), prompts, 8) == ref


def test_each_row_stops_at_its_own_eos(lm_and_onnx):
    model, onnx_path = lm_and_onnx
    lm = OnnxLM(onnx_session(onnx_path))
    prompts = random_prompts(model.config.vocab_size, 11, (3, 12))
    free = generate_batch(lm, prompts, 10)
    eos = free[0][2]  # the first row's third token ends it there
    assert eos not in free[0][:2]
    stopped = generate_batch(lm, prompts, 10, eos=eos)
    assert stopped[0] == free[0][:3]
    cut = free[1].index(eos) + 1 if eos in free[1] else 10
    assert stopped[1] == free[1][:cut]  # the other row goes on


def test_python_api_takes_a_list_of_prompts(lm_and_onnx, tiny_llama_dir):
    from transformers import AutoTokenizer

    model, onnx_path = lm_and_onnx
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts = ["the cat sat", "a low rank model is small and fast"]
    batched = generate(onnx_path, tokenizer, texts, max_new_tokens=6)
    assert batched == [generate(onnx_path, tokenizer, t, max_new_tokens=6) for t in texts]
    assert generate(model, tokenizer, texts, max_new_tokens=6) == batched
