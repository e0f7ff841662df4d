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

The readers refuse, with one sentence naming the file, anything the report could not use: a file
that is not JSON or Parquet, a field of the wrong type, a table without its columns.
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from ..config import CompressionConfig
from ..errors import CaitsearchError, reason
from ..io import atomic_write, check_output_dir, holds_files, write_json

TRIAL_COLUMNS = ["number", "state", "kl", "agreement", "predicted_ms", "feasible", "warm_start", "config"]
# what the report reads of each table: columns of numbers (None allowed) and of anything
TRIAL_NUMBERS = ("number", "kl", "agreement", "predicted_ms")
TRIAL_FLAGS = ("feasible", "warm_start")
RESULT_NUMBERS = ("trial", "latency_ms", "predicted_latency_ms", "speedup", "macs")
# what the report reads of summary.json and its candidates: field -> check
NUMBER, POSITIVE, TEXT, MAPPING, LIST, FLAG = "a number", "a positive number", "text", "an object", "a list", "true or false"
SUMMARY_FIELDS = {"model": TEXT, "budget": MAPPING, "candidates": LIST}
CANDIDATE_FIELDS = {"trial": "a trial number", "accuracy": NUMBER, "latency_ms": POSITIVE,
                    "predicted_latency_ms": POSITIVE, "speedup": POSITIVE, "config": MAPPING}
FINAL_RETRAINING_FIELDS = {"trial": "a trial number", "steps": NUMBER, "full_steps": POSITIVE, "epochs": POSITIVE}
MANIFEST_FIELDS = {"command": LIST, "cwd": TEXT, "storage": TEXT, "study_name": TEXT, "profile": MAPPING,
                   "request": MAPPING}


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

    def check_reusable(self) -> None:
        """Refuse, before anything is written, a folder a search cannot make its own: one that
        cannot be written, or holds files but no run of a search (another command's output)."""
        check_output_dir(self.path)
        if holds_files(self.path) and "request" not in self.read_manifest():
            raise CaitsearchError(f"--out {self.path} holds files but no search run (no manifest.json of one); "
                                  "pass a new or empty folder.")

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
        manifest = _read_json(self.manifest) or {}
        _check_fields(manifest, MANIFEST_FIELDS, self.manifest, optional=True)
        if not all(isinstance(a, str) for a in manifest.get("command", [])):
            raise CaitsearchError(f"{self.manifest}: 'command' must be a list of words.")
        _check_fields(manifest.get("profile", {}), {"fingerprint": MAPPING}, self.manifest, "profile.", optional=True)
        return manifest

    def read_summary(self) -> Optional[dict]:
        summary = _read_json(self.summary)
        if summary is not None:
            check_summary(summary, self.summary)
        return summary

    def read_trials(self) -> Optional[pd.DataFrame]:
        if not self.trials.is_file():
            return None
        return _read_table(self.trials, TRIAL_COLUMNS, TRIAL_NUMBERS, TRIAL_FLAGS, nullable=True)

    def read_results(self) -> pd.DataFrame:
        if not self.results.is_file():
            return pd.DataFrame()
        return _read_table(self.results, ["within_budget", *RESULT_NUMBERS], RESULT_NUMBERS, ("within_budget",),
                           nullable=False)

    def read_ranking(self) -> pd.DataFrame:
        if not self.ranking.is_file():
            return pd.DataFrame()
        frame = _check_table(_read_parquet(self.ranking), self.ranking, ["trial"], ("trial",), (), nullable=False)
        rungs = tuple(c for c in frame.columns if str(c).startswith("val_at_"))  # empty after a candidate was halved
        return _check_table(frame, self.ranking, [], rungs, (), nullable=True)

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
        data = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise CaitsearchError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from e
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, absurdly nested
        raise CaitsearchError(f"{path} is not readable JSON ({reason(e, 120)}).") from e
    if not isinstance(data, dict):
        raise CaitsearchError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data


def _read_table(path: Path, columns: list[str], numbers: tuple[str, ...], flags: tuple[str, ...],
                nullable: bool) -> pd.DataFrame:
    """A Parquet table with at least `columns`, those in `numbers` numeric (finite, positive where
    they are latencies; empty only if `nullable`), those in `flags` true or false."""
    return _check_table(_read_parquet(path), path, columns, numbers, flags, nullable)


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as e:  # truncated or corrupt Parquet: pyarrow raises several types
        raise CaitsearchError(f"{path} is corrupt or truncated ({reason(e, 120)}).") from e


