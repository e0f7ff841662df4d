"""The search space: which per-block ATME/CDCP settings a search may pick, and what they reach.

Widths are snapped to hardware multiples (8 for per-head q/k and v widths, 32 for the MLP) and kept
at or above `min_keep` of the original; a merge step removes at most half the lines left, and the
grid never shrinks below `min_lines` per axis. Because every reachable grid is known up front, a
latency table can cover the token counts exactly.

Optuna sees per block: `b{i}_axis` (none/cols/rows), `b{i}_merge` (a fraction of the lines left
in [0, 0.5], turned into a count), `b{i}_qk`, `b{i}_v`, `b{i}_mlp` (keep widths from the choices).
Fractions rather than counts keep every parameter's range static, which samplers need.

A strategy (`STRATEGIES`) restricts the space, so every method is searched, profiled and measured
by the same code: `cait` merges grid lines and prunes channels, `atme` only merges, `cdcp` only
prunes, and `tome` is the ToMe baseline (axis none/tokens, the merge fraction of the tokens left
giving the per-block r; no pruning).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Mapping, Optional

from .config import GRID_AXES, BlockConfig, CompressionConfig, MergeAxis, after_merge, lines_along
from .errors import CaitsearchError
from .models import ModelSpec


def _multiples(full: int, multiple: int, min_keep: float) -> list[int]:
    step = min(multiple, full)
    low = max(step, math.ceil(min_keep * full / step) * step)
    values = list(range(low, full + 1, step))
    return values if values and values[-1] == full else values + [full]


# strategy -> (merge, prune, token_merge): what the search may change
STRATEGIES = {
    "cait": (True, True, False),
    "atme": (True, False, False),
    "cdcp": (False, True, False),
    "tome": (True, False, True),
}


@dataclass(frozen=True)
class SearchSpace:
    spec: ModelSpec
    head_multiple: int = 8
    mlp_multiple: int = 32
    min_keep: float = 0.25
    min_lines: int = 2
    merge: bool = True
    prune: bool = True
    token_merge: bool = False  # merges are ToMe's (axis "tokens") instead of ATME's grid lines

    @classmethod
    def for_strategy(cls, spec: ModelSpec, strategy: str = "cait", **kwargs) -> "SearchSpace":
        if strategy not in STRATEGIES:
            raise CaitsearchError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
        merge, prune, token_merge = STRATEGIES[strategy]
        return cls(spec, merge=merge, prune=prune, token_merge=token_merge, **kwargs)

    @property
    def strategy(self) -> str:
        return next((k for k, v in STRATEGIES.items() if v == (self.merge, self.prune, self.token_merge)), "custom")

    @property
    def qk_choices(self) -> list[int]:
        return _multiples(self.spec.head_dim, self.head_multiple, self.min_keep) if self.prune else [self.spec.head_dim]

    @property
    def v_choices(self) -> list[int]:
        return self.qk_choices

    @property
    def mlp_choices(self) -> list[int]:
        return _multiples(self.spec.mlp_hidden, self.mlp_multiple, self.min_keep) if self.prune else [self.spec.mlp_hidden]

    @property
    def axes(self) -> tuple[str, ...]:
        if not self.merge or self.spec.attn_pool:
            return (MergeAxis.NONE,)
        return (MergeAxis.NONE, MergeAxis.TOKENS) if self.token_merge else (MergeAxis.NONE,) + GRID_AXES

    def grids(self) -> list[tuple[int, int]]:
        """Every (h, w) grid a config in this space can reach (ToMe's token sets as 1 x n strips)."""
        H, W = self.spec.grid
        if not self.merge:
            return [(H, W)]
        if self.token_merge:
            return [(H, W)] + [(1, n) for n in range(min(self.min_lines, H * W), H * W)]
        low_h, low_w = min(H, self.min_lines), min(W, self.min_lines)
        return [(h, w) for h in range(low_h, H + 1) for w in range(low_w, W + 1)]

    def token_counts(self) -> list[int]:
        return sorted({self.spec.num_prefix_tokens + h * w for h, w in self.grids()})

    def max_merge(self, lines: int) -> int:
        """Most lines one step may remove from `lines` without going under `min_lines`."""
        return max(0, min(lines // 2, lines - self.min_lines))

    def config_from_params(self, params: Mapping[str, object]) -> CompressionConfig:
        """Build the config an Optuna trial's parameters describe (missing ones mean 'dense')."""
        s = self.spec
        h, w = s.grid
        blocks = []
        for i in range(s.depth):
            axis = MergeAxis(params.get(f"b{i}_axis", MergeAxis.NONE))
            lines = lines_along(axis, h, w)
            count = int(float(params.get(f"b{i}_merge", 0.0)) * lines)
            count = min(count, self.max_merge(lines))
            if count == 0:
                axis = MergeAxis.NONE
            h, w = after_merge(axis, count, h, w)
            blocks.append(BlockConfig(
                keep_qk=int(params.get(f"b{i}_qk", s.head_dim)),
                keep_v=int(params.get(f"b{i}_v", s.head_dim)),
                keep_mlp=int(params.get(f"b{i}_mlp", s.mlp_hidden)),
                merge_axis=axis, merge_count=count,
            ))
        return CompressionConfig(model=s.name, img_size=s.img_size, blocks=blocks)

    def suggest(self, trial) -> CompressionConfig:
        """Ask an Optuna trial for one point of the space."""
        params = {}
        for i in range(self.spec.depth):
            if len(self.axes) > 1:
                params[f"b{i}_axis"] = trial.suggest_categorical(f"b{i}_axis", list(self.axes))
                params[f"b{i}_merge"] = trial.suggest_float(f"b{i}_merge", 0.0, 0.5)
            if self.prune:
                params[f"b{i}_qk"] = trial.suggest_categorical(f"b{i}_qk", self.qk_choices)
                params[f"b{i}_v"] = trial.suggest_categorical(f"b{i}_v", self.v_choices)
                params[f"b{i}_mlp"] = trial.suggest_categorical(f"b{i}_mlp", self.mlp_choices)
        return self.config_from_params(params)

    def params_of(self, config: CompressionConfig) -> dict:
        """Optuna parameters that reproduce `config` (for enqueueing warm starts)."""
        s = self.spec
        h, w = s.grid
        params = {}
        for i, b in enumerate(config.blocks):
            if len(self.axes) > 1:
                params[f"b{i}_axis"] = b.merge_axis
                # the middle of the interval that floors to this count
                lines = lines_along(b.merge_axis, h, w)
                params[f"b{i}_merge"] = min(0.5, (b.merge_count + 0.5) / lines) if b.merge_count else 0.0
                h, w = after_merge(b.merge_axis, b.merge_count, h, w)
            if self.prune:
                params.update({f"b{i}_qk": b.keep_qk, f"b{i}_v": b.keep_v, f"b{i}_mlp": b.keep_mlp})
        return params

    def random_config(self, rng: random.Random, merge_prob: float = 0.5) -> CompressionConfig:
        """A random point of the space, for predictor validation and tests."""
        params = {}
        for i in range(self.spec.depth):
            if len(self.axes) > 1 and rng.random() < merge_prob:
                params[f"b{i}_axis"] = rng.choice(self.axes[1:])
                params[f"b{i}_merge"] = rng.uniform(0.0, 0.5)
            params[f"b{i}_qk"] = rng.choice(self.qk_choices)
            params[f"b{i}_v"] = rng.choice(self.v_choices)
            params[f"b{i}_mlp"] = rng.choice(self.mlp_choices)
        return self.config_from_params(params)

    def refuses(self, config: CompressionConfig) -> Optional[str]:
        """Why `config` lies outside this space (None when it fits)."""
        s = self.spec
        for i, b in enumerate(config.blocks):
            if b.merge_axis not in self.axes:
                return f"block {i} merges along {b.merge_axis}, which {self.strategy} does not"
            if not self.prune and (b.keep_qk, b.keep_v, b.keep_mlp) != (s.head_dim, s.head_dim, s.mlp_hidden):
                return f"block {i} prunes channels, which {self.strategy} does not"
        return None

    def uniform_schedules(self, fine: bool = False) -> list[CompressionConfig]:
        """The strategy's simple schedules, as this space expresses them: warm starts for the
        search, and (`fine`: more merge fractions and start blocks) the equal-latency schedules of
        `caitsearch bench`. ToMe's is its published one (the same r in every block); the others
        keep one width everywhere and merge a fraction of the lines every k blocks."""
        s = self.spec
        keeps = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25) if self.prune else (1.0,)
        if MergeAxis.TOKENS in self.axes:
            n = s.grid[0] * s.grid[1]
            configs = [CompressionConfig.tome(s, r) for r in range(0, n // 2 + 1)]
        else:
            everies = (0, 3, 2, 1) if len(self.axes) > 1 else (0,)
            merges = [(0.25, 0)] + ([(f, start) for f in (0.125, 0.375, 0.5) for start in (0, 1, 2)] if fine else [])
            configs = [CompressionConfig.uniform(s, keep, every, fraction, start, head_multiple=self.head_multiple,
                                                 mlp_multiple=self.mlp_multiple)
                       for keep in keeps for every in everies for fraction, start in (merges if every else merges[:1])]
        return [self.config_from_params(self.params_of(c)) for c in configs]  # as the space can express them

    def extreme_config(self, width_at: float, merge: float) -> CompressionConfig:
        """Every block at the width choice `width_at` of the way from narrowest (0) to full (1),
        merging the fraction `merge` of its lines, axes alternating: the space's corners."""
        params = {}
        for i in range(self.spec.depth):
            if len(self.axes) > 1:
                params[f"b{i}_axis"] = self.axes[1 + i % (len(self.axes) - 1)]
                params[f"b{i}_merge"] = merge
            for key, choices in (("qk", self.qk_choices), ("v", self.v_choices), ("mlp", self.mlp_choices)):
                params[f"b{i}_{key}"] = choices[round(width_at * (len(choices) - 1))]
        return self.config_from_params(params)

    def corners(self) -> dict[str, CompressionConfig]:
        """The fastest (narrowest, merging most), a middle and the slowest (dense) point."""
        return {"min": self.extreme_config(0.0, 0.5), "mid": self.extreme_config(0.5, 0.25),
                "max": self.extreme_config(1.0, 0.0)}

    def schedule_for(self, predict_ms, target_ms: float) -> CompressionConfig:
        """The uniform schedule predicted closest to `target_ms` without going over (else the fastest)."""
        scored = [(float(predict_ms(c)), c) for c in self.uniform_schedules(fine=True)]
        within = [p for p in scored if p[0] <= target_ms]
        return max(within, key=lambda p: p[0])[1] if within else min(scored, key=lambda p: p[0])[1]
