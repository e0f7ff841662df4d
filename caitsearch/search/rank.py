"""Multi-fidelity ranking of the finalists, between the proxy screen and the full retraining.

The untrained proxy (KL to dense) is a screen, not a ranking: it favours merges, which lose less
before retraining and gain less from it. So the finalists (taken in rounds over pure pruning,
merge-heavy and mixed candidates, each kind's proxy-best first) each get a short distillation
fine-tune with the search's own recipe, are scored on the validation split, and successive
halving keeps the better half at every rung: rung r trains the survivors to `steps[r]` steps in
all, so a candidate that survives every rung has had the longest tune.

It is an Optuna study of its own (`<study>:rank` in `RUN/ranking.db`): one trial per finalist,
the validation accuracy reported at each rung as an intermediate value, and a pruner that
halves synchronously (every survivor reports a rung before any is pruned, so the order in which
candidates train changes nothing). Each candidate's fine-tune pauses and resumes from its own
`state.pt`, and a rung already reported is never trained again: a SIGKILL loses at most the
steps since the last rung boundary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import optuna
from optuna.trial import TrialState

from ..config import CompressionConfig
from ..models import ModelSpec

RANK_SUFFIX = ":rank"


def merge_share(config: CompressionConfig, spec: ModelSpec) -> float:
    """How much of `config`'s MAC saving comes from merging tokens (0: pure pruning, 1: pure merging)."""
    dense = CompressionConfig.dense(spec).macs(spec)["total"]
    total = config.macs(spec)["total"]
    unmerged = config.with_blocks(b.__class__(b.keep_qk, b.keep_v, b.keep_mlp) for b in config.blocks).macs(spec)["total"]
    saved = dense - total
    return 0.0 if saved <= 0 else max(0.0, min(1.0, (unmerged - total) / saved))


def trial_config(trial) -> CompressionConfig:
    """The config an Optuna trial of the search stored."""
    return CompressionConfig.from_dict(trial.user_attrs["config"])


def finalist_kind(config: CompressionConfig, spec: ModelSpec) -> str:
    """"prune" (no merge), "merge-heavy" (at least half the MAC saving from merging) or "mixed"."""
    share = merge_share(config, spec)
    return "prune" if share == 0 else "merge-heavy" if share >= 0.5 else "mixed"


def pick_finalists(items: Sequence, spec: ModelSpec, count: int,
                   config_of: Callable[[Any], CompressionConfig] = trial_config) -> list:
    """`count` items taken in rounds over the kinds (`finalist_kind`), each kind's best by proxy
    first: the proxy favours merging across kinds, so it may not decide alone which kind gets the
    short fine-tunes. The best pure-pruning and the best merge-heavy item are therefore always
    among them where there are such. `items` (study trials, or re-measured candidates with
    `config_of`) come best first; the result keeps that order."""
    if count <= 0:
        return []
    by_kind: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_kind.setdefault(finalist_kind(config_of(item), spec), []).append(i)
    chosen: list[int] = []
    for depth in range(len(items)):
        for indices in by_kind.values():  # kinds in the order of their best item
            if depth < len(indices) and len(chosen) < count:
                chosen.append(indices[depth])
        if len(chosen) >= count:
            break
    return [items[i] for i in sorted(chosen)]


def rung_steps(first: int, rungs: int) -> tuple[int, ...]:
    """Cumulative steps at each rung: `first`, then doubling (halving's other half)."""
    return tuple(first * 2 ** r for r in range(rungs))


def rungs_for(finalists: int, eta: int = 2) -> int:
    """Rungs until one candidate would be left: 8 finalists at eta 2 -> 8, 4, 2 -> three rungs."""
    return max(1, math.ceil(math.log(max(finalists, 2), eta)))


class SynchronousHalving(optuna.pruners.BasePruner):
    """Successive halving in lock step: at a rung's step, a trial is pruned unless its value is
    among the best ceil(n / eta) of the n trials that reported that step. The caller asks
    `should_prune` only after every survivor has reported the rung, which makes the decision
    independent of training order (Optuna's own SuccessiveHalvingPruner is asynchronous)."""

    def __init__(self, steps: Sequence[int], eta: int = 2) -> None:
        self.steps, self.eta = tuple(steps), eta

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step not in self.steps[:-1]:
            return False  # the last rung is the end of the tune: nothing is halved after it
        value = trial.intermediate_values[step]
        values = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False)
                  if step in t.intermediate_values and t.state != TrialState.FAIL]
        keep = max(1, math.ceil(len(values) / self.eta))
        return sum(v > value for v in values) >= keep


