"""The whole `search` run as named stages, each taking and returning a small immutable record:

    prepare -> run_study -> remeasure_best -> retrain_best -> summarise

`prepare` resolves the model, profile, budget, space, data and teacher; `run_study` runs (or
resumes) the Optuna study under the latency constraint; `remeasure_best` times the best feasible
trials end to end against dense; `retrain_best` retrains (or just evaluates) the candidates within
budget; `summarise` writes the results tables and `summary.json`. The files are described in
`run_folder`.

Resuming: the same command continues the study from its storage, re-measures (cheap), and skips
candidates whose `result.json` exists; an interrupted retraining resumes from the trainer's own
checkpoints in the candidate folder.

Budgets: `--budget R` is R x the dense latency (the profile's dense prediction for the search, the
dense model timed in the same interleaved loop for the re-measurement); `--budget-ms` is absolute.
A candidate measured over budget is dropped from `candidates` (kept in results with
`within_budget = false`).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
import torch
from torch import nn

from ..compress import compress, materialize
from ..config import CompressionConfig
from ..console import Progress, log, say
from ..data import Splits, load_dataset
from ..device import backend_device, resolve_dtype
from ..errors import CaitsearchError
from ..io import save_weights, write_json
from ..measure import set_threads, steady_allocator
from ..models import DEFAULT_MODEL, ModelSpec, model_spec
from ..profile import LatencyProfile, find_profile
from ..space import SearchSpace
from ..training import DENSE_LR, MODEL_FILE, TrainOnce, evaluate, load_teacher, retrain_compressed
from . import study as st
from .proxy import AccuracyProxy, stack_images
from .remeasure import Measured, remeasure_until_within
from .request import Budget, SearchRequest
from .run_folder import RunFolder, trial_rows


@dataclass(frozen=True)
class Prepared:
    """Everything the later stages need, resolved once."""

    request: SearchRequest
    run: RunFolder
    spec: ModelSpec
    profile: LatencyProfile
    budget: Budget
    space: SearchSpace
    threads: int
    device: torch.device
    dtype: torch.dtype
    splits: Splits
    teacher: nn.Module
    proxy: AccuracyProxy


@dataclass(frozen=True)
class Studied:
    study: optuna.Study
    feasible: list  # completed trials predicted within budget, best proxy first, one per config


@dataclass(frozen=True)
class Remeasured:
    dense: dict  # {"latency_ms", "timing"} of the dense model in the last timing loop
    candidates: list[Measured]  # within budget first, then by proxy


@dataclass(frozen=True)
class Retrained:
    dense_accuracy: float
    rows: list[dict]  # one per re-measured candidate (results table)
    candidates: list[dict]  # within budget, with accuracy, best first


def run_search(req: SearchRequest) -> dict:
    """Run (or resume) one search and return the summary written to RUN/summary.json."""
    prepared = prepare(req)
    studied = run_study(prepared)
    remeasured = remeasure_best(prepared, studied)
    retrained = retrain_best(prepared, remeasured)
    return summarise(prepared, studied, remeasured, retrained)


# ---------------------------------------------------------------- prepare


def prepare(req: SearchRequest) -> Prepared:
    """Model, profile, budget, space (its corners echoed), run folder, data, teacher and proxy."""
    st.make_sampler(req.study.sampler, req.seed)  # refuse a bad name before any work
    threads = set_threads(req.measure.threads)
    steady_allocator()
    name = req.model or DEFAULT_MODEL
    spec = model_spec(name, img_size=req.img_size)
    prof = find_profile(spec, req.measure.profile, threads=req.measure.threads,
                        allow_foreign=req.measure.allow_foreign_profile, progress=req.progress)
    if req.measure.threads is None and prof.manifest.get("threads"):
        threads = set_threads(int(prof.manifest["threads"]))  # time candidates as the profile was timed
    budget = req.budget.resolve(prof.dense_ms)
    space = SearchSpace.for_strategy(spec, req.strategy)
    described = describe_space(space, prof)
    say_ = say if req.echo else (lambda message: None)
    for corner in ("min", "mid", "max"):
        c = described["corners"][corner]
        say_(f"space {corner}: {c['predicted_ms']:.3g} ms predicted ({c['predicted_ms'] / prof.dense_ms:.2f}x dense), "
             f"{c['mac_ratio']:.2f}x dense MACs")
    say_(f"budget: {budget.ms:.3g} ms per batch of {prof.manifest.get('batch_size')} ({budget.ratio:.2f}x dense)")
    fastest = described["corners"]["min"]["predicted_ms"]
    if budget.ms < fastest:
        raise CaitsearchError(
            f"budget {budget.ms:.3g} ms ({budget.ratio:.2f}x dense) is below the fastest config in the space "
            f"({fastest:.3g} ms predicted); raise the budget.")

    # every refusal (folder, device, data, checkpoint, another run's study) comes before the run
    # folder is created or its manifest written, so a refused run changes nothing
    run = RunFolder(req.out)
    run.check_reusable()
    device, dtype = backend_device(str(prof.manifest.get("backend", "torch-cpu"))), \
        resolve_dtype(str(prof.manifest.get("dtype", "fp32")))
    d = req.data
    splits = load_dataset(d.source, spec, seed=req.seed, calib_size=d.calib_size, proxy_size=d.proxy_size,
                          val_size=d.val_size, train_limit=d.train_limit, test_limit=d.test_limit)
    given = load_teacher(name, img_size=spec.img_size, num_classes=splits.num_classes, checkpoint=req.checkpoint,
                         data=splits.name) if req.checkpoint is not None else None
    st.check_identity(req.study.storage or run.sqlite_url(), req.study.name, study_identity(req, spec, prof, space, splits))
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_space(described)
    run.write_manifest(req.as_dict(), storage=st.redact(req.study.storage or run.sqlite_url()),
                       study_name=req.study.name, threads=threads, profile=prof.manifest)
    teacher = (given or load_teacher(name, img_size=spec.img_size, num_classes=splits.num_classes, data=splits.name,
                                     train=TrainOnce(splits, req.recipe.with_(lr=DENSE_LR), run.dense, req.progress))).model
    proxy = AccuracyProxy(teacher, stack_images(splits.proxy), stack_images(splits.calib))
    return Prepared(req, run, spec, prof, budget, space, threads, device, dtype, splits, teacher, proxy)


def describe_space(space: SearchSpace, prof: LatencyProfile) -> dict:
    """The space's choices and its corners' predicted latency and MACs (RUN/space.json)."""
    s = space.spec
    dense_macs = CompressionConfig.dense(s).macs(s)["total"]
    corners = {}
    for name, cfg in space.corners().items():
        macs = cfg.macs(s)["total"]
        corners[name] = {"predicted_ms": float(prof.predict(cfg)), "macs": macs, "mac_ratio": macs / dense_macs,
                         "config": cfg.to_dict()}
    return {"model": s.name, "img_size": list(s.img_size), "depth": s.depth, "axes": list(space.axes),
            "qk_choices": space.qk_choices, "v_choices": space.v_choices, "mlp_choices": space.mlp_choices,
            "token_counts": space.token_counts(), "corners": corners, "dense_predicted_ms": float(prof.dense_ms)}


def warm_starts(space: SearchSpace, predict_ms: Callable[[CompressionConfig], float], budget: Budget,
                limit: int) -> list[CompressionConfig]:
    """Uniform schedules predicted within budget, slowest (most capacity) first."""
    found = {}
    for cfg in space.uniform_schedules():
        ms = float(predict_ms(cfg))
        if ms <= budget.ms:
            found.setdefault(json.dumps(cfg.to_dict()), (ms, cfg))
    return [cfg for _, cfg in sorted(found.values(), key=lambda p: -p[0])][:limit]


# ---------------------------------------------------------------- study


def study_identity(req: SearchRequest, spec: ModelSpec, prof: LatencyProfile, space: SearchSpace, splits: Splits) -> dict:
    """What the user asked for, not derived floats: the same command always finds its own study."""
    return {"model": spec.name, "img_size": list(spec.img_size), "budget": req.budget.identity(),
            "profile": prof.manifest.get("table_sha256"),
            "space": {"qk": space.qk_choices, "mlp": space.mlp_choices, "axes": list(space.axes)},
            "data": splits.name, "calib_size": req.data.calib_size, "val_size": req.data.val_size,
            "proxy_size": len(splits.proxy), "seed": req.seed}


def run_study(p: Prepared) -> Studied:
    """Run the study up to its total trial count (resuming one that exists) and list the feasible trials."""
    req = p.request
    url = req.study.storage or p.run.sqlite_url()
    identity = study_identity(req, p.spec, p.profile, p.space, p.splits)
    sampler = st.make_sampler(req.study.sampler, st.worker_seed(req.seed, url), req.study.trials)
    study, created = st.open_study(url, req.study.name, sampler, identity)
    local = st.is_local(url)
    with st.exclusive(p.run.path) if local else contextlib.nullcontext():
        if local and (orphans := st.fail_orphans(study)):
            log(f"resuming: {orphans} trial(s) interrupted by a killed run marked failed and not counted")
        warm = warm_starts(p.space, p.profile.predict, p.budget, limit=max(1, min(4, req.study.trials // 4)))
        st.enqueue_warm_starts(study, p.space, warm, may_enqueue=created or local)
        with Progress(req.progress) as bar:
            task = bar.task("trials", total=req.study.trials, completed=min(req.study.trials, st.count(study)))
            st.run_trials(study, st.make_objective(p.space, p.proxy, p.profile.predict, p.budget.ms, req.study.trials),
                          req.study.trials, on_trial=lambda done: task.update(completed=min(done, req.study.trials)))
    p.run.write_trials(trial_rows(study))
    feasible = st.feasible_trials(study)
    if not feasible:
        raise CaitsearchError(f"no trial of study '{req.study.name}' is predicted within the budget; "
                              "run more --trials or raise the budget.")
    return Studied(study, feasible)


# ---------------------------------------------------------------- remeasure


def remeasure_best(p: Prepared, s: Studied) -> Remeasured:
    """Time the best feasible trials against dense on the profile's device and dtype."""
    req = p.request
    with Progress(req.progress) as bar:

        def on_round(n: int) -> Callable[[], None]:
            return bar.task(f"re-measuring {n} candidates", total=req.measure.repeats).advance

        dense_timing, measured = remeasure_until_within(
            p.teacher, s.feasible, p.spec, p.budget, p.profile.dense_ms, p.profile.manifest.get("batch_size", 32),
            p.device, p.dtype, p.proxy.stats_images, wanted=max(1, req.retrain_top), per_round=req.measure.remeasure,
            repeats=req.measure.repeats, on_round=on_round)
    p.teacher.to("cpu", torch.float32)
    measured.sort(key=lambda m: (not m.within_budget, m.proxy["kl"]))
    return Remeasured(dense_timing, measured)


