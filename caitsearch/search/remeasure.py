"""Re-measurement: the best feasible trials, materialised and timed end to end against the dense
model in one interleaved loop on this machine, because the budget is judged by measurement, not
by the prediction that screened them. Timing runs on the profile's runtime (backend, dtype,
threads, CUDA graphs: `profile.runtime`), so the deployed form is what is judged; the candidates
are compressed from the fp32 teacher and only the timed copies are cast."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..config import CompressionConfig
from ..models import ModelSpec
from ..profile.runtime import Runtime
from ..tasks import CLASSIFICATION, Task
from .rank import finalist_kind, pick_finalists, trial_config
from .request import Budget


@dataclass
class Measured:
    """One candidate timed end to end: its trial, config, proxy scores and latencies."""

    trial: int
    config: CompressionConfig
    proxy: dict
    predicted_ms: float
    latency_ms: float
    within_budget: bool
    timing: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"trial": self.trial, "config": self.config.to_dict(), "proxy": self.proxy,
                "predicted_ms": self.predicted_ms, "latency_ms": self.latency_ms,
                "within_budget": self.within_budget, "timing": self.timing}

    @classmethod
    def from_dict(cls, data: dict) -> "Measured":
        return cls(**{**data, "config": CompressionConfig.from_dict(data["config"])})


def remeasure(dense: nn.Module, trials: list, spec: ModelSpec, budget: Budget, runtime: Runtime,
              calib: torch.Tensor, repeats: int = 15,
              progress: Optional[Callable[[], None]] = None, task: Task = CLASSIFICATION) -> tuple[dict, list[Measured]]:
    """Time the dense model and the materialised candidates in one interleaved loop on `runtime`
    (whole task models: for segmentation backbone, unmerge and decoder)."""
    models = {"dense": dense}
    for t in trials:
        cfg = CompressionConfig.from_dict(t.user_attrs["config"])
        models[f"trial{t.number}"] = task.materialize(task.student(dense, cfg, calib))
    timings, telemetry = runtime.time_models(models, spec, repeats=repeats, warmup=2, progress=progress)
    dense_ms = timings["dense"].median
    out = []
    for t in trials:
        ms = timings[f"trial{t.number}"].median
        out.append(Measured(trial=t.number, config=CompressionConfig.from_dict(t.user_attrs["config"]),
                            proxy={"kl": t.value, "agreement": t.user_attrs.get("agreement")},
                            predicted_ms=t.user_attrs["predicted_ms"], latency_ms=ms,
                            within_budget=budget.admits(ms, dense_ms),
                            timing={**timings[f"trial{t.number}"].summary(), "dense_ms": dense_ms}))
    return {"latency_ms": dense_ms, "timing": timings["dense"].summary(), "runtime": runtime.as_dict(),
            "telemetry": telemetry}, out


Measure = Callable[[list], tuple[dict, list[Measured]]]  # trials -> (dense timing, each trial timed)


def remeasure_until_within(measure: Measure, feasible: list, spec: ModelSpec, budget: Budget,
                           dense_predicted_ms: float, wanted: int, per_round: int,
                           rounds: int = 3) -> tuple[Optional[dict], list[Measured]]:
    """Time the best feasible trials with `measure` (`feasible`: the first round's picks first,
    then the rest best first), in up to `rounds` rounds. A later round runs while fewer than
    `wanted` are within budget, or while a kind of candidate (`rank.finalist_kind`: pure pruning,
    merge-heavy, mixed) that could still fit has none within budget; it tries the trials that
    still fit after each kind's predictions are corrected by that kind's measured/predicted
    ratio (`next_round`). Kinds drift apart from the profile differently, so one correction
    for all would let the proxy's favourite kinds fill every later round. With one kind (cdcp,
    atme, tome) this is plain: the next `per_round` trials that fit, under one correction."""
    kind_of = {t.number: finalist_kind(trial_config(t), spec) for t in feasible}
    measured: list[Measured] = []
    dense_timing = None
    own: dict[str, float] = {}  # each kind's correction from its own timings, never lowered
    correction = {kind: 1.0 for kind in kind_of.values()}
    queue = list(feasible)

    def fits(t) -> bool:
        return correction[kind_of[t.number]] * t.user_attrs["predicted_ms"] / dense_predicted_ms <= budget.ratio

    for round_ in range(rounds):
        candidates = [t for t in queue if fits(t)]
        if round_ == 0:
            batch = candidates[:per_round]
        else:
            enough = sum(m.within_budget for m in measured) >= wanted
            batch = next_round(candidates, kind_of, covered_kinds(measured, kind_of), spec, per_round, only_short=enough)
        if not batch:
            break
        queue = [t for t in queue if t not in batch]
        dense_timing, got = measure(batch)
        measured += got  # each carries the dense latency of its own loop, so rounds compare
        correction = kind_corrections(measured, kind_of, own, dense_predicted_ms)
        short = {kind_of[t.number] for t in queue if fits(t)} - covered_kinds(measured, kind_of)
        if sum(m.within_budget for m in measured) >= wanted and not short:
            break
    return dense_timing, measured


def next_round(fits: list, kind_of: dict, covered: set, spec: ModelSpec, per_round: int,
               only_short: bool = False) -> list:
    """Up to `per_round` of `fits` (trials still predicted within budget after correction, best
    first) for a later round: the best trial of each kind not yet `covered` by a candidate
    measured within budget (the proxy's order decides which, if there are more such kinds than
    `per_round`), then, unless `only_short`, the rest in rounds over the kinds."""
    short = {kind_of[t.number] for t in fits} - covered
    first = pick_finalists([t for t in fits if kind_of[t.number] in short], spec, len(short))[:per_round]
    if only_short:
        return first
    rest = [t for t in pick_finalists(fits, spec, per_round) if t not in first]
    return first + rest[:max(0, per_round - len(first))]


def covered_kinds(measured: list[Measured], kind_of: dict) -> set:
    """The kinds that have a candidate measured within budget."""
    return {kind_of[m.trial] for m in measured if m.within_budget}


def kind_corrections(measured: list[Measured], kind_of: dict, own: dict, dense_predicted_ms: float) -> dict:
    """Each kind's factor on its predictions: the median measured/predicted latency ratio (each
    relative to its dense) of its own timings, never lowered (`own` keeps it between rounds);
    a kind not timed yet borrows the median of all timings, without keeping it."""
    overall = _median_ratio(measured, dense_predicted_ms)
    out = {}
    for kind in set(kind_of.values()):
        of_kind = [m for m in measured if kind_of[m.trial] == kind]
        if of_kind:
            own[kind] = max(own.get(kind, 1.0), _median_ratio(of_kind, dense_predicted_ms))
        out[kind] = own[kind] if kind in own else max(1.0, overall)
    return out


def _median_ratio(measured: list[Measured], dense_predicted_ms: float) -> float:
    """The (upper) median of measured/predicted latency, each relative to its dense, over `measured`."""
    ratios = sorted((m.latency_ms / m.timing["dense_ms"]) / (m.predicted_ms / dense_predicted_ms) for m in measured)
    return ratios[len(ratios) // 2]
