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


def remeasure_until_within(dense: nn.Module, feasible: list, spec: ModelSpec, budget: Budget, dense_predicted_ms: float,
                           runtime: Runtime, calib: torch.Tensor,
                           wanted: int, per_round: int, repeats: int, rounds: int = 3,
                           on_round: Optional[Callable[[int], Callable[[], None]]] = None,
                           task: Task = CLASSIFICATION) -> tuple[dict, list[Measured]]:
    """Re-measure the best feasible trials; if fewer than `wanted` stay within budget on this
    device, correct the predictions by the measured/predicted ratio seen so far and try the next
    best trials that still fit, up to `rounds` times. `on_round(n)` returns a per-repeat callback."""
    measured, dense_timing, correction = [], None, 1.0
    queue = list(feasible)
    for _ in range(rounds):
        batch = [t for t in queue
                 if correction * t.user_attrs["predicted_ms"] / dense_predicted_ms <= budget.ratio][:per_round]
        if not batch:
            break
        queue = [t for t in queue if t not in batch]
        dense_timing, got = remeasure(dense, batch, spec, budget, runtime, calib, repeats=repeats,
                                      progress=on_round(len(batch)) if on_round else None, task=task)
        measured += got  # each carries the dense latency of its own loop, so rounds compare
        if sum(m.within_budget for m in measured) >= wanted:
            break
        ratios = sorted((m.latency_ms / m.timing["dense_ms"]) / (m.predicted_ms / dense_predicted_ms) for m in measured)
        correction = max(correction, ratios[len(ratios) // 2])
    return dense_timing, measured
