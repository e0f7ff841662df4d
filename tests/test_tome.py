"""The ToMe baseline: bipartite matching picks the most similar pairs, merging is a size-weighted
average that conserves mass, proportional attention makes merged duplicates invisible, sources
track every patch, and strategies restrict the search space as documented."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from caitsearch import CompressionConfig, ConfigError, ModelSpec, compress, create_model, materialize
from caitsearch.compress.tome import bipartite_match, merge_tokens, new_positions, start_set
from caitsearch.space import STRATEGIES, SearchSpace

torch.manual_seed(0)


def test_matching_picks_the_most_similar_a_token_and_its_partner():
    batch, n, d = 2, 10, 16
    keys = torch.randn(batch, n, d)
    keys[0, 4] = keys[0, 7] * 2.0  # A token 4 (A index 2) is B token 7 (B index 3), scaled
    keys[1, 0] = keys[1, 1] + 1e-4  # A token 0 is almost B token 1 (B index 0)
    m = bipartite_match(keys, r=1)
    assert m.src.tolist() == [[2], [0]]
    assert m.dst.tolist() == [[3], [0]]
    assert m.keep.shape == (batch, 4)
    assert sorted(m.keep[0].tolist() + m.src[0].tolist()) == list(range(5))


@pytest.mark.parametrize("n, r", [(10, 3), (11, 5), (9, 0)])
def test_merge_is_a_size_weighted_average_that_conserves_mass(n, r):
    batch, c = 3, 8
    x = torch.randn(batch, n, c)
    sizes = torch.randint(1, 4, (batch, n)).float()
    m = bipartite_match(torch.randn(batch, n, 6), r)
    merged, new_sizes, pos = merge_tokens(x, sizes, m)
    assert merged.shape == (batch, n - r, c) and new_sizes.shape == (batch, n - r)
    assert torch.allclose(new_sizes.sum(1), sizes.sum(1))
    assert torch.allclose((merged * new_sizes[..., None]).sum(1), (x * sizes[..., None]).sum(1), atol=1e-4)
    # every input token ends where new_positions says, and that token is its weighted group mean
    assert torch.equal(pos, new_positions(n, m))
    for b in range(batch):
        for j in range(n - r):
            group = (pos[b] == j).nonzero().flatten()
            expect = (x[b, group] * sizes[b, group, None]).sum(0) / sizes[b, group].sum()
            assert torch.allclose(merged[b, j], expect, atol=1e-5)


def test_proportional_attention_equals_attention_over_duplicates():
    """Merging a token into its exact duplicate with log(size) in the logits changes nothing else."""
    batch, heads, n, d = 2, 3, 12, 16
    patches = torch.randn(batch, n, heads * d)
    patches[:, 6] = patches[:, 3]  # A token 6 duplicates B token 3: the best possible match
    tokens = torch.cat([torch.randn(batch, 1, heads * d), patches], 1)
    keys = tokens.view(batch, -1, heads, d).mean(2)
    merged, state = start_set(tokens, 1, track=True).merge(tokens, keys, "tokens", 1)
    assert state.sizes.sum(1).tolist() == [n, n] and state.sizes.max() == 2

    def attend(x, bias):
        q = x.view(batch, x.shape[1], heads, d).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=bias).transpose(1, 2).flatten(2)

    full = attend(tokens, None)
    small = attend(merged, state.bias)
    # through the tracked sources, every patch reads back the token that stands for it
    restored = state.unmerge(torch.cat([small[:, :1], small[:, 1:]], 1), 3, 4).flatten(1, 2)
    assert torch.allclose(restored, full[:, 1:], atol=1e-5)
    assert torch.allclose(small[:, 0], full[:, 0], atol=1e-5)


@pytest.mark.slow
def test_tome_model_runs_exports_shapes_and_feature_map(tmp_path):
    model = create_model("deit_tiny_patch16_224", img_size=(64, 64)).eval()
    spec = ModelSpec.from_model(model)
    config = CompressionConfig.tome(spec, r=5)
    assert [b.merge_count for b in config.blocks][:4] == [5, 5, 3, 1]  # r, capped at half the tokens left
    shapes = config.shapes(spec)
    assert shapes[-1].tokens_out == 1 + 16 - sum(b.merge_count for b in config.blocks)
    compressed = materialize(compress(model, config)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert compressed(x).shape == (2, 1000)
        assert compressed.feature_map(x).shape == (2, spec.embed_dim, 4, 4)
        # r = 0 everywhere is the dense model
        dense_path = compress(model, CompressionConfig.tome(spec, r=0))
        assert torch.allclose(dense_path(x), model(x), atol=1e-5)
    from caitsearch.export import export_onnx

    assert export_onnx(compressed, tmp_path / "tome.onnx", batch_size=2)["max_abs_diff"] <= 1e-3


def test_grid_merges_then_tome_unmerge_to_the_full_map():
    model = create_model("deit_tiny_patch16_224", img_size=(96, 96)).eval()
    spec = ModelSpec.from_model(model)
    blocks = list(CompressionConfig.dense(spec).blocks)
    blocks[0] = blocks[0].__class__(spec.head_dim, spec.head_dim, spec.mlp_hidden, "cols", 2)
    blocks[1] = blocks[1].__class__(spec.head_dim, spec.head_dim, spec.mlp_hidden, "tokens", 6)
    config = CompressionConfig.dense(spec).with_blocks(blocks)
    compressed = compress(model, config).eval()
    with torch.no_grad():
        assert compressed.feature_map(torch.randn(1, 3, 96, 96)).shape == (1, spec.embed_dim, 6, 6)
    blocks[2] = blocks[2].__class__(spec.head_dim, spec.head_dim, spec.mlp_hidden, "rows", 1)
    with pytest.raises(ConfigError, match="cannot follow a ToMe merge"):
        CompressionConfig.dense(spec).with_blocks(blocks).validate(spec)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategies_restrict_the_space(strategy):
    spec = ModelSpec.from_model(create_model("deit_fmnist_patch4_32"))
    space = SearchSpace.for_strategy(spec, strategy)
    assert space.strategy == strategy
    import random

    rng = random.Random(0)
    configs = [space.random_config(rng) for _ in range(20)] + space.uniform_schedules()
    axes = {b.merge_axis for c in configs for b in c.blocks} - {"none"}
    pruned = any(b.keep_qk < spec.head_dim or b.keep_v < spec.head_dim or b.keep_mlp < spec.mlp_hidden
                 for c in configs for b in c.blocks)
    expected_axes = {"cait": {"cols", "rows"}, "atme": {"cols", "rows"}, "cdcp": set(), "tome": {"tokens"}}
    assert axes == expected_axes[strategy]
    assert pruned == (strategy in ("cait", "cdcp"))
    for c in configs:  # every point is a valid config whose parameters reproduce it
        c.validate(spec)
        assert space.config_from_params(space.params_of(c)) == c
