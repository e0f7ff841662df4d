"""The search space: which per-block ATME/CDCP settings a search may pick, and what they reach.

Widths are snapped to hardware multiples (8 for per-head q/k and v widths, 32 for the MLP) and kept
at or above `min_keep` of the original; a merge step removes at most half the lines left, and the
grid never shrinks below `min_lines` per axis. Because every reachable grid is known up front, a
latency table can cover the token counts exactly.

Optuna sees per block: `b{i}_axis` (none/cols/rows), `b{i}_merge` (a fraction of the lines left
in [0, 0.5], turned into a count), `b{i}_qk`, `b{i}_v`, `b{i}_mlp` (keep widths from the choices).
Fractions rather than counts keep every parameter's range static, which samplers need.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Mapping

from .config import MERGE_AXES, BlockConfig, CompressionConfig
from .models import ModelSpec


def _multiples(full: int, multiple: int, min_keep: float) -> list[int]:
    step = min(multiple, full)
    low = max(step, math.ceil(min_keep * full / step) * step)
    values = list(range(low, full + 1, step))
    return values if values and values[-1] == full else values + [full]


@dataclass(frozen=True)
class SearchSpace:
    spec: ModelSpec
    head_multiple: int = 8
    mlp_multiple: int = 32
    min_keep: float = 0.25
    min_lines: int = 2
    merge: bool = True
    prune: bool = True

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
        return MERGE_AXES if self.merge and not self.spec.attn_pool else ("none",)

    def grids(self) -> list[tuple[int, int]]:
        """Every (h, w) grid a config in this space can reach."""
        H, W = self.spec.grid
        if not self.merge:
            return [(H, W)]
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
            axis = str(params.get(f"b{i}_axis", "none"))
            lines = w if axis == "cols" else h
            count = int(float(params.get(f"b{i}_merge", 0.0)) * lines) if axis != "none" else 0
            count = min(count, self.max_merge(lines))
            if count == 0:
                axis = "none"
            elif axis == "cols":
                w -= count
            else:
                h -= count
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
                lines = w if b.merge_axis == "cols" else h
                params[f"b{i}_axis"] = b.merge_axis
                # the middle of the interval that floors to this count
                params[f"b{i}_merge"] = min(0.5, (b.merge_count + 0.5) / lines) if b.merge_count else 0.0
                if b.merge_axis == "cols":
                    w -= b.merge_count
                elif b.merge_axis == "rows":
                    h -= b.merge_count
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
