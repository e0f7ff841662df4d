"""ATME: asymmetric token merging that keeps patch tokens on a rectangular grid.

A merge step removes `count` grid lines (columns or rows). Lines alternate between destinations
(even index) and sources (odd index); each source is compared with its two neighbours by the mean
cosine similarity of their attention keys, picks the closer one, and the `count` most similar
sources are folded into their neighbour as a size-weighted average. The result is an
`h x (w - count)` grid in the original order, so shapes depend only on (h, w, count).

Every function here is batched tensor code: no Python loop over tokens or images.
Tensors on the grid are laid out `(B, h, w, C)`; line sizes are `(B, lines)` float tensors that
count how many original patch rows/columns each line covers.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..config import MergeAxis
from .merge import merge_matrix, proportional_bias
from .tome import TokenSet, start_set

AXIS_DIM = {MergeAxis.ROWS: 1, MergeAxis.COLS: 2}


def line_similarity(keys: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean cosine similarity of each pair of adjacent lines along `dim`: `(B, lines - 1)`."""
    k = F.normalize(keys.float(), dim=-1)
    lines = k.shape[dim]
    pair = (k.narrow(dim, 0, lines - 1) * k.narrow(dim, 1, lines - 1)).sum(-1)
    return pair.mean(dim=3 - dim)  # average over the other spatial axis


def assign_lines(similarity: torch.Tensor, count: int) -> torch.Tensor:
    """Where each line goes: `(B, lines)` index of its line in the merged grid.

    Sources are the odd lines; each picks its more similar neighbour, and the `count` sources with
    the highest similarity are merged into that neighbour. All other lines keep their order.
    """
    batch, lines = similarity.shape[0], similarity.shape[1] + 1
    device = similarity.device
    src = torch.arange(1, lines, 2, device=device)
    padded = F.pad(similarity, (0, 1), value=float("-inf"))  # the last source may lack a right neighbour
    left, right = similarity[:, src - 1], padded[:, src]
    go_right = right > left
    score = torch.maximum(left, right)
    chosen = score.topk(count, dim=1).indices  # (B, count) positions among sources
    chosen_src = src[chosen]
    chosen_dst = chosen_src + torch.where(go_right.gather(1, chosen), 1, -1)
    dest = torch.arange(lines, device=device).expand(batch, lines).clone()
    dest.scatter_(1, chosen_src, chosen_dst)
    kept = torch.ones(batch, lines, dtype=torch.long, device=device)
    kept.scatter_(1, chosen_src, 0)
    new_index = kept.cumsum(1) - 1
    return new_index.gather(1, dest)


