"""Latency-budgeted search: the accuracy proxy, the Optuna study under a latency constraint, and
the pipeline of named stages that re-measures, retrains and summarises the best candidates."""
from .pipeline import run_search
from .proxy import AccuracyProxy, ProxyScore, stack_images
from .request import Budget, BudgetRequest, DataRequest, MeasureRequest, RankRequest, SearchRequest, StudyRequest
from .run_folder import RunFolder, trial_rows
from .schedule import strategy_config
from .study import (
    SAMPLERS, balance_families, count, driver_url, enqueue_warm_starts, exclusive, fail_orphans, feasible_trials,
    make_objective, make_sampler, open_study, run_trials, worker_seed,
)

__all__ = [
    "AccuracyProxy", "Budget", "BudgetRequest", "DataRequest", "MeasureRequest", "ProxyScore", "RankRequest", "RunFolder",
    "SAMPLERS", "SearchRequest", "StudyRequest", "balance_families", "count", "driver_url", "enqueue_warm_starts",
    "exclusive", "fail_orphans", "feasible_trials", "make_objective", "make_sampler", "open_study", "run_search",
    "run_trials", "stack_images", "strategy_config", "trial_rows", "worker_seed",
]
