"""Read a `caitsearch search` run folder (or its trials from any Optuna storage) into one `Run`.

A run may be incomplete: an interrupted search has trials but no summary.json; a run whose
candidates were all measured over budget has a summary with no candidates. `Run.notes` says so in
sentences the report prints, instead of failing.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional

import pandas as pd

from ..config import CompressionConfig
from ..errors import CaitsearchError
from ..io import check_input_dir
from ..models import ModelSpec, model_spec
from ..search.run_folder import TRIAL_COLUMNS, RunFolder, requested, requested_budget, trial_rows


def trials_from_storage(url: str, study_name: str = "search") -> pd.DataFrame:
    """Every trial of an Optuna study (SQLite, PostgreSQL, ... URL) as the run's trials table."""
    import optuna

    from ..search import driver_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=driver_url(url))
    except KeyError:
        raise CaitsearchError(f"storage {url} holds no study named '{study_name}'; pass --study-name.") from None
    except Exception as e:  # bad URL, server down, missing driver
        raise CaitsearchError(f"cannot open study storage {url}: {str(e).splitlines()[0][:200]}") from e
    return pd.DataFrame(trial_rows(study), columns=TRIAL_COLUMNS)


def pareto_mask(cost: pd.Series, value: pd.Series) -> pd.Series:
    """True where no other point is at most as costly and at least as good, and strictly better in one."""
    keep = []
    for c, v in zip(cost, value):
        dominated = ((cost <= c) & (value >= v) & ((cost < c) | (value > v))).any()
        keep.append(not dominated)
    return pd.Series(keep, index=cost.index, dtype=bool)


@dataclass
class Run:
    """Everything a report needs from one run folder; the tables are pandas frames."""

    path: Path
    summary: Optional[dict]
    manifest: dict
    trials: pd.DataFrame
    results: pd.DataFrame
    trials_source: str
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self) -> Optional[str]:
        return (self.summary or {}).get("model") or self.manifest.get("profile", {}).get("model")

    @cached_property
    def spec(self) -> Optional[ModelSpec]:
        """Shape facts of the run's model (built without weights), for the per-block pictures."""
        configs = [c["config"] for c in self.candidates]
        if not configs:
            return None
        cfg = CompressionConfig.from_dict(configs[0])
        return model_spec(cfg.model, img_size=tuple(cfg.img_size))

    @property
    def task(self) -> str:
        """What the run's model does: "classification" (runs from before tasks too) or "segmentation"."""
        return (self.summary or {}).get("task") or requested(self.manifest, "task") or "classification"

    @property
    def metric_label(self) -> str:
        """How the run's scores (`accuracy`, `val_accuracy` of its results) are named: accuracy or mIoU."""
        return "mIoU" if (self.summary or {}).get("metric") == "miou" or self.task == "segmentation" else "accuracy"

    @property
    def candidates(self) -> list[dict]:
        """Re-measured candidates within budget with their test accuracy (summary order)."""
        return list((self.summary or {}).get("candidates", []))

    @property
    def budget(self) -> Optional[dict]:
        return (self.summary or {}).get("budget") or requested_budget(self.manifest)

    @property
    def dense(self) -> Optional[dict]:
        return (self.summary or {}).get("dense")

    @property
    def chosen_on_validation(self) -> bool:
        """Runs since the validation split choose by validation accuracy; older ones chose by test accuracy."""
        return (self.summary or {}).get("selection") == "val_accuracy"

    @property
    def recommended(self) -> Optional[dict]:
        """The candidate to deploy: among those measured within budget (retrained ones first), the
        most accurate on the validation split, the faster one on a tie. Test accuracy is reported,
        never used to choose (runs from before the validation split chose by it; a note says so)."""
        if not self.candidates:
            return None
        if self.chosen_on_validation:
            return max(self.candidates, key=lambda c: (bool(c.get("retrained")), c["val_accuracy"], -c["latency_ms"]))
        return max(self.candidates, key=lambda c: (c["accuracy"], -c["latency_ms"]))

    @cached_property
    def ranking(self) -> pd.DataFrame:
        """The finalists' short fine-tunes: validation accuracy per rung (empty when none ran)."""
        return RunFolder(self.path).read_ranking()

    def candidate_params(self, candidate: dict) -> Optional[int]:
        """Parameter count of a candidate's saved weights, read from the safetensors header only."""
        path = Path(candidate.get("path", "")) / "model.safetensors"
        if not path.is_file():
            path = RunFolder(self.path).candidate(candidate["trial"]) / "model.safetensors"
        if not path.is_file():
            return None
        return _safetensors_numel(path)

    @property
    def dense_params(self) -> Optional[int]:
        path = RunFolder(self.path).dense / "model.safetensors"
        return _safetensors_numel(path) if path.is_file() else None

    def commands(self) -> list[str]:
        """Shell commands that reproduce the run, report it and export its recommended candidate."""
        cmds = []
        if self.manifest.get("command"):
            cwd = self.manifest.get("cwd")
            cmd = shlex.join(["caitsearch", *self.manifest["command"][1:]])
            cmds.append(f"cd {shlex.quote(cwd)} && {cmd}" if cwd else cmd)
        cmds.append(f"caitsearch report {shlex.quote(str(self.path))}")
        storage = self.manifest.get("storage")
        if storage:
            cmds.append(f"optuna-dashboard {shlex.quote(storage)}")
        if self.recommended:
            folder = RunFolder(self.path).candidate(self.recommended["trial"])
            cmds.append(f"caitsearch export {shlex.quote(str(folder))} --format onnx --out trial-{self.recommended['trial']}.onnx")
        return cmds

    def environment(self) -> dict:
        """Device fingerprint, versions, batch and dtype: what the latencies are valid for."""
        m, s = self.manifest, self.summary or {}
        prof = m.get("profile", {})
        fp = prof.get("fingerprint", {})
        env = {
            "device": s.get("device") or fp.get("backend"), "backend": prof.get("backend"),
            "cuda_graphs": prof.get("cuda_graphs") if prof.get("backend") == "cuda" else None,
            "cpu": fp.get("cpu"), "gpu": fp.get("gpu") or fp.get("device_name"),
            "logical_cores": fp.get("logical_cores"), "threads": s.get("threads", m.get("threads")),
            "batch_size": s.get("batch_size", prof.get("batch_size")), "dtype": s.get("dtype", prof.get("dtype")),
            "model": self.model, "data": s.get("data") or requested(m, "source") or requested(m, "data"),
            "python": m.get("python"), "torch": m.get("torch"), "timm": m.get("timm"), "optuna": m.get("optuna"),
            "host": m.get("host"), "platform": m.get("platform"),
            "sampler": requested(m, "sampler"), "storage": m.get("storage"),
            "trials_from": self.trials_source,
        }
        return {k: v for k, v in env.items() if v is not None}


