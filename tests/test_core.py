"""Core: the compressed path equals timm when nothing is compressed, masked equals materialised,
ATME keeps the grid, MACs match a counted reference, ONNX export matches PyTorch."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from caitsearch import BlockConfig, CompressionConfig, ConfigError, ModelSpec, compress, create_model, materialize
from caitsearch.compress.atme import TokenGrid, assign_lines, line_similarity
from caitsearch.space import SearchSpace

torch.manual_seed(0)

# (model name, create kwargs): one per ViT feature the compressed path must reproduce
VARIANTS = {
    "deit_tiny": ("deit_tiny_patch16_224", {}),
    "distilled": ("deit_tiny_distilled_patch16_224", {"img_size": (96, 96)}),
    "layerscale_deit3": ("deit3_small_patch16_224", {"img_size": (96, 96)}),
    "registers_gap": ("vit_little_patch16_reg4_gap_256", {"img_size": (96, 96)}),
    "non_square": ("deit_tiny_patch16_224", {"img_size": (224, 160)}),
    "odd_grid": ("deit_tiny_patch16_224", {"img_size": (240, 240)}),
    "avgmax_pool": ("deit_tiny_patch16_224", {"img_size": (64, 64), "global_pool": "avgmax", "class_token": False}),
}


def make(variant: str) -> torch.nn.Module:
    name, kwargs = VARIANTS[variant]
    model = create_model(name, **kwargs)
    for blk in model.blocks:  # LayerScale starts near 1e-5 in timm; make it matter
        for ls in (blk.ls1, blk.ls2):
            if hasattr(ls, "gamma"):
                ls.gamma.data.uniform_(0.5, 1.5)
    return model


def images(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    spec = ModelSpec.from_model(model)
    return torch.randn(batch, spec.in_chans, *spec.img_size)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_compression_equals_stock_timm(variant):
    model = make(variant)
    x = images(model)
    compressed = compress(model, CompressionConfig.dense(model))
    with torch.no_grad():
        diff = (model(x) - compressed(x)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.slow
def test_model_features_are_covered():
    specs = {v: ModelSpec.from_model(make(v)) for v in VARIANTS}
    assert specs["distilled"].distilled and specs["distilled"].num_prefix_tokens == 2
    assert specs["registers_gap"].num_prefix_tokens >= 4 and specs["registers_gap"].global_pool == "avg"
    assert specs["non_square"].grid == (14, 10)
    assert specs["odd_grid"].grid == (15, 15)
    assert hasattr(make("layerscale_deit3").blocks[0].ls1, "gamma")


@pytest.mark.parametrize("variant", ["deit_tiny", "distilled", "layerscale_deit3", "registers_gap", "non_square",
                                     "odd_grid", "avgmax_pool"])
@pytest.mark.slow
def test_masked_equals_materialised_for_random_configs(variant):
    model = make(variant)
    space = SearchSpace(ModelSpec.from_model(model))
    rng = random.Random(variant)
    x = images(model)
    for _ in range(6):
        config = space.random_config(rng)
        masked = compress(model, config, calib=images(model, 4))
        plain = materialize(masked)
        with torch.no_grad():
            diff = (masked(x) - plain(x)).abs().max().item()
        assert diff <= 1e-4, config
        assert plain.config.macs(model)["total"] < CompressionConfig.dense(model).macs(model)["total"]
        assert all(isinstance(m, torch.nn.Linear) for m in (plain.vit.blocks[0].attn.qkv, plain.vit.blocks[0].mlp.fc1))
        assert all(b.attn.qk_mask is None and b.mlp.mask is None for b in plain.vit.blocks)


def test_materialised_widths_and_original_softmax_scale():
    model = make("deit_tiny")
    block = BlockConfig(keep_qk=13, keep_v=40, keep_mlp=300)
    config = CompressionConfig.dense(model).with_blocks([block] * 12)
    plain = materialize(compress(model, config))
    attn = plain.vit.blocks[0].attn
    heads = model.blocks[0].attn.num_heads
    assert attn.qkv.out_features == heads * (2 * 13 + 40)
    assert attn.proj.in_features == heads * 40
    assert plain.vit.blocks[0].mlp.fc1.out_features == 300
    assert attn.scale == pytest.approx(64 ** -0.5)  # not 13 ** -0.5


def test_cdcp_masks_are_shared_by_heads_and_by_q_and_k():
    model = make("deit_tiny")
    config = CompressionConfig.uniform(model, keep_rate=0.5)
    masked = compress(model, config, calib=images(model))
    for blk in masked.vit.blocks:
        assert blk.attn.qk_mask.shape == (64,) and int(blk.attn.qk_mask.sum()) == 32
        assert blk.attn.v_mask.shape == (64,) and blk.mlp.mask.shape == (768,)


def test_calibration_changes_importance():
    """With calibration data, qk importance follows E|q_c k_c| rather than weight norms."""
    model = make("deit_tiny")
    config = CompressionConfig.uniform(model, keep_rate=0.25)
    by_weights = compress(model, config)
    by_activations = compress(model, config, calib=images(model, 8))
    masks = lambda m: torch.stack([b.attn.qk_mask for b in m.vit.blocks])
    assert not torch.equal(masks(by_weights), masks(by_activations))


# ----- ATME --------------------------------------------------------------------------------------

def coordinate_tokens(batch: int, h: int, w: int, prefix: int = 1) -> torch.Tensor:
    """Tokens whose first two features are their own (row, col); the rest random."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([rows, cols], -1).float().reshape(1, h * w, 2).expand(batch, -1, -1)
    x = torch.cat([coords, torch.randn(batch, h * w, 6)], -1)
    return torch.cat([torch.randn(batch, prefix, 8), x], 1)