@dataclass(frozen=True)
class RungResult:
    """One finalist after ranking: its validation accuracy at each rung it reached."""

    trial: int  # the main study's trial number (the candidate)
    scores: dict  # cumulative steps -> validation accuracy
    survived: bool  # reached the last rung
    step_seconds: Optional[float]

    @property
    def best_step(self) -> int:
        return max(self.scores)

    @property
    def score(self) -> float:
        return self.scores[self.best_step]


def rank_study(url: str, name: str, steps: Sequence[int], eta: int) -> optuna.Study:
    return optuna.create_study(storage=url, study_name=name + RANK_SUFFIX, direction="maximize",
                               pruner=SynchronousHalving(steps, eta), load_if_exists=True)


def run_halving(study: optuna.Study, finalists: Sequence[int], steps: Sequence[int],
                tune: Callable[[int, int], tuple[float, Optional[float]]],
                on_rung: Optional[Callable[[int, int], None]] = None) -> list[RungResult]:
    """Successive halving of `finalists` (trial numbers) over cumulative `steps`: `tune(trial,
    until)` continues that candidate's fine-tune to `until` steps and returns (validation
    accuracy, seconds per step). Resumes a study that already holds some rungs. Returns every
    finalist best first: survivors of the last rung by their last score, then the others by the
    rung they reached and their score there."""
    trials = _trials_by_candidate(study, finalists)
    step_seconds: dict[int, Optional[float]] = {}
    for rung, until in enumerate(steps):
        alive = [c for c in finalists if trials[c].state_is_alive()]
        if on_rung:
            on_rung(rung, len(alive))
        for c in alive:
            if until not in trials[c].intermediate_values():
                value, seconds = tune(c, until)
                trials[c].report(value, until)
                step_seconds[c] = seconds
        for c in alive:
            if until == steps[-1]:
                trials[c].complete()
            elif trials[c].should_prune():
                trials[c].prune()
    results = []
    for c in finalists:
        scores = trials[c].intermediate_values()
        results.append(RungResult(c, dict(sorted(scores.items())), steps[-1] in scores, step_seconds.get(c)))
    return sorted(results, key=lambda r: (-r.best_step, -r.score, finalists.index(r.trial)))


class _Finalist:
    """One finalist's trial in the rank study. A trial a killed run left RUNNING is replaced by a
    fresh one that replays its reported rungs (the old one is marked failed), so resuming needs
    only Optuna's public ask-and-tell interface."""

    def __init__(self, study: optuna.Study, earlier: Optional[optuna.trial.FrozenTrial], candidate: int) -> None:
        self.study, self.finished = study, None
        if earlier is not None and earlier.state in (TrialState.COMPLETE, TrialState.PRUNED):
            self.finished, self.values = earlier.state, dict(earlier.intermediate_values)
            return
        self.trial = study.ask()
        self.trial.set_user_attr("candidate", candidate)
        self.values: dict = {}
        if earlier is not None:  # RUNNING: the process that ran it was killed
            for step, value in sorted(earlier.intermediate_values.items()):
                self.report(value, step)
            study.tell(earlier.number, state=TrialState.FAIL)

    def state_is_alive(self) -> bool:
        return self.finished is None

    def intermediate_values(self) -> dict:
        return dict(self.values)

    def report(self, value: float, step: int) -> None:
        self.trial.report(value, step)
        self.values[step] = value

    def should_prune(self) -> bool:
        return self.trial.should_prune()

    def prune(self) -> None:
        self.study.tell(self.trial, state=TrialState.PRUNED)
        self.finished = TrialState.PRUNED

    def complete(self) -> None:
        self.study.tell(self.trial, self.values[max(self.values)])
        self.finished = TrialState.COMPLETE


def _trials_by_candidate(study: optuna.Study, finalists: Sequence[int]) -> dict[int, _Finalist]:
    latest = {}
    for t in study.get_trials(deepcopy=False):
        if t.state != TrialState.FAIL:
            latest[t.user_attrs.get("candidate")] = t
    return {c: _Finalist(study, latest.get(c), c) for c in finalists}


def ranking_rows(results: Sequence[RungResult], proxy: dict, families: dict, steps: Sequence[int]) -> list[dict]:
    """The ranking table (RUN/ranking.parquet): one row per finalist, a column per rung."""
    rows = []
    for rank, r in enumerate(results):
        row = {"rank": rank, "trial": r.trial, "family": families.get(r.trial), "proxy_kl": proxy.get(r.trial),
               "survived": r.survived, "reached_steps": r.best_step, "val_accuracy": r.score,
               "step_seconds": r.step_seconds}
        row.update({f"val_at_{s}": r.scores.get(s) for s in steps})
        rows.append(row)
    return rows


def tune_folder(candidate_folder: Path) -> Path:
    return Path(candidate_folder) / "tune"