# ---------------------------------------------------------------- retrain


def retrain_best(p: Prepared, m: Remeasured) -> Retrained:
    """Retrain the top `retrain_top` candidates within budget; evaluate the others as they are."""
    req = p.request
    dense_accuracy = float(evaluate(p.teacher, p.splits.test, batch_size=req.recipe.batch_size))
    rows, candidates = [], []
    for rank, c in enumerate(m.candidates):
        folder = p.run.candidate(c.trial)
        retrain = c.within_budget and rank < req.retrain_top
        result = finish_candidate(p, c, folder, retrain) if c.within_budget else None
        row = {"rank": rank, "trial": c.trial, "within_budget": c.within_budget,
               "retrained": bool(result and result["retrained"]), "accuracy": result["accuracy"] if result else None,
               "latency_ms": c.latency_ms, "predicted_latency_ms": c.predicted_ms,
               "speedup": c.timing["dense_ms"] / c.latency_ms, "proxy_kl": c.proxy["kl"],
               "proxy_agreement": c.proxy["agreement"], "macs": c.config.macs(p.spec)["total"],
               "config_path": str(folder / "config.json") if result else None}
        rows.append(row)
        if result:
            candidates.append({**{k: row[k] for k in ("accuracy", "latency_ms", "predicted_latency_ms", "speedup",
                                                      "retrained", "trial", "proxy_kl", "proxy_agreement")},
                               "timing": c.timing, "config": c.config.to_dict(), "path": str(folder)})
    candidates.sort(key=lambda c: (not c["retrained"], -c["accuracy"]))
    return Retrained(dense_accuracy, rows, candidates)


