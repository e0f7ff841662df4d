"""ToMe: bipartite soft matching (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023).

The baseline ATME is measured against, written here from the paper's description. A merge step
removes `r` patch tokens:
1. split the patch tokens alternately into sets A (even positions) and B (odd positions);
2. score every A token against every B token by the cosine similarity of their keys (mean over
   heads), and give each A token its best B partner;
3. the `r` A tokens with the highest scores are merged into their partners as a size-weighted
   average; the other A tokens stay. The output is `[kept A tokens, B tokens]`: the grid order is
   gone, which is why ToMe has no spatial map to unmerge to without extra bookkeeping.
Attention afterwards uses proportional attention (`log size` added to every key's logit), exactly
as ATME does. Prefix tokens (class, distillation, registers) never take part, as in the paper
where the class token is protected from merging.

`TokenSet` carries the state between blocks. For dense heads it can also track, per original
patch, which token now stands for it (`source`): one integer gather per merge, which is what
`unmerge` needs to scatter tokens back to the patch grid.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..config import MergeAxis
from .merge import merge_matrix, proportional_bias


class Matching(NamedTuple):
    """One merge step's decision, per image: A positions merged (`src`) into B positions (`dst`),
    and A positions kept (`keep`), all `(B, count)` indices into the A or B set."""

    src: torch.Tensor
    dst: torch.Tensor
    keep: torch.Tensor


def bipartite_match(keys: torch.Tensor, r: int) -> Matching:
    """Match the `r` most similar A tokens of `keys` `(B, n, d)` to their best B token."""
    k = F.normalize(keys.float(), dim=-1)
    scores = k[:, ::2] @ k[:, 1::2].transpose(1, 2)  # (B, |A|, |B|)
    best, partner = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src, keep = order[:, :r], order[:, r:]
    return Matching(src, partner.gather(1, src), keep)


def merge_tokens(x: torch.Tensor, sizes: torch.Tensor, m: Matching) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply a matching to tokens `x` `(B, n, C)` of sizes `(B, n)`: each merged A token and its
    B partner become their size-weighted average. Returns the `(B, n - r, C)` tokens, their sizes
    and where every input token went (`new_positions`). One batched matmul, as ATME does."""
    n = x.shape[1]
    target = new_positions(n, m)
    matrix, new_sizes = merge_matrix(sizes, target, n - m.src.shape[1])
    return torch.matmul(matrix.to(x.dtype), x), new_sizes, target


def new_positions(n: int, m: Matching) -> torch.Tensor:
    """`(B, n)`: where every input token sits in the merged output `[kept A, B]`."""
    batch, n_keep = m.keep.shape
    n_a = (n + 1) // 2
    a_pos = torch.empty(batch, n_a, dtype=torch.long, device=m.keep.device)
    a_pos.scatter_(1, m.keep, torch.arange(n_keep, device=m.keep.device).expand(batch, -1))
    a_pos.scatter_(1, m.src, n_keep + m.dst)
    b_pos = n_keep + torch.arange(n // 2, device=m.keep.device).expand(batch, -1)
    pos = torch.empty(batch, n, dtype=torch.long, device=m.keep.device)
    pos[:, ::2], pos[:, 1::2] = a_pos, b_pos
    return pos


class TokenSet(NamedTuple):
    """Patch tokens after a ToMe merge: no grid, only sizes (and, if tracked, sources).

    `h`/`w` describe it as a `1 x n` strip so token counts read the same as for a grid.
    """

    prefix: int
    sizes: torch.Tensor  # (B, n) original patches per token
    bias: Optional[torch.Tensor]  # None while no token has merged, as for an unmerged TokenGrid
    source: Optional[torch.Tensor] = None  # (B, H*W) index of the token each original patch is in

    h: int = 1

    @property
    def w(self) -> int:
        return self.sizes.shape[1]

    @property
    def merged(self) -> bool:
        return True

    def token_sizes(self) -> torch.Tensor:
        return self.sizes

    def merge(self, x: torch.Tensor, keys: torch.Tensor, axis: str, count: int) -> tuple[torch.Tensor, "TokenSet"]:
        """Remove `count` patch tokens from `x` (B, N, C) by bipartite matching on `keys` (B, N, d)."""
        if axis != MergeAxis.TOKENS:
            raise ValueError(f"tokens merged by ToMe have no grid left to merge {axis} of")
        p = self.prefix
        merged, sizes, target = merge_tokens(x[:, p:], self.sizes, bipartite_match(keys[:, p:], count))
        source = None if self.source is None else target.gather(1, self.source)
        tokens = torch.cat([x[:, :p], merged], dim=1)
        return tokens, TokenSet(p, sizes, proportional_bias(sizes, p, x.dtype), source)

    def unmerge(self, x: torch.Tensor, full_h: int, full_w: int) -> torch.Tensor:
        """Patch tokens back to the full `(B, full_h, full_w, C)` map through the tracked sources."""
        if self.source is None:
            raise ValueError("ToMe tokens can only be unmerged when their sources were tracked")
        channels = x.shape[-1]
        patches = x[:, self.prefix:].gather(1, self.source[..., None].expand(-1, -1, channels))
        return patches.view(x.shape[0], full_h, full_w, channels)


def start_set(x: torch.Tensor, prefix: int, track: bool) -> TokenSet:
    """The unmerged patch tokens of `x` as a `TokenSet` of size-1 tokens (no bias: log 1 = 0)."""
    batch, n = x.shape[0], x.shape[1] - prefix
    sizes = x.new_ones(batch, n, dtype=torch.float32)
    source = torch.arange(n, device=x.device).expand(batch, n) if track else None
    return TokenSet(prefix, sizes, None, source)