def merge_lines(x: torch.Tensor, matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """Apply merge weights to a `(B, h, w, C)` grid along `dim` (1: rows, 2: columns).

    One batched matmul with a small inner dimension: cheaper on CPU than scatter-add plus
    normalisation passes over the whole tensor, and exportable to ONNX as a plain MatMul.
    """
    batch, h, w, channels = x.shape
    m = matrix.to(x.dtype)
    if dim == 1:
        return torch.matmul(m, x.reshape(batch, h, w * channels)).view(batch, -1, w, channels)
    return torch.matmul(m[:, None], x)


class TokenGrid(NamedTuple):
    """Per-image layout of the patch tokens after merging.

    `row_height`/`col_width` are None until the first merge (every line covers one patch line).
    """

    prefix: int
    h: int
    w: int
    row_height: Optional[torch.Tensor] = None
    col_width: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None  # proportional-attention bias, computed once per merge
    track: bool = False  # a later ToMe merge should track patch sources (for `unmerge`)

    @property
    def merged(self) -> bool:
        return self.row_height is not None

    def token_sizes(self) -> Optional[torch.Tensor]:
        """`(B, h*w)` number of original patches each patch token stands for; None if unmerged."""
        if not self.merged:
            return None
        return (self.row_height[:, :, None] * self.col_width[:, None, :]).flatten(1)

    def with_bias(self, dtype: torch.dtype) -> "TokenGrid":
        """Proportional attention: `log(size)` added to every key's logit, as a `(B, 1, 1, N)` float
        `attn_mask` for `scaled_dot_product_attention`, which keeps the fused kernel."""
        return self._replace(bias=proportional_bias(self.token_sizes(), self.prefix, dtype))

    def merge(self, x: torch.Tensor, keys: torch.Tensor, axis: str, count: int) -> tuple[torch.Tensor, "TokenGrid"]:
        """Remove `count` lines along `axis` from tokens `x` (B, N, C) using `keys` (B, N, d);
        axis "tokens" hands the grid over to ToMe, which removes `count` tokens and no lines."""
        if axis == MergeAxis.TOKENS:
            return self.to_set(x).merge(x, keys, axis, count)
        batch, _, channels = x.shape
        p, h, w = self.prefix, self.h, self.w
        dim = AXIS_DIM[axis]
        grid = x[:, p:].reshape(batch, h, w, channels)
        key_grid = keys[:, p:].reshape(batch, h, w, keys.shape[-1])
        rows, cols = self.row_height, self.col_width
        if rows is None:
            rows = x.new_ones(batch, h, dtype=torch.float32)
            cols = x.new_ones(batch, w, dtype=torch.float32)
        sizes = rows if dim == 1 else cols
        target = assign_lines(line_similarity(key_grid, dim), count)
        matrix, new_sizes = merge_matrix(sizes, target, sizes.shape[1] - count)
        merged = merge_lines(grid, matrix, dim)
        if dim == 1:
            out_grid = TokenGrid(p, h - count, w, new_sizes, cols, track=self.track)
        else:
            out_grid = TokenGrid(p, h, w - count, rows, new_sizes, track=self.track)
        tokens = torch.cat([x[:, :p], merged.reshape(batch, -1, channels)], dim=1)
        return tokens, out_grid.with_bias(x.dtype)

    def to_set(self, x: torch.Tensor) -> TokenSet:
        """The same tokens as a ToMe `TokenSet` (sizes, and sources if tracked)."""
        if not self.merged:
            return start_set(x, self.prefix, self.track)
        source = None
        if self.track:
            rows = _cover_index(self.row_height, int(self.row_height[0].sum()))
            cols = _cover_index(self.col_width, int(self.col_width[0].sum()))
            source = (rows[:, :, None] * self.w + cols[:, None, :]).flatten(1)
        return TokenSet(self.prefix, self.token_sizes(), self.bias, source)

    def unmerge(self, x: torch.Tensor, full_h: int, full_w: int) -> torch.Tensor:
        """Patch tokens `(B, N, C)` back to the full `(B, full_h, full_w, C)` map: each token is
        repeated over the original rows and columns it covers."""
        batch, _, channels = x.shape
        grid = x[:, self.prefix:].reshape(batch, self.h, self.w, channels)
        if not self.merged:
            return grid
        rows = _cover_index(self.row_height, full_h)
        cols = _cover_index(self.col_width, full_w)
        grid = grid.gather(1, rows[:, :, None, None].expand(batch, full_h, self.w, channels))
        return grid.gather(2, cols[:, None, :, None].expand(batch, full_h, full_w, channels))

    def cell_positions(self, full_h: int, full_w: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Where each original patch row and column sits inside the merged line covering it, as
        `(B, full_h)` and `(B, full_w)` indices of (line size, offset) pairs, `cell_slot(size,
        offset)`; None while nothing merged. Only a grid has them: a ToMe token's patches are
        scattered, while a grid cell is a rectangle, so a dense head can tell its patches apart."""
        if not self.merged:
            return None
        return _line_slots(self.row_height, full_h), _line_slots(self.col_width, full_w)


def cell_slot(size: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Index of the pair (line size s >= 1, offset 0 <= o < s): s(s-1)/2 + o, dense in
    [0, cell_slots(full)); an unmerged line (s=1, o=0) is slot 0."""
    return size * (size - 1) // 2 + offset


def cell_slots(full: int) -> int:
    """How many (size, offset) pairs lines of up to `full` original lines have."""
    return full * (full + 1) // 2


def _line_slots(line_sizes: torch.Tensor, full: int) -> torch.Tensor:
    """`(B, n)` float line sizes -> `(B, full)` slot of every original line in the line covering it."""
    cover = _cover_index(line_sizes, full)
    sizes = line_sizes.round().long()
    starts = (sizes.cumsum(1) - sizes).gather(1, cover)
    positions = torch.arange(full, device=line_sizes.device).expand_as(starts)
    return cell_slot(sizes.gather(1, cover), positions - starts)


def _cover_index(line_sizes: torch.Tensor, full: int) -> torch.Tensor:
    """For each original line, the index of the merged line that covers it: `(B, full)`."""
    ends = line_sizes.cumsum(1)
    positions = torch.arange(full, device=line_sizes.device, dtype=ends.dtype).expand(ends.shape[0], full)
    return torch.searchsorted(ends.contiguous(), positions.contiguous(), right=True)
