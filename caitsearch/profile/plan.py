"""What a profile measures: the factored table of block parts, and the modules that time them.

A materialised CAIT block is `attention part` on the input tokens, then (maybe) an ATME merge, then
the `MLP part` on the merged tokens. The table is factored along that split:

- `attn`: tokens in x kept qk width x kept v width (attention runs at max(qk, v), the linears at
  the true widths, so both widths are table dimensions); merged inputs carry the
  proportional-attention bias, the full grid does not, so the full token count is its own entry;
- `mlp`: tokens x MLP hidden width;
- `merge`: tokens in x axis (the merge op on a near-square grid of that size; axis "tokens" is
  ToMe's bipartite matching, profiled in every profile so that one table serves every strategy);
- `stem` once, `head` per token count; `e2e`: whole configs, for the fitted per-part factors:
  dense, the fastest point, and for every family (pure pruning, pure merging, joint, ToMe) a
  spread of configs across its MAC range, so no family is fitted by the others' errors; timed in
  `e2e_passes` passes (the first closes the build, a second opens it) so the fit does not rest on
  one stretch of the machine's state.

A full profile measures every width the space offers, and every token count any strategy
reaches (ATME grids and ToMe's token sets) where there are at most `token_points` of them; else
that many spaced by value, interpolated in between (validated per family by `profile validate`).
A quick profile samples every dimension at a few points.
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..compress import CaitViT, compress, materialize
from ..compress.atme import TokenGrid
from ..config import BlockConfig, CompressionConfig, MergeAxis, lines_along
from ..models import ModelSpec
from ..space import SearchSpace

KINDS = ("stem", "attn", "merge", "mlp", "head", "e2e")


@dataclass(frozen=True)
class Entry:
    """One row of the table: what was measured (the measurements are added beside it)."""

    kind: str
    tokens: int = 0
    qk: int = 0
    v: int = 0
    mlp: int = 0
    axis: str = ""
    h: int = 0
    w: int = 0
    count: int = 0
    config: str = ""  # e2e: the compression config as JSON
    take: int = 0  # e2e: which of the build's passes over the whole configs (the key tells them apart)

    @property
    def key(self) -> str:
        cfg = hashlib.sha1(self.config.encode()).hexdigest()[:12] if self.config else ""
        return (f"{self.kind}|n{self.tokens}|qk{self.qk}|v{self.v}|mlp{self.mlp}"
                f"|{self.axis}{self.h}x{self.w}-{self.count}|{cfg}") + (f"|take{self.take}" if self.take else "")

    def row(self) -> dict:
        row = asdict(self)
        del row["take"]
        return {"key": self.key, **row}


@dataclass(frozen=True)
class Resolution:
    """How densely each dimension is sampled (None: every value), and how long each group is timed."""

    token_points: int
    width_points: Optional[int]
    mlp_points: Optional[int]
    e2e_per_family: int
    repeats: int
    max_repeats: int
    warmup: int
    warmup_seconds: float
    target_spread: float
    group_seconds: float  # repeats beyond `repeats` stop once a group has run about this long
    e2e_group: int = 4
    e2e_max_repeats: int = 100  # whole-config groups repeat until `group_seconds`, up to this many rounds
    e2e_passes: int = 1  # passes over the whole configs: the first closes the build, a second opens it


def whole_config_repeats(res: "Resolution", round_s: float) -> int:
    """Rounds for a group of whole configs whose one round takes `round_s`: as many as fit in
    `res.group_seconds` (at least `res.repeats`, at most `res.e2e_max_repeats`), never stopped early
    by the spread target. The default model's whole configs take ~30 ms, so stopping at a 5% spread
    left medians of 5 samples: one pass repeated only 55-90% of a family's configs within ±5% (validation
    of the default model, seed 4), and pure-pruning configs, whose latencies lie within a few
    percent of each other, could not be ranked."""
    return max(res.repeats, min(res.e2e_max_repeats, int(res.group_seconds / max(round_s, 1e-6))))


FULL = Resolution(token_points=48, width_points=None, mlp_points=None, e2e_per_family=10, repeats=5, max_repeats=15,
                  warmup=2, warmup_seconds=0.3, target_spread=0.05, group_seconds=10.0, e2e_passes=2)
QUICK = Resolution(token_points=4, width_points=2, mlp_points=3, e2e_per_family=2, repeats=4, max_repeats=8,
                   warmup=1, warmup_seconds=0.02, target_spread=0.15, group_seconds=1.0)
# the config families the fit and the validation are spread over: the joint space's own, and ToMe
FIT_FAMILIES = ("prune", "merge", "joint", "tome")


def by_index(values: Sequence[int], k: Optional[int]) -> list[int]:
    """`k` of the sorted `values`, evenly spaced by position (ends included); all for k None."""
    values = sorted(set(values))
    if k is None or len(values) <= k:
        return values
    return sorted({values[round(i * (len(values) - 1) / (k - 1))] for i in range(k)})


def by_value(values: Sequence[int], k: int) -> list[int]:
    """`k` of the sorted `values` nearest to evenly spaced targets (ends included)."""
    values = sorted(set(values))
    if len(values) <= k:
        return values
    lo, hi = values[0], values[-1]
    return sorted({min(values, key=lambda v: abs(v - (lo + i * (hi - lo) / (k - 1)))) for i in range(k)})


class Axes:
    """The sampled points of every table dimension for one model and search space."""

    def __init__(self, space: SearchSpace, res: Resolution) -> None:
        s = space.spec
        self.full = s.num_tokens
        merged = [n for n in reachable_tokens(space) if n < self.full]
        self.merged_tokens = by_value(merged, res.token_points) if merged else []
        self.tokens = self.merged_tokens + [self.full]
        self.qk = by_index(space.qk_choices, res.width_points)
        self.v = by_index(space.v_choices, res.width_points)
        self.mlp = by_index(space.mlp_choices, res.mlp_points)
        self.merge_axes = [a for a in space.axes if a != MergeAxis.NONE]
        if self.merge_axes and MergeAxis.TOKENS not in self.merge_axes:  # one profile serves every strategy
            self.merge_axes.append(MergeAxis.TOKENS)


def reachable_tokens(space: SearchSpace) -> list[int]:
    """Every token count a config of any strategy sharing this space's grid can reach: ATME's grids
    and, where the space merges, ToMe's token sets (one profile serves every strategy)."""
    counts = set(space.token_counts())
    if space.merge:
        counts |= set(tome_space(space).token_counts())
    return sorted(counts)


