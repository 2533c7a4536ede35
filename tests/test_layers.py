import pytest
import torch
from torch import nn

from lowrank.errors import LowrankError
from lowrank.linalg import factorize_matrix
from lowrank.nn.layers import LowRankConv, LowRankEmbedding, LowRankLinear
from lowrank.nn.swap import swap_lowrank_


def load_factors(module, dense_weight, rank):
    A, B, _, _ = factorize_matrix(dense_weight.reshape(dense_weight.shape[0], -1), rank)
    with torch.no_grad():
        module.A.copy_(A)
        module.B.copy_(B)
    return (A @ B).reshape(dense_weight.shape)


def test_linear_equals_dense_with_product_weight():
    dense = nn.Linear(32, 24)
    low = LowRankLinear.like(dense, 6)
    with torch.no_grad():
        low.bias.copy_(dense.bias)
        dense.weight.copy_(load_factors(low, dense.weight, 6))
    x = torch.randn(5, 7, 32)
    torch.testing.assert_close(low(x), dense(x), atol=1e-5, rtol=1e-5)


def test_embedding_equals_dense_with_product_table():
    dense = nn.Embedding(100, 16, padding_idx=0)
    low = LowRankEmbedding.like(dense, 5)
    with torch.no_grad():
        dense.weight.copy_(load_factors(low, dense.weight, 5))
    ids = torch.randint(0, 100, (3, 9))
    torch.testing.assert_close(low(ids), dense(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 10, 3, stride=2, padding=1),
                                  nn.Conv1d(6, 10, 5, padding=2, dilation=1)])
def test_conv_equals_dense_with_product_kernel(conv):
    low = LowRankConv(conv, 4)
    with torch.no_grad():
        low.bias.copy_(conv.bias)
        conv.weight.copy_(load_factors(low, conv.weight, 4))
    x = torch.randn(2, 6, 12, 12) if isinstance(conv, nn.Conv2d) else torch.randn(2, 6, 20)
    torch.testing.assert_close(low(x), conv(x), atol=1e-5, rtol=1e-5)


def test_swap_by_name_and_errors(toy_model):
    swap_lowrank_(toy_model, {"fc1": 4, "emb": 3})
    assert isinstance(toy_model.fc1, LowRankLinear) and isinstance(toy_model.emb, LowRankEmbedding)
    with pytest.raises(LowrankError, match="no module 'nope'"):
        swap_lowrank_(toy_model, {"nope": 2})
    with pytest.raises(LowrankError, match="no low-rank version of LayerNorm"):
        swap_lowrank_(toy_model, {"norm": 2})
    with pytest.raises(LowrankError, match="groups=2"):
        LowRankConv(nn.Conv2d(4, 4, 3, groups=2), 2)
