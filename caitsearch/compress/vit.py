"""The compressed ViT: timm's modules and weights, run block by block with ATME and CDCP.

`compress(model, config)` wraps a deep copy of a timm `VisionTransformer`: each `Block` becomes a
`CaitBlock` that keeps the original norms, LayerScale, drop-path and linear layers, merges grid
lines between attention and MLP, and multiplies pruned channels by {0,1} masks.
`materialize(compressed)` slices the linear layers to the kept channels, giving a plain smaller
model with the same outputs. Attention always goes through `scaled_dot_product_attention` with the
original softmax scale, so the fused kernel stays on the compressed path.
"""
from __future__ import annotations

import copy
from typing import Container, Iterable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BlockConfig, CompressionConfig, MergeAxis
from ..errors import CaitsearchError
from ..models import POOLS_THAT_AVERAGE, ModelSpec, mismatch
from .atme import TokenGrid
from .cdcp import ChannelStats, attention_scores, head_rows, kept_indices, mlp_scores, slice_linear, top_k_mask
from .tome import TokenSet

TokenLayout = Union[TokenGrid, TokenSet]  # where the tokens are: on a grid (ATME) or a set (ToMe)


class CaitAttention(nn.Module):
    """timm `Attention` with shared qk/v channel masks, per-head widths that may differ, an
    additive attention bias for merged tokens, and the mean key per token for ATME."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim  # of the original model: fixes the softmax scale
        self.scale = attn.scale
        self.dim_qk = self.dim_v = attn.head_dim
        self.qkv, self.proj = attn.qkv, attn.proj
        self.q_norm, self.k_norm, self.norm = attn.q_norm, attn.k_norm, attn.norm
        self.attn_drop, self.proj_drop = attn.attn_drop, attn.proj_drop
        self.register_buffer("qk_mask", None)
        self.register_buffer("v_mask", None)
        self.stats: Optional[ChannelStats] = None

    def forward(
        self, x: torch.Tensor, bias: Optional[torch.Tensor] = None, want_keys: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        batch, tokens, _ = x.shape
        heads, dqk, dv = self.num_heads, self.dim_qk, self.dim_v
        qkv = self.qkv(x)
        if dqk == dv:
            q, k, v = qkv.view(batch, tokens, 3, heads, dqk).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (
                t.view(batch, tokens, heads, -1).transpose(1, 2)
                for t in qkv.split([heads * dqk, heads * dqk, heads * dv], dim=-1)
            )
        q, k = self.q_norm(q), self.k_norm(k)
        if self.stats is not None:  # before masking, so a pruned channel can still win its place back
            with torch.no_grad():
                self.stats.add("qk", (q * k).abs().mean(dim=(0, 2)))
                self.stats.add("v", v.abs().mean(dim=(0, 2)))
        if self.qk_mask is not None:
            q, k = q * self.qk_mask, k * self.qk_mask
        if self.v_mask is not None:
            v = v * self.v_mask
        keys = k.mean(dim=1) if want_keys else None
        # the fused kernels need one head width for q, k and v: zero-pad the narrower side
        width = max(dqk, dv)
        if dqk < width:
            q, k = F.pad(q, (0, width - dqk)), F.pad(k, (0, width - dqk))
        elif dv < width:
            v = F.pad(v, (0, width - dv))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0, scale=self.scale
        )
        if dv < width:
            out = out[..., :dv]
        out = out.transpose(1, 2).reshape(batch, tokens, heads * dv)
        return self.proj_drop(self.proj(self.norm(out))), keys

    def set_masks(self, qk: Optional[torch.Tensor], v: Optional[torch.Tensor]) -> None:
        ref = self.proj.weight
        self.qk_mask = None if qk is None else qk.to(ref.device, ref.dtype)
        self.v_mask = None if v is None else v.to(ref.device, ref.dtype)

    def materialize_(self) -> None:
        """Slice qkv rows and proj columns to the kept channels and drop the masks."""
        heads, dqk, dv = self.num_heads, self.dim_qk, self.dim_v
        qk, v = kept_indices(self.qk_mask, dqk), kept_indices(self.v_mask, dv)
        rows = torch.cat([
            head_rows(qk, heads, dqk),
            head_rows(qk, heads, dqk, offset=heads * dqk),
            head_rows(v, heads, dv, offset=2 * heads * dqk),
        ])
        self.qkv = slice_linear(self.qkv, rows=rows)
        self.proj = slice_linear(self.proj, cols=head_rows(v, heads, dv))
        self.dim_qk, self.dim_v = len(qk), len(v)
        self.qk_mask = self.v_mask = None


class CaitMlp(nn.Module):
    """timm `Mlp` with a mask on the hidden channels."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.fc1, self.act, self.drop1, self.norm, self.fc2, self.drop2 = (
            mlp.fc1, mlp.act, mlp.drop1, mlp.norm, mlp.fc2, mlp.drop2
        )
        self.register_buffer("mask", None)
        self.stats: Optional[ChannelStats] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if self.stats is not None:  # before masking, as in CaitAttention
            with torch.no_grad():
                self.stats.add("act", h.abs().mean(dim=(0, 1)))
        if self.mask is not None:
            h = h * self.mask
        return self.drop2(self.fc2(self.norm(self.drop1(h))))

    def set_mask(self, mask: Optional[torch.Tensor]) -> None:
        ref = self.fc2.weight
        self.mask = None if mask is None else mask.to(ref.device, ref.dtype)

    def materialize_(self) -> None:
        keep = kept_indices(self.mask, self.fc1.out_features)
        self.fc1 = slice_linear(self.fc1, rows=keep)
        self.fc2 = slice_linear(self.fc2, cols=keep)
        self.mask = None


