"""The Optuna study: storage, samplers, the latency-budget constraint, warm starts and exact counts.

- Storage: `sqlite:///RUN/study.db` by default (one process: a lock file beside it keeps a second
  one out, so trials left RUNNING by a killed process are known to be dead and are failed on
  resume). Any other URL, e.g. `postgresql://user@host/db`, is shared by several workers on
  several machines; there a heartbeat marks a killed worker's trial failed after a grace period.
- The budget is a constraint (`trial.set_constraint("latency", predicted_ms - budget_ms)`, feasible
  at <= 0). A config predicted over budget gets the proxy's floor score without any accuracy work.
- `n_trials` is the total for the study, not per call: resumed runs and every worker stop once
  COMPLETE + PRUNED trials reach it. A trial only runs if fewer than `n_trials` live or finished
  trials have a lower number (trial numbers are handed out by the storage in one order for all
  workers), so two workers racing for the last slot cannot both take it; the loser is marked
  FAIL with the user attribute `surplus` and never counted.
- Warm starts (uniform schedules) are enqueued once per study, recorded in a study attribute.
- In the joint space every trial is enqueued by `balance_families`: the family furthest below its
  share, drawn by a sampler that has seen only that family's trials.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import random
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import optuna
import torch
from optuna.trial import TrialState

from ..config import CompressionConfig
from ..errors import CaitsearchError
from ..space import SearchSpace
from .proxy import AccuracyProxy

SAMPLERS = ("tpe", "nsga2", "random")
FAMILY_SAMPLERS = ("tpe", "random")  # samplers that can be rebuilt from a family's finished trials alone
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_S, GRACE_S = 5, 30


class SurplusTrial(Exception):
    """A worker lost the race for the study's last trial slot."""


def is_local(url: str) -> bool:
    return url.startswith("sqlite:")


def worker_seed(seed: int, url: str) -> int:
    """The sampler seed of this process: `seed` itself for a local study (reproducible); mixed
    with host and process id for a shared one, so workers given the same --seed do not all draw
    the same random startup points (a shared study's order is not reproducible anyway)."""
    if is_local(url):
        return seed
    import hashlib
    import os
    import socket

    digest = hashlib.sha256(f"{seed}:{socket.gethostname()}:{os.getpid()}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def make_sampler(name: str, seed: Optional[int], n_trials: int = 100) -> optuna.samplers.BaseSampler:
    """A constraint-aware sampler (CMA-ES and GP are left out: CMA-ES ignores constraints and
    categorical parameters, the space is mostly categorical)."""
    if name == "tpe":  # group: the joint space is define-by-run (a family, then only its parameters)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                              n_startup_trials=min(max(10, n_trials // 10), max(2, n_trials // 4)))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(4, n_trials // 4)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise CaitsearchError(f"--sampler must be one of {', '.join(SAMPLERS)}, not '{name}'.")


def redact(url: str) -> str:
    """A storage URL without its password, for files and messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def driver_url(url: str) -> str:
    """`postgresql://` names SQLAlchemy's default driver (psycopg 3 since SQLAlchemy 2.1); use
    psycopg2 where only that one is installed, so the URL users type just works."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """Open the RDB storage; retried because workers starting together on an empty database race
    to create Optuna's tables, and all but one fail once."""
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat
                if is_local(url):
                    return optuna.storages.RDBStorage(url)
                return optuna.storages.RDBStorage(driver_url(url), heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
        except ImportError as e:
            raise CaitsearchError(f"cannot open study storage {redact(url)}: no database driver for it is installed.") from e
        except Exception as e:  # bad URL, server down, a lost race to create the tables
            if attempt == attempts - 1:
                raise CaitsearchError(f"cannot open study storage {redact(url)}: {str(e).splitlines()[0][:200]}") from e
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def open_study(url: str, name: str, sampler: optuna.samplers.BaseSampler, identity: dict) -> tuple[optuna.Study, bool]:
    """Create or load the study, and say whether this process created it; `identity` (model, size,
    budget, space...) must match a stored one, because trials scored under another budget or space
    cannot be mixed in."""
    storage = _storage(url)
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, direction="minimize")
        created = True
    except optuna.exceptions.DuplicatedStudyError:  # resumed, or another worker was first
        study = optuna.load_study(storage=storage, study_name=name, sampler=sampler)
        created = False
    if study.user_attrs.get("identity") is None:
        study.set_user_attr("identity", json.loads(json.dumps(identity)))
    _same_identity(study, name, url, identity)
    return study, created


def check_identity(url: str, name: str, identity: dict) -> None:
    """Refuse, before a run writes anything, a stored study `name` started with another identity;
    creates nothing (a local database or a study that does not exist yet is fine)."""
    if is_local(url) and not Path(url.split(":///", 1)[-1]).is_file():
        return
    try:
        study = optuna.load_study(storage=_storage(url), study_name=name)
    except KeyError:  # no such study yet: the run creates it
        return
    _same_identity(study, name, url, identity)


def _same_identity(study: optuna.Study, name: str, url: str, identity: dict) -> None:
    stored, wanted = study.user_attrs.get("identity"), json.loads(json.dumps(identity))
    if stored is not None and stored != wanted:
        diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k)) \
            if isinstance(stored, dict) else ["identity"]
        raise CaitsearchError(
            f"study '{name}' in {redact(url)} was started with a different {', '.join(diff)}; "
            "use a new --study-name or --out folder.")