@pytest.mark.parametrize("h,w", [(14, 14), (15, 11), (7, 9)])
def test_merges_keep_grid_order_sizes_and_unmerge(h, w):
    batch = 3
    x = coordinate_tokens(batch, h, w)
    grid = TokenGrid(1, h, w)
    full = grid.unmerge(x, h, w)
    assert torch.equal(full.reshape(batch, -1, 8), x[:, 1:])  # identity when nothing merged
    for step, axis in enumerate(["cols", "rows", "cols", "rows", "cols"]):
        lines = grid.w if axis == "cols" else grid.h
        count = max(1, lines // 3)
        keys = torch.randn(batch, x.shape[1], 16)
        x, grid = grid.merge(x, keys, axis, count)
        assert x.shape == (batch, 1 + grid.h * grid.w, 8)  # static shape
        assert float(grid.row_height.sum(1).min()) == h and float(grid.col_width.sum(1).max()) == w
        assert torch.allclose(grid.token_sizes().sum(1), torch.full((batch,), float(h * w)))
        patches = x[:, 1:].reshape(batch, grid.h, grid.w, 8)
        # monotonic spatial order: merged coordinates increase along rows and columns
        assert (patches[:, :, 1:, 1] > patches[:, :, :-1, 1]).all()
        assert (patches[:, 1:, :, 0] > patches[:, :-1, :, 0]).all()
        # each merged coordinate is the size-weighted mean of the lines it covers
        ends = grid.col_width.cumsum(1)
        centre = ends - grid.col_width / 2 - 0.5
        assert torch.allclose(patches[:, 0, :, 1], centre, atol=1e-4)
        restored = grid.unmerge(x, h, w)
        assert restored.shape == (batch, h, w, 8)
        # every original position maps back to a token whose box contains it
        assert ((restored[..., 1] - torch.arange(w).float()).abs() <= grid.col_width.max() / 2 + 1e-4).all()
    assert x[:, 0].abs().sum() > 0  # prefix tokens untouched by merging


def test_merge_picks_the_most_similar_pair():
    batch, h, w, d = 2, 4, 8, 32
    keys = torch.randn(batch, h, w, d)
    keys[0, :, 5] = keys[0, :, 4] * 3.0  # image 0: source column 5 is a copy of its left neighbour 4
    keys[1, :, 3] = keys[1, :, 4] + 1e-3  # image 1: source column 3 is almost its right neighbour 4
    target = assign_lines(line_similarity(keys, dim=2), count=1)
    assert target[0].tolist() == [0, 1, 2, 3, 4, 4, 5, 6]
    assert target[1].tolist() == [0, 1, 2, 3, 3, 4, 5, 6]
    # rows work the same way
    keys_rows = keys.transpose(1, 2).contiguous()
    assert torch.equal(assign_lines(line_similarity(keys_rows, dim=1), count=1), target)


def test_proportional_attention_equals_attention_over_duplicates():
    """Merging two identical columns with log(size) in the logits changes nothing for the rest."""
    batch, heads, h, w, d = 2, 3, 4, 6, 16
    base = torch.randn(batch, h, w, heads * d)
    base[:, :, 3] = base[:, :, 2]  # column 3 duplicates column 2
    tokens = torch.cat([torch.randn(batch, 1, heads * d), base.flatten(1, 2)], 1)
    grid = TokenGrid(1, h, w)
    keys = tokens.view(batch, -1, heads, d).mean(2)
    merged, grid = grid.merge(tokens, keys, "cols", 1)
    assert grid.col_width[0].tolist() == [1, 1, 2, 1, 1]

    def attend(x, bias):
        q = x.view(batch, x.shape[1], heads, d).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=bias).transpose(1, 2).flatten(2)

    full = attend(tokens, None)
    small = attend(merged, grid.bias)
    keep = [0] + [1 + r * w + c for r in range(h) for c in range(w) if c != 3]
    assert torch.allclose(full[:, keep], small, atol=1e-5)


