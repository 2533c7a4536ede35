"""report.html's parameters plot: matrices laid out by block (lowrank.stages.report.block_grid)."""

import math

import matplotlib

from lowrank.stages.report import block_grid, params_figure

matplotlib.use("Agg")


def entry(before, after):
    return {"params_before": before, "params_after": after}


def test_block_grid_lays_matrices_out_by_block_and_keeps_the_others_apart():
    layers = {"model.embed_tokens.weight": entry(100, 40),
              "model.layers.0.mlp.down_proj.weight": entry(10, 10),
              "model.layers.0.self_attn.q_proj.weight": entry(10, 5),
              "model.layers.2.self_attn.q_proj.weight": entry(10, 2)}
    labels, count, grid, others = block_grid(layers)
    assert labels == ["mlp.down_proj", "self_attn.q_proj"] and count == 3
    assert grid[0][0] == 1.0 and math.isnan(grid[0][1]) and math.isnan(grid[0][2])
    assert grid[1] == [0.5, grid[1][1], 0.2] and math.isnan(grid[1][1])  # block 1 has none
    assert others == {"model.embed_tokens": 0.4}


def test_block_grid_names_the_stack_when_there_are_several():
    layers = {f"{stack}.block.{i}.layer.0.SelfAttention.q.weight": entry(8, 4)
              for stack in ("encoder", "decoder") for i in range(2)}
    labels, count, grid, _ = block_grid(layers)
    assert sorted(labels) == ["decoder.block: layer.0.SelfAttention.q",
                              "encoder.block: layer.0.SelfAttention.q"]
    assert count == 2 and grid == [[0.5, 0.5], [0.5, 0.5]]


def testparams_figure_is_small_for_a_deep_model_and_bars_without_blocks():
    import matplotlib.pyplot as plt

    deep = {f"model.layers.{i}.mlp.{p}.weight": entry(10, i % 10)
            for i in range(100) for p in ("up_proj", "down_proj")}
    fig = params_figure(deep, plt)
    assert fig.get_size_inches()[1] < 4  # one row per matrix kind, not per matrix
    assert len(fig.axes) == 2  # the grid and its colour bar: nothing outside the blocks
    plt.close(fig)
    flat = {f"fc{i}.weight": entry(10, 5) for i in range(3)}
    fig = params_figure(flat, plt)
    assert len(fig.axes[0].patches) == 6  # before and after bars of each matrix
    plt.close(fig)