def tome_space(space: SearchSpace) -> SearchSpace:
    return SearchSpace.for_strategy(space.spec, "tome", head_multiple=space.head_multiple,
                                    mlp_multiple=space.mlp_multiple, min_keep=space.min_keep, min_lines=space.min_lines)


def family_space(space: SearchSpace, family: str) -> SearchSpace:
    """The space of one fit family: a family of the joint space, or ToMe."""
    return tome_space(space) if family == "tome" else space.subspace(family)


def spread_configs(space: SearchSpace, count: int, rng: random.Random, draws: int = 400) -> list[CompressionConfig]:
    """`count` configs of `space` spread over its MAC range: many random draws, binned by MACs,
    the first draw of each bin kept (a bin without one is skipped)."""
    s = space.spec
    configs = [space.random_config(rng) for _ in range(draws)]
    macs = [c.macs(s)["total"] for c in configs]
    lo, hi = min(macs), max(macs)
    chosen: dict[int, CompressionConfig] = {}
    for cfg, m in zip(configs, macs):
        b = min(count - 1, int((m - lo) / (hi - lo + 1e-9) * count))
        chosen.setdefault(b, cfg)
    return [chosen[b] for b in sorted(chosen)]


def grid_for(space: SearchSpace, tokens: int, axis: Optional[str] = None) -> tuple[int, int]:
    """The most square reachable grid with `tokens` tokens (able to lose a line along `axis`);
    a ToMe token set (a 1 x n strip) where no grid has that many."""
    p = space.spec.num_prefix_tokens
    grids = [(h, w) for h, w in space.grids() if p + h * w == tokens
             and (axis is None or space.max_merge(lines_along(axis, h, w)) > 0)]
    if not grids and space.merge and not space.token_merge and axis in (None, MergeAxis.TOKENS):
        return grid_for(tome_space(space), tokens, axis)
    if not grids:
        raise ValueError(f"no reachable grid has {tokens} tokens")
    return min(grids, key=lambda g: (abs(g[0] - g[1]), -g[0]))


