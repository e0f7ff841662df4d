"""The search space: which per-block ATME/CDCP settings a search may pick, and what they reach.

Widths are snapped to hardware multiples (8 for per-head q/k and v widths, 32 for the MLP) and kept
at or above `min_keep` of the original; a merge step removes at most half the lines left, and the
grid never shrinks below `min_lines` per axis. Because every reachable grid is known up front, a
latency table can cover the token counts exactly.

This module is the only place that names Optuna parameters. Per block: `b{i}_merge`, one
categorical choice that includes "none" (`"cols:2"` removes two grid columns; a count beyond what
the block's grid allows is clamped to it), and `b{i}_qk`, `b{i}_v`, `b{i}_mlp`, categorical keep
widths. The joint `cait` space first picks a family, `mix` in {prune, merge, joint}, and asks
only for what that family changes (with independent per-block choices, a pure-pruning draw took
(1/3)^depth luck), under the family's own names (`prune/b0_qk`, `joint/b0_qk`). A search does
not let one sampler choose the family or model the families together: the untrained proxy
prefers merges, and TPE's split into good and bad trials is over the whole study, so its good
set held only merging trials and pure pruning was drawn at random (1 of 144 pruning trials within
budget at 0.5). Each family gets the trials it would get searched alone (`default_trials`,
`family_shares`, `next_family`), each drawn by a sampler that has seen only that family's trials
(`search/study.py: balance_families`).

A strategy (`STRATEGIES`) restricts the space, so every method is searched, profiled and measured
by the same code: `cait` merges grid lines and prunes channels, `atme` only merges, `cdcp` only
prunes, and `tome` is the ToMe baseline (merge choices "tokens:r", no pruning).
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
# the families of the joint space, and the strategy each one is on its own
FAMILIES = {"prune": "cdcp", "merge": "atme", "joint": "cait"}
NO_MERGE = "none"


def merge_choice(axis: str, count: int) -> str:
    """The categorical value of one block's merge: "none", or "<axis>:<count>"."""
    return NO_MERGE if axis == MergeAxis.NONE or count == 0 else f"{axis}:{count}"