class CaitBlock(nn.Module):
    """`x + attn(norm1(x))`, then a token merge (ATME on the grid, or ToMe), then
    `x + mlp(norm2(x))` (LayerScale kept)."""

    def __init__(self, block: nn.Module, cfg: BlockConfig) -> None:
        super().__init__()
        self.norm1, self.ls1, self.drop_path1 = block.norm1, block.ls1, block.drop_path1
        self.norm2, self.ls2, self.drop_path2 = block.norm2, block.ls2, block.drop_path2
        self.attn = CaitAttention(block.attn)
        self.mlp = CaitMlp(block.mlp)
        self.merge_axis = cfg.merge_axis
        self.merge_count = cfg.merge_count if cfg.merge_axis != MergeAxis.NONE else 0

    def forward(self, x: torch.Tensor, grid: TokenLayout) -> tuple[torch.Tensor, TokenLayout]:
        out, keys = self.attn(self.norm1(x), grid.bias, want_keys=self.merge_count > 0)
        x = x + self.drop_path1(self.ls1(out))
        if self.merge_count:
            x, grid = grid.merge(x, keys, self.merge_axis, self.merge_count)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, grid


class CaitViT(nn.Module):
    """A timm ViT whose blocks run ATME and CDCP; `vit` is the timm model with its blocks replaced."""

    def __init__(self, vit: nn.Module, config: CompressionConfig) -> None:
        super().__init__()
        self.spec: ModelSpec = config.validate(vit)
        self.config = config
        vit.blocks = nn.ModuleList(CaitBlock(b, c) for b, c in zip(vit.blocks, config.blocks))
        self.vit = vit

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The stem: images `(B, C, H, W)` to the tokens `(B, N, C)` the first block sees."""
        v = self.vit
        return v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))

    def forward_features(self, x: torch.Tensor, track: bool = False) -> tuple[torch.Tensor, TokenLayout]:
        """Final tokens and their layout; `track` keeps ToMe's patch sources, which `feature_map` needs."""
        return self._blocks(self.embed(x), track)

    def _blocks(self, x: torch.Tensor, track: bool) -> tuple[torch.Tensor, TokenLayout]:
        """Stem tokens `(B, N, C)` through every block and the final norm, with their layout."""
        grid: TokenLayout = TokenGrid(self.spec.num_prefix_tokens, *self.spec.grid, track=track)
        for blk in self.vit.blocks:
            x, grid = blk(x, grid)
        return self.vit.norm(x), grid

    def forward_head(self, x: torch.Tensor, grid: TokenLayout, pre_logits: bool = False) -> torch.Tensor:
        v = self.vit
        if not grid.merged or v.global_pool not in POOLS_THAT_AVERAGE:
            return v.forward_head(x, pre_logits=pre_logits)
        # merged tokens stand for several patches: average them weighted by size
        sizes = grid.token_sizes()
        tokens = x if v.pool_include_prefix else x[:, grid.prefix:]
        if v.pool_include_prefix:
            sizes = F.pad(sizes, (grid.prefix, 0), value=1.0)
        weights = (sizes / sizes.sum(1, keepdim=True)).to(x.dtype)
        pooled = (tokens * weights[:, :, None]).sum(1)
        if v.global_pool == "avgmax":
            pooled = 0.5 * (pooled + tokens.amax(dim=1))
        x = v.head_drop(v.fc_norm(pooled))
        return x if pre_logits else v.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(*self.forward_features(x))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features unmerged to the full patch grid, `(B, C, H, W)`, for dense heads."""
        return self.feature_cells(x)[0]

    def feature_cells(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
        """`feature_map` and, where ATME merged, where every patch sits in its grid cell
        (`TokenGrid.cell_positions`: `(B, H)` and `(B, W)` slots); None for a dense or ToMe map."""
        return self.feature_levels(x)[:2]

    def feature_levels(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """`feature_cells` and the stem's patch tokens on the grid, `(B, C, H, W)`: the one level
        no merge has touched, which a dense head can use as a skip connection (as U-Nets do)."""
        stem = self.embed(x)
        tokens, grid = self._blocks(stem, track=True)
        cells = grid.cell_positions(*self.spec.grid) if isinstance(grid, TokenGrid) else None
        height, width = self.spec.grid
        stem_map = stem[:, self.spec.num_prefix_tokens:].transpose(1, 2).reshape(len(x), -1, height, width)
        return grid.unmerge(tokens, height, width).permute(0, 3, 1, 2), cells, stem_map


Calibration = Union[torch.Tensor, Iterable]


def _batches(calib: Calibration) -> Iterable[torch.Tensor]:
    for item in [calib] if isinstance(calib, torch.Tensor) else calib:
        yield item[0] if isinstance(item, (tuple, list)) else item


@torch.no_grad()
def collect_channel_stats(model: CaitViT, calib: Calibration) -> list[tuple[ChannelStats, ChannelStats]]:
    """Run calibration images through the model (merges on, masks as they are) and return
    per-block (attention, mlp) activation statistics. The images go to the model's device and
    dtype (a bf16 or fp16 model takes half-precision images)."""
    blocks = list(model.vit.blocks)
    for blk in blocks:
        blk.attn.stats, blk.mlp.stats = ChannelStats(), ChannelStats()
    was_training = model.training
    model.eval()
    weight = next(model.parameters())
    try:
        for images in _batches(calib):
            model(images.to(weight.device, weight.dtype))
        return [(blk.attn.stats, blk.mlp.stats) for blk in blocks]
    finally:
        model.train(was_training)
        for blk in blocks:
            blk.attn.stats = blk.mlp.stats = None


def full_widths(block: CaitBlock) -> dict[str, int]:
    """Each CDCP group's width in `block` as it is now (qk and v per head, MLP hidden)."""
    return {"qk": block.attn.dim_qk, "v": block.attn.dim_v, "mlp": block.mlp.fc1.out_features}


