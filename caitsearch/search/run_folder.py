"""The run folder of one search: where every file lives, and the one writer and reader of each,
shared by the search (which writes it) and the report (which reads it). Every file is written
atomically::

    RUN/manifest.json      the exact command, versions, device, threads, storage (no password), request
    RUN/space.json         the search space: choices, and min/mid/max predicted latency and MACs
    RUN/study.db           Optuna SQLite storage (absent with --storage URL); RUN/study.lock
    RUN/trials.parquet     every trial: number, state, proxy (kl, agreement), predicted_ms, config JSON
    RUN/dense/             dense weights when this run had to train them (model.safetensors)
    RUN/candidates/trial-<n>/  one per re-measured candidate within budget (n = Optuna trial
                           number, stable across resumes): config.json, model.safetensors
                           (materialised; retrained for the top K), result.json (accuracy,
                           retrained; written last, so its presence means done) and, when
                           retrained, the trainer's metrics.json and state.pt
    RUN/remeasured.json    the finalists timed end to end against dense (reused when the run resumes)
    RUN/ranking.db         the short fine-tunes' Optuna study (one trial per finalist, a rung per step)
    RUN/ranking.parquet    one row per finalist: proxy, validation accuracy at every rung, survived
    RUN/candidates/trial-<n>/tune/   a finalist's short fine-tune (state.pt, paused between rungs)
    RUN/results.parquet    one row per re-measured candidate (same as results.csv)
    RUN/results.csv
    RUN/summary.json       {"budget": {"ratio", "ms"}, "dense": {"accuracy", "latency_ms"},
                            "candidates": [{"accuracy", "latency_ms", "predicted_latency_ms",
                            "speedup", "config", ...}, ...] best first, all measured within budget}
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from ..errors import CaitsearchError
from ..io import atomic_write, write_json

TRIAL_COLUMNS = ["number", "state", "kl", "agreement", "predicted_ms", "feasible", "warm_start", "config"]


class RunFolder:
    """Paths and readers/writers of one run folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # ----- layout -------------------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"

    @property
    def space(self) -> Path:
        return self.path / "space.json"

    @property
    def study_db(self) -> Path:
        return self.path / "study.db"

    @property
    def trials(self) -> Path:
        return self.path / "trials.parquet"

    @property
    def results(self) -> Path:
        return self.path / "results.parquet"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def dense(self) -> Path:
        return self.path / "dense"

    @property
    def remeasured(self) -> Path:
        return self.path / "remeasured.json"

    @property
    def ranking(self) -> Path:
        return self.path / "ranking.parquet"

    def candidate(self, trial: int) -> Path:
        return self.path / "candidates" / f"trial-{trial}"

    def sqlite_url(self) -> str:
        return f"sqlite:///{self.study_db.resolve()}"

    def ranking_url(self) -> str:
        """The short fine-tunes' study lives in the run folder even when the search's study is shared."""
        self.path.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(self.path / 'ranking.db').resolve()}"

    # ----- writing ------------------------------------------------------------------------------
    def write_manifest(self, request: dict, **extra: Any) -> None:
        """The command, versions and host, and what was asked (`request`), for the report's
        environment table and its reproduce commands."""
        import optuna
        import timm
        import torch

        write_json(self.manifest, {
            "command": [Path(sys.argv[0]).name, *sys.argv[1:]], "cwd": os.getcwd(),
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "optuna": optuna.__version__, "host": platform.node(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(), **extra, "request": request})

    def write_space(self, described: dict) -> None:
        write_json(self.space, described)

    def write_trials(self, rows: list[dict]) -> None:
        _write_table(self.trials, pd.DataFrame(rows, columns=TRIAL_COLUMNS))

    def write_results(self, rows: list[dict]) -> None:
        frame = pd.DataFrame(rows)
        _write_table(self.results, frame)
        atomic_write(self.path / "results.csv", lambda tmp: frame.to_csv(tmp, index=False))

    def write_summary(self, summary: dict) -> None:
        write_json(self.summary, summary)

    def write_ranking(self, rows: list[dict]) -> None:
        _write_table(self.ranking, pd.DataFrame(rows))

    # ----- reading ------------------------------------------------------------------------------
    def read_manifest(self) -> dict:
        return _read_json(self.manifest) or {}

    def read_summary(self) -> Optional[dict]:
        return _read_json(self.summary)

    def read_trials(self) -> Optional[pd.DataFrame]:
        return pd.read_parquet(self.trials) if self.trials.is_file() else None

    def read_results(self) -> pd.DataFrame:
        return pd.read_parquet(self.results) if self.results.is_file() else pd.DataFrame()

    def read_ranking(self) -> pd.DataFrame:
        return pd.read_parquet(self.ranking) if self.ranking.is_file() else pd.DataFrame()

    def read_remeasured(self) -> Optional[dict]:
        return _read_json(self.remeasured)


def requested(manifest: dict, key: str) -> Any:
    """A setting the run was asked for, from the manifest's request (grouped or, in older runs, flat)."""
    request = manifest.get("request", {})
    if key in request:
        return request[key]
    for group in ("budget", "data", "study", "measure", "recipe"):
        if isinstance(request.get(group), dict) and key in request[group]:
            return request[group][key]
    return None


def requested_budget(manifest: dict) -> Optional[dict]:
    """{"ratio", "ms"} as asked for (the ms of a ratio budget is only known once measured)."""
    budget = manifest.get("request", {}).get("budget")
    if isinstance(budget, dict):
        return {"ratio": budget.get("ratio"), "ms": budget.get("ms")}
    if budget is not None:
        return {"ratio": budget, "ms": None}
    ms = requested(manifest, "budget_ms")
    return {"ratio": None, "ms": ms} if ms is not None else None


def trial_rows(study) -> list[dict]:
    """Every trial of an Optuna study as one row of the trials table."""
    return [{
        "number": t.number, "state": t.state.name, "kl": t.value,
        "agreement": t.user_attrs.get("agreement"), "predicted_ms": t.user_attrs.get("predicted_ms"),
        "feasible": bool(t.constraints) and all(c <= 0 for c in t.constraints.values()),
        "warm_start": bool(t.user_attrs.get("warm_start")),
        "config": json.dumps(t.user_attrs["config"]) if "config" in t.user_attrs else None,
    } for t in study.get_trials(deepcopy=False)]


def _write_table(path: Path, frame: pd.DataFrame) -> None:
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def _read_json(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CaitsearchError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from e