def parse_merge_choice(choice: str) -> tuple[MergeAxis, int]:
    if choice == NO_MERGE:
        return MergeAxis.NONE, 0
    axis, _, count = str(choice).partition(":")
    return MergeAxis(axis), int(count)


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

    @property
    def families(self) -> tuple[str, ...]:
        """The joint space's families (sampled first, as `mix`); a single strategy has none."""
        return tuple(FAMILIES) if self.merge and self.prune and len(self.axes) > 1 else ()

    def default_trials(self) -> int:
        """A trial costs well under a second on the default model (over-budget ones nothing): eight
        per parameter, between 100 and 400. A joint space gets the sum of what each of its
        families would get searched alone."""
        if self.families:
            return sum(self._family_trials(f) for f in self.families)
        return self._family_trials(None)

    def _family_trials(self, family: Optional[str]) -> int:
        merges, prunes = self._changes(family)
        per_block = (1 if merges else 0) + (3 if prunes else 0)
        return int(min(400, max(100, 8 * per_block * self.spec.depth)))

    def family_shares(self) -> dict[str, float]:
        """Each family's share of a joint search's trials: what it would get searched alone."""
        trials = {f: self._family_trials(f) for f in self.families}
        return {f: n / sum(trials.values()) for f, n in trials.items()}

    def next_family(self, counts: Mapping[str, int]) -> str:
        """The family furthest below its share, given how many trials each already has (ties go
        to the first in `FAMILIES` order): trial after trial, the shares are kept."""
        if not self.families:
            raise CaitsearchError(f"the {self.strategy} space has no families to balance.")
        shares = self.family_shares()
        return min(self.families, key=lambda f: counts.get(f, 0) / shares[f])

    def merge_choices(self) -> list[str]:
        """Every block's merge options: none, or an axis and a count up to half the full grid's lines."""
        H, W = self.spec.grid
        return [NO_MERGE] + [merge_choice(axis, k) for axis in self.axes[1:]
                             for k in range(1, lines_along(axis, H, W) // 2 + 1)]

    def param_name(self, family: Optional[str], name: str) -> str:
        """The Optuna name of `name` (e.g. "b0_qk") in `family`'s trials: family-scoped in a joint
        space, so each family's choices are modelled from its own trials."""
        return f"{family}/{name}" if family else name

    def config_from_params(self, params: Mapping[str, object]) -> CompressionConfig:
        """Build the config an Optuna trial's parameters describe (missing ones mean 'dense');
        a merge count beyond what a block's grid allows is clamped to it."""
        s = self.spec
        h, w = s.grid
        family = params.get("mix")
        blocks = []
        for i in range(s.depth):
            def get(name: str, default: object) -> object:
                return params.get(self.param_name(family, f"b{i}_{name}"), default)

            axis, count = parse_merge_choice(str(get("merge", NO_MERGE)))
            count = min(count, self.max_merge(lines_along(axis, h, w)))
            axis = axis if count else MergeAxis.NONE
            h, w = after_merge(axis, count, h, w)
            blocks.append(BlockConfig(
                keep_qk=int(get("qk", s.head_dim)),
                keep_v=int(get("v", s.head_dim)),
                keep_mlp=int(get("mlp", s.mlp_hidden)),
                merge_axis=axis, merge_count=count,
            ))
        return CompressionConfig(model=s.name, img_size=s.img_size, blocks=blocks)

    def _changes(self, family: Optional[str]) -> tuple[bool, bool]:
        """(merges, prunes) that points of `family` may change (the strategy's own without one)."""
        if family is None:
            return len(self.axes) > 1, self.prune
        return family in ("merge", "joint"), family in ("prune", "joint")

    def suggest(self, trial) -> CompressionConfig:
        """Ask an Optuna trial for one point of the space (define-by-run: a family first, then only
        the parameters it changes)."""
        family = trial.suggest_categorical("mix", list(self.families)) if self.families else None
        return self.config_from_params({"mix": family, **self.suggest_family(trial, family)})

    def suggest_family(self, trial, family: Optional[str]) -> dict:
        """Ask a trial for the parameters `family` changes (all of a single strategy's with None),
        under their Optuna names: what a family's own sampler draws."""
        return {key: trial.suggest_categorical(key, values) for key, values in self.param_choices(family).items()}

    def param_choices(self, family: Optional[str]) -> dict[str, list]:
        """The Optuna parameters `family` asks for, in order, with their categorical choices."""
        merges, prunes = self._changes(family)
        choices: dict[str, list] = {}
        for i in range(self.spec.depth):
            for name, values in ([("merge", self.merge_choices())] if merges else []) + (
                    [("qk", self.qk_choices), ("v", self.v_choices), ("mlp", self.mlp_choices)] if prunes else []):
                choices[self.param_name(family, f"b{i}_{name}")] = values
        return choices

    def family_of(self, config: CompressionConfig) -> str:
        """"prune", "merge" or "joint" by what `config` changes (dense counts as pruning nothing)."""
        s = self.spec
        merges = any(b.merge_count for b in config.blocks)
        prunes = any((b.keep_qk, b.keep_v, b.keep_mlp) != (s.head_dim, s.head_dim, s.mlp_hidden) for b in config.blocks)
        return "joint" if merges and prunes else "merge" if merges else "prune"

    def params_of(self, config: CompressionConfig) -> dict:
        """Optuna parameters that reproduce `config` (for enqueueing warm starts)."""
        family = self.family_of(config) if self.families else None
        merges, prunes = self._changes(family)
        params: dict[str, object] = {"mix": family} if family else {}
        for i, b in enumerate(config.blocks):
            values = ({"merge": merge_choice(b.merge_axis, b.merge_count)} if merges else {}) | (
                {"qk": b.keep_qk, "v": b.keep_v, "mlp": b.keep_mlp} if prunes else {})
            params.update({self.param_name(family, f"b{i}_{name}"): v for name, v in values.items()})
        return params

    def random_config(self, rng: random.Random, family: Optional[str] = None) -> CompressionConfig:
        """A random point of the space (of one `family` of the joint space if given, else of a
        family drawn uniformly), for predictor validation and tests."""
        if family is None and self.families:
            family = rng.choice(self.families)
        merges, prunes = self._changes(family)
        params = {}
        for i in range(self.spec.depth):
            if merges:
                params[f"b{i}_merge"] = rng.choice(self.merge_choices())
            if prunes:
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

    def subspace(self, family: str) -> "SearchSpace":
        """The joint space restricted to one family: the strategy that family is on its own."""
        return SearchSpace.for_strategy(self.spec, FAMILIES[family], head_multiple=self.head_multiple,
                                        mlp_multiple=self.mlp_multiple, min_keep=self.min_keep, min_lines=self.min_lines)

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
        merging the fraction `merge` of the full grid's lines (clamped to what is left), axes
        alternating: the space's corners."""
        H, W = self.spec.grid
        params = {}
        for i in range(self.spec.depth):
            if len(self.axes) > 1:
                axis = self.axes[1 + i % (len(self.axes) - 1)]
                params[f"b{i}_merge"] = merge_choice(axis, int(merge * lines_along(axis, H, W)))
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