def set_block_masks(block: CaitBlock, keeps: Mapping[str, int],
                    stats: tuple[Optional[ChannelStats], Optional[ChannelStats]] = (None, None),
                    masked: Optional[Container[str]] = None) -> None:
    """Mask each CDCP group of `block` ("qk", "v", "mlp") to its `keeps[group]` most important
    channels (importance from `stats` of the attention and MLP, else from the weights). Groups
    not in `masked` (default: those kept below full width) get no mask at all."""
    full = full_widths(block)
    masked = {g for g in full if keeps[g] < full[g]} if masked is None else masked
    a, m = block.attn, block.mlp
    qk_scores, v_scores = attention_scores(a.qkv, a.proj, a.num_heads, a.dim_qk, stats[0])
    scores = {"qk": qk_scores, "v": v_scores, "mlp": mlp_scores(m.fc1, m.fc2, stats[1])}
    mask = {g: top_k_mask(scores[g], keeps[g]) if g in masked else None for g in full}
    a.set_masks(mask["qk"], mask["v"])
    m.set_mask(mask["mlp"])


def prune_channels(model: CaitViT, calib: Optional[Calibration] = None) -> None:
    """Set every block's CDCP masks to the top-k channels by importance."""
    blocks = list(model.vit.blocks)
    stats = collect_channel_stats(model, calib) if calib is not None else [(None, None)] * len(blocks)
    for blk, cfg, block_stats in zip(blocks, model.config.blocks, stats):
        set_block_masks(blk, {"qk": cfg.keep_qk, "v": cfg.keep_v, "mlp": cfg.keep_mlp}, block_stats)


def compress(model: nn.Module, config: CompressionConfig, calib: Optional[Calibration] = None) -> CaitViT:
    """A compressed copy of `model` that runs ATME and CDCP masks with the same weights.

    `calib` (a batch of images, or an iterable of batches or (images, labels) pairs) makes channel
    importance use real activations; without it importance comes from the weights alone.
    """
    config.validate(model)
    compressed = CaitViT(copy.deepcopy(model), config)
    if any(b.keep_qk < compressed.spec.head_dim or b.keep_v < compressed.spec.head_dim
           or b.keep_mlp < compressed.spec.mlp_hidden for b in config.blocks):
        prune_channels(compressed, calib)
    return compressed


def materialize(compressed: CaitViT) -> CaitViT:
    """The plain smaller model: linear layers sliced to the kept channels, no masks, same outputs."""
    out = copy.deepcopy(compressed)
    for blk in out.vit.blocks:
        blk.attn.materialize_()
        blk.mlp.materialize_()
    return out


def is_compressed_state(state: dict) -> bool:
    """True for a state dict saved from a `CaitViT` (keys under `vit.`), False for a timm one."""
    return bool(state) and all(k.startswith("vit.") for k in state)


def load_materialized(model: nn.Module, config: CompressionConfig, state: dict, source: object = "checkpoint") -> CaitViT:
    """Rebuild a materialised compressed model of `model` and `config` and load `state` (read from
    `source`, named in the error) into it."""
    skeleton = materialize(compress(model, config))
    what = mismatch(skeleton.state_dict(), state)
    if what:
        raise CaitsearchError(f"{source} does not fit {config.model} compressed with this config: {what}; "
                              "pass the config it was saved with.")
    skeleton.load_state_dict(state)
    return skeleton