@contextlib.contextmanager
def exclusive(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock for the whole search (local SQLite studies only)."""
    path = Path(run_dir) / "study.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CaitsearchError(f"another caitsearch process is searching in {run_dir}; "
                                  "for several workers use --storage postgresql://...") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fail_orphans(study: optuna.Study) -> int:
    """Mark trials a killed process left RUNNING as failed (only safe when we hold the lock)."""
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in orphans:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(orphans)


def enqueue_warm_starts(study: optuna.Study, space: SearchSpace, configs: Sequence[CompressionConfig],
                        may_enqueue: bool = True) -> int:
    """Enqueue known-good schedules once per study (a resumed or second worker adds none).

    Two workers that open a shared study together both see no `warm_started` mark yet, and
    `skip_if_exists` does not guard concurrent callers: on shared storage only the worker that
    created the study enqueues (`may_enqueue`)."""
    if study.user_attrs.get("warm_started") or not may_enqueue:
        return 0
    for config in configs:  # skip_if_exists: a run killed half-way through enqueueing adds no twins
        study.enqueue_trial(space.params_of(config), user_attrs={"warm_start": True}, skip_if_exists=True)
    study.set_user_attr("warm_started", True)
    return len(configs)


def balance_families(study: optuna.Study, space: SearchSpace, n_trials: int, seed: int = 0,
                     sampler: str = "tpe") -> Optional[str]:
    """Before a trial of the joint space: enqueue the next trial of the family furthest below its
    share, every parameter drawn by a `sampler` that sees only that family's finished trials, as
    if the family were searched alone; return the family. Nothing while a trial already waits (warm
    starts run first) or in a space without families. The family's sampler is rebuilt from the
    storage every time, so resumed runs and the workers of a shared study need no state; workers
    that enqueue at the same moment can drift the shares by a trial or two. NSGA-II keeps its
    generations in the study it samples, so with it only the family is fixed and the study's own
    sampler draws the rest."""
    if not space.families:
        return None
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return None
    counts: dict[str, int] = {}
    for t in trials:
        if "mix" in t.params and not t.user_attrs.get("surplus"):
            counts[t.params["mix"]] = counts.get(t.params["mix"], 0) + 1
    family = space.next_family(counts)
    if sampler not in FAMILY_SAMPLERS:
        study.enqueue_trial({"mix": family})
        return family
    share = max(1, round(space.family_shares()[family] * n_trials))
    index = list(space.families).index(family)
    alone = optuna.create_study(direction="minimize", sampler=make_sampler(
        sampler, seed + 1_000_003 * (index + 1) + counts.get(family, 0), share))
    for t in trials:
        if t.state == TrialState.COMPLETE and t.params.get("mix") == family and t.value is not None:
            own = {k: v for k, v in t.params.items() if k != "mix"}
            alone.add_trial(optuna.trial.create_trial(
                params=own, distributions={k: t.distributions[k] for k in own}, value=t.value,
                constraints=dict(t.constraints) if t.constraints else None))
    params = space.suggest_family(alone.ask(), family)
    study.enqueue_trial({"mix": family, **params})
    return family


def count(study: optuna.Study, states: Sequence[TrialState] = FINISHED) -> int:
    return len(study.get_trials(deepcopy=False, states=tuple(states)))


def make_objective(space: SearchSpace, proxy: AccuracyProxy, predict_ms: Callable[[CompressionConfig], float],
                   budget_ms: float, n_trials: int) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        ahead = [t for t in trial.study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING, TrialState.WAITING))
                 if t.number < trial.number]
        if len(ahead) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number} is beyond the study's {n_trials} trials")
        config = space.suggest(trial)
        predicted = float(predict_ms(config))
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("predicted_ms", predicted)
        trial.set_constraint("latency", predicted - budget_ms)
        score = proxy.floor if predicted > budget_ms else proxy.score(config)
        for key, value in score.as_dict().items():
            trial.set_user_attr(key, value)
        return score.kl

    return objective


def _not_failed_trial(record: logging.LogRecord) -> bool:
    """Optuna logs every failed trial at WARNING with its traceback; here that is either Ctrl-C or
    an error the command reports itself in one line, or a `SurplusTrial`, which is expected."""
    return not record.getMessage().startswith("Trial ") or " failed with" not in record.getMessage()


@contextlib.contextmanager
def interrupt_between_trials():
    """Ctrl-C during a trial takes effect when the trial is stored, as KeyboardInterrupt: Optuna's
    own bookkeeping, interrupted midway, can fail with an unrelated error (UnboundLocalError on
    `updated_state` in optuna 4) instead of the interrupt. Trials take well under a second."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # SIGINT ignored or handled by someone else: leave it so
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def run_trials(study: optuna.Study, objective: Callable[[optuna.Trial], float], n_trials: int,
               on_trial: Optional[Callable[[int], None]] = None, deadline: Optional[float] = None,
               space: Optional[SearchSpace] = None, seed: int = 0, sampler: str = "tpe") -> int:
    """Run trials until the study holds `n_trials` finished ones (counting other workers' and
    earlier runs'), or `time.monotonic()` passes `deadline`; return how many this call finished.
    With the joint `space`, every trial is drawn by `balance_families` (its family's own
    `sampler`, seeded from `seed`)."""
    threads = torch.get_num_threads()  # some samplers (GP) drop torch to one thread
    done_here = 0
    optuna_log = logging.getLogger("optuna.study._optimize")  # where Optuna logs failed trials
    optuna_log.addFilter(_not_failed_trial)
    try:
        while count(study) + count(study, (TrialState.RUNNING,)) < n_trials and (
                deadline is None or time.monotonic() < deadline):
            before = count(study)
            if space is not None:
                balance_families(study, space, n_trials, seed, sampler)
            with interrupt_between_trials():
                study.optimize(objective, n_trials=1, catch=(SurplusTrial,), gc_after_trial=False)
            torch.set_num_threads(threads)
            done = count(study)
            done_here += max(0, done - before)
            if on_trial:
                on_trial(done)
    finally:
        torch.set_num_threads(threads)
        optuna_log.removeFilter(_not_failed_trial)
    return done_here


def feasible_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed trials predicted within budget, best proxy first, one per distinct config."""
    seen, best = set(), []
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.constraints and all(c <= 0 for c in t.constraints.values()) and "config" in t.user_attrs]
    for t in sorted(trials, key=lambda t: (t.value, t.user_attrs["predicted_ms"])):
        key = json.dumps(t.user_attrs["config"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            best.append(t)
    return best