def _safetensors_numel(path: Path) -> Optional[int]:
    """Parameters in a safetensors file, from its header; None where it cannot be read (the table
    then shows no count: a report is not the place to refuse a damaged weights file)."""
    from safetensors import safe_open

    total = 0
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    except Exception:  # safetensors raises its own error type, OSError or others for a damaged file
        return None
    return total


def load_run(path: Path, storage: Optional[str] = None, study_name: Optional[str] = None) -> Run:
    """Read RUN's files; trials come from `storage` when given, else RUN/trials.parquet, else RUN/study.db."""
    path = check_input_dir(Path(path), "run folder")
    folder = RunFolder(path)
    manifest = folder.read_manifest()
    summary = folder.read_summary()
    name = study_name or manifest.get("study_name") or "search"
    notes = []
    stored = folder.read_trials()
    if storage:
        trials, source = trials_from_storage(storage, name), storage
    elif stored is not None:
        trials, source = stored, str(folder.trials)
    elif folder.study_db.is_file():
        url = folder.sqlite_url()
        trials, source = trials_from_storage(url, name), url
    elif manifest.get("storage") and not manifest["storage"].startswith("sqlite"):
        raise CaitsearchError(f"{path} keeps its trials in {manifest['storage']}; pass --storage with the full URL.")
    else:
        trials, source = pd.DataFrame(columns=TRIAL_COLUMNS), ""
    if not manifest and summary is None and trials.empty:
        raise CaitsearchError(f"{path} is not a caitsearch run folder (no manifest.json, summary.json or trials).")
    if summary is None and trials.empty:
        raise CaitsearchError(f"run {path} has no trials yet (its search stopped before the first one); nothing to report.")
    results = folder.read_results()
    run = Run(path=path, summary=summary, manifest=manifest, trials=trials, results=results, trials_source=source,
              notes=notes)
    notes.extend(_notes(run))
    return run


def _notes(run: Run) -> list[str]:
    """Sentences about what is missing or unusual, shown at the top of the report."""
    notes = []
    summary = run.summary or {}
    teacher = summary.get("teacher") or {}
    if teacher.get("warning"):
        notes.append(f"Weak teacher: {teacher['warning']}")
    for plan in summary.get("final_retraining", []):
        if plan.get("limited_by"):
            notes.append(f"Trial {plan['trial']} was retrained for {plan['steps']} of the recipe's {plan['full_steps']} "
                         f"steps ({plan['steps'] / plan['full_steps'] * plan['epochs']:.2f} of {plan['epochs']} epochs) "
                         f"to fit {plan['limited_by']}, at {plan['step_seconds']:.2f} s per step measured here; "
                         "`--minutes 0` runs the full recipe.")
    if run.summary is not None and run.candidates and not run.chosen_on_validation:
        notes.append("This run predates the validation split: its candidate was chosen by test accuracy.")
    states = run.trials["state"].value_counts() if not run.trials.empty else pd.Series(dtype=int)
    for state, word in (("FAIL", "failed"), ("PRUNED", "were pruned"), ("RUNNING", "are running or were interrupted")):
        if states.get(state, 0):
            notes.append(f"{states[state]} trial(s) {word}; they have no score and are not plotted.")
    if run.trials.empty:
        notes.append("No trials were found.")
    elif not run.trials["feasible"].fillna(False).astype(bool).any():
        notes.append("No trial was predicted within the latency budget.")
    if run.summary is None:
        notes.append("The search has not finished (no summary.json): candidates were not re-measured or evaluated yet.")
    elif not run.candidates:
        over = run.summary.get("over_budget", [])
        notes.append(f"No feasible candidate: none of the {len(over)} re-measured candidate(s) ran within budget on "
                     "this device, so there is nothing to deploy; raise the budget or run more trials.")
    return notes