def plan(space: SearchSpace, res: Resolution, seed: int = 0) -> list[list[Entry]]:
    """Groups of entries, each timed in one interleaved loop; groups come in a shuffled order so
    that slow drift of the machine does not bias one region of the table."""
    ax = Axes(space, res)
    groups: list[list[Entry]] = []
    for n in ax.tokens:
        groups.append([Entry("attn", n, qk=q, v=v) for q in ax.qk for v in ax.v])
        groups.append([Entry("mlp", n, mlp=m) for m in ax.mlp])
    merges = []
    for n in ax.tokens:
        for axis in ax.merge_axes:
            try:
                h, w = grid_for(space, n, axis)
            except ValueError:
                continue
            lines = lines_along(axis, h, w)
            merges.append(Entry("merge", n, axis=axis, h=h, w=w, count=max(1, space.max_merge(lines) // 2)))
    if merges:
        groups.append(merges)
    groups.append([Entry("stem")] + [Entry("head", n) for n in ax.tokens])
    rng = random.Random(seed)
    rng.shuffle(groups)
    # dense, the fastest point of the space, and every family spread over its range (see module doc)
    configs = [space.corners()["min"]]
    families = [f for f in FIT_FAMILIES if f in space.families or (f == "tome" and space.merge)] or [None]
    for family in families:
        configs += spread_configs(space if family is None else family_space(space, family), res.e2e_per_family, rng)
    e2e = [dense_entry(space.spec)] + [e2e_entry(c) for c in configs]
    groups += [e2e[i:i + res.e2e_group] for i in range(0, len(e2e), res.e2e_group)]
    for take in range(1, res.e2e_passes):
        # Another pass over the same configs, in its own order, before the parts. A shared 2-core
        # CPU shifted the latency of pure-pruning configs relative to dense by 3-4% between the
        # build of the default model and its validation (bench/retime_stored.py): whole configs
        # timed in one stretch at the end fitted that stretch's machine.
        shuffled = list(configs)
        rng.shuffle(shuffled)
        order = [dense_entry(space.spec, take)] + [e2e_entry(c, take) for c in shuffled]
        groups = [order[i:i + res.e2e_group] for i in range(0, len(order), res.e2e_group)] + groups
    return groups


def e2e_entry(config: CompressionConfig, take: int = 0) -> Entry:
    return Entry("e2e", config=json.dumps(config.to_dict(), separators=(",", ":")), take=take)


def dense_entry(spec: ModelSpec, take: int = 0) -> Entry:
    """The dense model as a whole config: the reference every whole-config timing is taken beside."""
    return e2e_entry(CompressionConfig.dense(spec), take)


# ----- the modules that are timed ------------------------------------------------------------------

class AttentionPart(nn.Module):
    """`x + ls1(attn(norm1(x)))` of a materialised block, with the merge bias when merged."""

    def __init__(self, block: nn.Module, want_keys: bool = False) -> None:
        super().__init__()
        self.block, self.want_keys = block, want_keys

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        b = self.block
        out, _ = b.attn(b.norm1(x), bias, want_keys=self.want_keys)
        return x + b.drop_path1(b.ls1(out))


class MlpPart(nn.Module):
    """`x + ls2(mlp(norm2(x)))` of a materialised block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


class MergePart(nn.Module):
    """One ATME step on an `h x w` grid; returns the merged tokens and the new attention bias."""

    def __init__(self, prefix: int, h: int, w: int, axis: str, count: int) -> None:
        super().__init__()
        self.grid, self.axis, self.count = TokenGrid(prefix, h, w), axis, count

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, grid = self.grid.merge(x, keys, self.axis, self.count)
        return tokens, grid.bias


class StemPart(nn.Module):
    """Patch embedding and position embedding: `CaitViT.embed`."""

    def __init__(self, model: CaitViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


class HeadPart(nn.Module):
    """Final norm and head on `tokens` tokens (size-weighted pooling when merged)."""

    def __init__(self, model: CaitViT, grid: TokenGrid) -> None:
        super().__init__()
        self.model, self.grid = model, grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.vit.norm(x), self.grid)


def one_block_model(model: nn.Module, spec: ModelSpec, qk: int, v: int, mlp: int) -> CaitViT:
    """A materialised compressed copy of `model` cut to its first block, at the given widths."""
    blocks = model.blocks
    try:
        model.blocks = nn.Sequential(blocks[0])
        short = copy.deepcopy(model)
    finally:
        model.blocks = blocks
    cfg = CompressionConfig(model=spec.name, img_size=spec.img_size, blocks=[BlockConfig(qk, v, mlp)])
    return materialize(compress(short, cfg)).eval()


def merged_grid(space: SearchSpace, tokens: int, batch: int, dtype: torch.dtype, device) -> TokenGrid:
    """A grid with `tokens` tokens as the model sees it: unmerged at full size, else with line
    sizes and the proportional-attention bias."""
    p = space.spec.num_prefix_tokens
    h, w = grid_for(space, tokens)
    if tokens == space.spec.num_tokens:
        return TokenGrid(p, h, w)
    ones = lambda n: torch.ones(batch, n, device=device)  # noqa: E731
    return TokenGrid(p, h, w, ones(h), ones(w)).with_bias(dtype)