def test_weighted_pooling_counts_merged_tokens_by_size():
    model = make("registers_gap")
    spec = ModelSpec.from_model(model)
    blocks = [BlockConfig(spec.head_dim, spec.head_dim, spec.mlp_hidden)] * spec.depth
    blocks[0] = BlockConfig(spec.head_dim, spec.head_dim, spec.mlp_hidden, "cols", 3)
    compressed = compress(model, CompressionConfig.dense(model).with_blocks(blocks))
    x = images(model)
    with torch.no_grad():
        tokens, grid = compressed.forward_features(x)
        pooled = compressed.forward_head(tokens, grid, pre_logits=True)
        # the size-weighted mean equals the plain mean of the unmerged map (before fc_norm)
        full = grid.unmerge(tokens, *spec.grid).flatten(1, 2).mean(1)
    assert torch.allclose(pooled, compressed.vit.fc_norm(full), atol=1e-5)


def test_feature_map_is_full_resolution():
    model = make("non_square")
    config = CompressionConfig.uniform(model, keep_rate=0.5, merge_every=3)
    fmap = materialize(compress(model, config)).feature_map(images(model))
    assert fmap.shape == (2, 192, 14, 10)


# ----- config, MACs ------------------------------------------------------------------------------

def test_config_roundtrip_and_shapes(tmp_path):
    model = make("odd_grid")
    config = CompressionConfig.uniform(model, keep_rate=0.6, merge_every=2)
    path = tmp_path / "cfg.json"
    config.save(path)
    again = CompressionConfig.load(path)
    assert again == config
    shapes = again.shapes(model)
    assert shapes[0].h_in == 15 and shapes[0].w_out == 15 - config.blocks[0].merge_count
    assert all(a.tokens_out == b.tokens_in for a, b in zip(shapes, shapes[1:]))
    assert shapes[-1].tokens_out < shapes[0].tokens_in


@pytest.mark.parametrize("variant", ["deit_tiny", "distilled", "odd_grid"])
def test_analytic_macs_match_counted_reference(variant):
    model = make(variant)
    space = SearchSpace(ModelSpec.from_model(model))
    for seed in range(3):
        config = space.random_config(random.Random(seed))
        plain = materialize(compress(model, config))
        with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            plain(images(model, 1))
        counted = counter.get_total_flops() / 2
        analytic = config.macs(model)["total"]
        assert abs(analytic - counted) / counted <= 0.02, (analytic, counted)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["blocks"].pop(), "blocks but"),
    (lambda d: d["blocks"][0].update(merge_axis="cols", merge_count=8), "more than half"),
    (lambda d: d["blocks"][1].update(keep_qk=0), "between 1 and"),
    (lambda d: d["blocks"][1].update(keep_mlp=5000), "between 1 and"),
    (lambda d: d["blocks"][2].update(merge_axis="diagonal", merge_count=1), "merge_axis"),
])
def test_invalid_configs_are_refused(mutate, message):
    model = make("deit_tiny")
    data = CompressionConfig.dense(model).to_dict()
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        CompressionConfig.from_dict(data).validate(model)


# ----- export ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_onnx_export_of_compressed_model_matches_pytorch(tmp_path):
    from caitsearch.export import export_onnx

    model = make("registers_gap")
    config = CompressionConfig.uniform(model, keep_rate=0.5, merge_every=2)
    plain = materialize(compress(model, config))
    result = export_onnx(plain, tmp_path / "m.onnx", batch_size=2)
    assert result["max_abs_diff"] <= 1e-3 and (tmp_path / "m.onnx").stat().st_size > 1e6