def finish_candidate(p: Prepared, c: Measured, folder: Path, retrain: bool) -> dict:
    """Retrain (or, beyond the top K, just evaluate) one candidate; finished ones are not redone."""
    req = p.request
    done = folder / "result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if result.get("retrained") or not retrain:
            return result
    c.config.save(folder / "config.json")
    if retrain:
        _, metrics = retrain_compressed(p.teacher, c.config, p.splits, req.recipe, folder, progress=req.progress)
        accuracy = float(metrics["accuracy"])  # the trainer's test accuracy of the materialised model
    else:
        model = materialize(compress(p.teacher, c.config, p.proxy.stats_images)).eval()
        accuracy = float(evaluate(model, p.splits.test, batch_size=req.recipe.batch_size))
        save_weights(model, folder / MODEL_FILE)
    result = {"accuracy": accuracy, "retrained": retrain, "trial": c.trial, "epochs": req.recipe.epochs if retrain else 0}
    write_json(done, result)
    return result


# ---------------------------------------------------------------- summarise


def summarise(p: Prepared, s: Studied, m: Remeasured, r: Retrained) -> dict:
    """Write results.parquet/.csv and summary.json; return the summary."""
    p.run.write_results(r.rows)
    summary = {
        "model": p.spec.name, "strategy": p.request.strategy, "data": p.splits.name, "device": str(p.device),
        "batch_size": p.profile.manifest.get("batch_size"), "dtype": p.profile.manifest.get("dtype"),
        "threads": p.threads, "budget": {"ratio": p.budget.ratio, "ms": p.budget.ms},
        "dense": {"accuracy": r.dense_accuracy, "latency_ms": m.dense["latency_ms"],
                  "predicted_latency_ms": float(p.profile.dense_ms), "timing": m.dense["timing"]},
        "trials": {"finished": st.count(s.study), "requested": p.request.study.trials,
                   "feasible": len(st.feasible_trials(s.study))},
        "candidates": r.candidates,
        "over_budget": [{"trial": c.trial, "latency_ms": c.latency_ms, "predicted_latency_ms": c.predicted_ms}
                        for c in m.candidates if not c.within_budget],
    }
    p.run.write_summary(summary)
    return summary
