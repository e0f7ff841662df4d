"""Latency-budgeted search: an accuracy proxy, an Optuna study under a latency constraint, and the
pipeline that re-measures, retrains and reports the best candidates."""
from .proxy import AccuracyProxy, ProxyScore, stack_images
from .study import (
    SAMPLERS, count, default_storage, driver_url, enqueue_warm_starts, exclusive, fail_orphans, feasible_trials,
    make_objective, make_sampler, open_study, run_trials, worker_seed,
)

__all__ = [
    "AccuracyProxy", "ProxyScore", "stack_images", "SAMPLERS", "count", "default_storage", "driver_url",
    "enqueue_warm_starts", "exclusive", "fail_orphans", "feasible_trials", "make_objective",
    "make_sampler", "open_study", "run_trials", "worker_seed",
]