def _check_table(frame: pd.DataFrame, path: Path, columns: list[str], numbers: tuple[str, ...],
                 flags: tuple[str, ...], nullable: bool) -> pd.DataFrame:
    missing = [c for c in columns if c not in frame]
    wrong = [c for c in numbers if c in frame and not _numbers(frame[c], nullable, positive=c.endswith("_ms"))]
    wrong += [c for c in flags if c in frame and not (pd.api.types.is_bool_dtype(frame[c])
                                                      or all(v in (True, False) for v in frame[c]))]
    if missing or wrong:
        raise CaitsearchError(f"{path} lacks a valid column {', '.join((missing + wrong)[:3])}.")
    return frame


def _numbers(column: pd.Series, nullable: bool, positive: bool) -> bool:
    def fits(v) -> bool:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return nullable
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return number and (not positive or v > 0)

    return not pd.api.types.is_bool_dtype(column) and all(fits(v) for v in column.tolist())


def _valid(value: Any, kind: str) -> bool:
    if kind in (NUMBER, POSITIVE):
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return number and (kind == NUMBER or value > 0)
    if kind == "a trial number":
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return isinstance(value, {TEXT: str, MAPPING: dict, LIST: list, FLAG: bool}[kind])


def _check_fields(data: dict, fields: dict[str, str], path: Path, where: str = "", optional: bool = False,
                  nullable: bool = False) -> None:
    """`optional`: a field may be left out; `nullable`: it may be null."""
    for key, kind in fields.items():
        if (key in data or not optional) and not (nullable and data.get(key) is None) and not _valid(data.get(key), kind):
            raise CaitsearchError(f"{path}: '{where}{key}' must be {kind}, not {_shown(data.get(key))}.")


def _shown(value: Any, limit: int = 40) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_summary(summary: dict, path: Path) -> dict:
    """Refuse a summary.json whose fields the report reads are missing or of the wrong type."""
    _check_fields(summary, SUMMARY_FIELDS, path)
    for key in ("ratio", "ms"):
        if summary["budget"].get(key) is not None and not _valid(summary["budget"][key], POSITIVE):
            raise CaitsearchError(f"{path}: 'budget.{key}' must be a positive number.")
    dense = summary.get("dense")
    if dense is not None:
        if not isinstance(dense, dict):
            raise CaitsearchError(f"{path}: 'dense' must be an object.")
        _check_fields(dense, {"accuracy": NUMBER, "latency_ms": POSITIVE}, path, "dense.")
        _check_fields(dense, {"predicted_latency_ms": POSITIVE, "val_accuracy": NUMBER}, path, "dense.", optional=True,
                      nullable=True)
    if not isinstance(summary.get("over_budget", []), list):
        raise CaitsearchError(f"{path}: 'over_budget' must be a list.")
    _check_fields(summary, {"teacher": MAPPING, "selection": TEXT}, path, optional=True, nullable=True)
    _check_fields(summary.get("teacher") or {}, {"warning": TEXT}, path, "teacher.", optional=True, nullable=True)
    _check_fields(summary, {"final_retraining": LIST}, path, optional=True)
    for i, plan in enumerate(summary.get("final_retraining", [])):
        if not isinstance(plan, dict):
            raise CaitsearchError(f"{path}: final_retraining[{i}] must be an object.")
        _check_fields(plan, FINAL_RETRAINING_FIELDS, path, f"final_retraining[{i}].")
        _check_fields(plan, {"step_seconds": POSITIVE, "limited_by": TEXT}, path, f"final_retraining[{i}].",
                      optional=True, nullable=True)
        if plan.get("limited_by") and plan.get("step_seconds") is None:
            raise CaitsearchError(f"{path}: final_retraining[{i}] is limited but has no 'step_seconds'.")
    for i, c in enumerate(summary["candidates"]):
        if not isinstance(c, dict):
            raise CaitsearchError(f"{path}: candidate {i} must be an object.")
        _check_fields(c, CANDIDATE_FIELDS, path, f"candidates[{i}].")
        _check_fields(c, {"timing": MAPPING, "path": TEXT}, path, f"candidates[{i}].", optional=True)
        _check_fields(c, {"proxy_agreement": NUMBER, "val_accuracy": NUMBER}, path, f"candidates[{i}].", optional=True,
                      nullable=True)
        if summary.get("selection") == "val_accuracy":  # the choice was made on it, so the report ranks by it
            _check_fields(c, {"val_accuracy": NUMBER}, path, f"candidates[{i}].")
        _check_fields(c, {"family": TEXT, "retrained": FLAG}, path, f"candidates[{i}].", optional=True)
        try:
            CompressionConfig.from_dict(c["config"])
        except CaitsearchError as e:
            raise CaitsearchError(f"{path}: candidate {i}: {e}") from e
    return summary
