"""The whole `search` run as named stages, each taking and returning a small immutable record:

    prepare -> run_study -> remeasure_best -> rank_finalists -> retrain_best -> summarise

`prepare` resolves the model, profile, budget, space, data and teacher; `run_study` runs (or
resumes) the Optuna study under the latency constraint, scoring trials with the untrained proxy;
`remeasure_best` times the finalists end to end against dense; `rank_finalists` gives those
within budget short fine-tunes and keeps the best by validation accuracy (successive halving,
`rank`); `retrain_best` retrains the best fully (cut to whole steps that fit `--minutes`) and
evaluates every candidate on the validation and test splits; `summarise` picks the candidate to
deploy by validation accuracy (test accuracy is reported, never used to choose) and writes the
results. The files are described in `run_folder`.

Resuming: the same command continues the study from its storage, reuses the recorded
re-measurement and rungs, and skips candidates whose `result.json` exists; an interrupted
fine-tune or retraining resumes from its own `state.pt`.

Budgets: `--budget R` is R x the dense latency (the profile's dense prediction for the search, the
dense model timed in the same interleaved loop for the re-measurement); `--budget-ms` is absolute.
A candidate measured over budget is dropped from `candidates` (kept in results with
`within_budget = false`).
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import optuna
import torch
from torch import nn

from ..config import CompressionConfig
from ..console import Progress, log, say
from ..data import Splits
from ..device import resolve_device
from ..errors import CaitsearchError
from ..io import save_weights, write_json
from ..measure import set_threads, steady_allocator
from ..models import DEFAULT_MODEL, ModelSpec, model_spec
from ..profile import LatencyProfile, find_profile
from ..profile.runtime import Runtime
from ..space import SearchSpace
from ..tasks import CLASSIFICATION, Task, get_task
from ..training import (
    DENSE_LR, MODEL_FILE, Retraining, TrainOnce, evaluate, load_teacher, pixel_baseline_accuracy,
)
from . import rank as rk
from . import study as st
from .proxy import AccuracyProxy, PixelProxy, make_proxy
from .remeasure import Measured, remeasure, remeasure_until_within
from .request import Budget, SearchRequest
from .run_folder import RunFolder, trial_rows

EVAL_RESERVE_S = 30.0  # kept back from --minutes for the final evaluations and files


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
    device: torch.device  # where the teacher, the proxy, retraining and evaluation run (--device)
    runtime: Runtime  # how candidates are timed: the profile's backend, dtype, threads, CUDA graphs
    splits: Splits
    teacher: nn.Module
    teacher_info: dict  # source, validation accuracy, warning
    proxy: AccuracyProxy | PixelProxy
    started: float = field(default_factory=time.monotonic)
    task: Task = CLASSIFICATION  # what the model does: its data, loss, metric (accuracy or mIoU)

    def seconds_left(self) -> Optional[float]:
        """What is left of `--minutes` (None: no limit)."""
        if not self.request.minutes:
            return None
        return self.request.minutes * 60 - (time.monotonic() - self.started)


@dataclass(frozen=True)
class Studied:
    study: optuna.Study
    feasible: list  # completed trials predicted within budget, best proxy first, one per config


@dataclass(frozen=True)
class Remeasured:
    dense: dict  # {"latency_ms", "timing"} of the dense model in the last timing loop
    candidates: list[Measured]  # within budget first, then by proxy


@dataclass(frozen=True)
class Ranked:
    order: list[int]  # trial numbers of the candidates within budget, best first
    results: list  # rank.RungResult per finalist (empty when nothing was ranked)
    steps: tuple[int, ...]  # cumulative steps of the rungs


@dataclass(frozen=True)
class Retrained:
    dense_accuracy: float
    rows: list[dict]  # one per re-measured candidate (results table)
    candidates: list[dict]  # within budget, with accuracies, chosen (by validation accuracy) first
    final: list[dict]  # how each full retraining was sized: steps, full steps, what cut it


def run_search(req: SearchRequest) -> dict:
    """Run (or resume) one search and return the summary written to RUN/summary.json."""
    prepared = prepare(req)
    studied = run_study(prepared)
    remeasured = remeasure_best(prepared, studied)
    ranked = rank_finalists(prepared, remeasured)
    retrained = retrain_best(prepared, remeasured, ranked)
    return summarise(prepared, studied, remeasured, ranked, retrained)


# ---------------------------------------------------------------- prepare


def prepare(req: SearchRequest) -> Prepared:
    """Model, profile, budget, space (its corners echoed), run folder, data, teacher and proxy."""
    started = time.monotonic()
    task = get_task(req.task)  # refuse a bad name before any work
    st.make_sampler(req.study.sampler, req.seed)
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
    problem = prof.refuses(space)
    if problem:
        raise CaitsearchError(f"{problem}; build a profile of this space with `caitsearch profile --model {spec.name}`.")
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
    runtime = Runtime.of_profile(prof.manifest, threads=threads if prof.manifest.get("backend") == "torch-cpu" else None)
    profile_device = runtime.device  # refuses a GPU profile where no GPU is visible, before any work
    device = resolve_device(req.device) if req.device else profile_device
    d = req.data
    splits = task.load_splits(d.source, spec, seed=req.seed, calib_size=d.calib_size, proxy_size=d.proxy_size,
                              val_size=d.val_size, train_limit=d.train_limit, test_limit=d.test_limit)
    given = load_teacher(name, img_size=spec.img_size, num_classes=splits.num_classes, checkpoint=req.checkpoint,
                         data=splits.name, task=task) if req.checkpoint is not None else None
    st.check_identity(req.study.storage or run.sqlite_url(), req.study.name,
                      study_identity(req, spec, prof, space, splits, task))
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_space(described)
    run.write_manifest(req.as_dict(), storage=st.redact(req.study.storage or run.sqlite_url()),
                       study_name=req.study.name, threads=threads, profile=prof.manifest)
    teacher = given or load_teacher(name, img_size=spec.img_size, num_classes=splits.num_classes, data=splits.name,
                                    train=TrainOnce(splits, req.recipe.with_(lr=DENSE_LR), run.dense, req.progress,
                                                    device), task=task)
    teacher.model.to(device)
    info = teacher_check(teacher.model, teacher.source, splits, req.recipe.batch_size, task)
    if info.get("warning"):
        log(f"warning: {info['warning']}")
    proxy = make_proxy(task, teacher.model, splits)
    return Prepared(req, run, spec, prof, budget, space, threads, device, runtime, splits, teacher.model, info, proxy,
                    started, task)


def teacher_check(teacher: nn.Module, source: str, splits: Splits, batch_size: int,
                  task: Task = CLASSIFICATION) -> dict:
    """The teacher's validation score (accuracy, or mIoU), and a warning when it is too weak to be
    worth compressing: near chance on the validation split, or (classification) clearly below a
    linear classifier on the raw pixels, which is what the data allows without learning features."""
    val = float(evaluate(teacher, splits.val, batch_size=max(batch_size, 256), task=task)) if len(splits.val) else None
    info = {"source": source, "val_accuracy": val, "val_images": len(splits.val)}
    if val is None:
        return info
    chance = 1.0 / splits.num_classes
    advice = "train it longer (caitsearch train --epochs ...) or start from --pretrained weights."
    if val < min(0.95, 2 * chance):
        info["warning"] = (f"the dense teacher is near chance on the validation split ({val:.1%} {task.metric_label} with "
                           f"{splits.num_classes} classes, chance {chance:.1%}): compressing it is meaningless; {advice}")
    elif task is CLASSIFICATION and len(splits.train):
        floor = pixel_baseline_accuracy(splits.train, splits.val, splits.num_classes)
        info["pixel_baseline_val_accuracy"] = floor
        noise = 2 * (floor * (1 - floor) / len(splits.val)) ** 0.5  # two standard errors of the floor's estimate
        if val < floor - noise:
            info["warning"] = (f"the dense teacher is below what the data allows: {val:.1%} on the validation split, "
                               f"where a linear classifier on the raw pixels reaches {floor:.1%}; compressing it is "
                               f"meaningless; {advice}")
    return info


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
            "families": list(space.families), "merge_choices": space.merge_choices(),
            "qk_choices": space.qk_choices, "v_choices": space.v_choices, "mlp_choices": space.mlp_choices,
            "token_counts": space.token_counts(), "corners": corners, "dense_predicted_ms": float(prof.dense_ms)}


def warm_starts(space: SearchSpace, predict_ms: Callable[[CompressionConfig], float], budget: Budget) -> list[CompressionConfig]:
    """The best uniform schedule of every family predicted within budget (pure pruning, pure
    merging, joint: each the slowest, most capacity, that fits), then the space's other uniform
    schedules that fit, slowest first: the study starts from every family's best simple answer."""
    scored = sorted(((float(predict_ms(c)), c) for c in space.uniform_schedules(fine=True)), key=lambda p: -p[0])
    fits = [c for ms, c in scored if ms <= budget.ms]
    best = [next((c for c in fits if space.family_of(c) == family), None) for family in space.families]
    chosen: dict[str, CompressionConfig] = {}
    for cfg in [c for c in best if c is not None] + fits:
        chosen.setdefault(json.dumps(cfg.to_dict()), cfg)
    return list(chosen.values())[: len(space.families) + 3]


# ---------------------------------------------------------------- study


def study_identity(req: SearchRequest, spec: ModelSpec, prof: LatencyProfile, space: SearchSpace, splits: Splits,
                   task: Task = CLASSIFICATION) -> dict:
    """What the user asked for, not derived floats: the same command always finds its own study."""
    identity = {"model": spec.name, "img_size": list(spec.img_size), "budget": req.budget.identity(),
                "profile": prof.manifest.get("table_sha256"),
                "space": {"qk": space.qk_choices, "mlp": space.mlp_choices, "merge": space.merge_choices(),
                          "families": list(space.families)},
                **({"family_params": "scoped"} if space.families else {}),  # prune/b0_qk: older joint studies do not resume
                "data": splits.name, "calib_size": req.data.calib_size, "val_size": req.data.val_size,
                "proxy_size": len(splits.proxy), "seed": req.seed}
    if task is not CLASSIFICATION:  # classification studies keep the identity they were created with
        identity["task"] = task.name
    return identity


def run_study(p: Prepared) -> Studied:
    """Run the study up to its total trial count (resuming one that exists) and list the feasible trials."""
    req = p.request
    trials = req.study.trials or p.space.default_trials()
    url = req.study.storage or p.run.sqlite_url()
    identity = study_identity(req, p.spec, p.profile, p.space, p.splits, p.task)
    sampler = st.make_sampler(req.study.sampler, st.worker_seed(req.seed, url), trials)
    study, created = st.open_study(url, req.study.name, sampler, identity)
    local = st.is_local(url)
    deadline = None if req.study.minutes is None else time.monotonic() + 60 * req.study.minutes
    with st.exclusive(p.run.path) if local else contextlib.nullcontext():
        if local and (orphans := st.fail_orphans(study)):
            log(f"resuming: {orphans} trial(s) interrupted by a killed run marked failed and not counted")
        st.enqueue_warm_starts(study, p.space, warm_starts(p.space, p.profile.predict, p.budget),
                               may_enqueue=created or local)
        with Progress(req.progress) as bar:
            task = bar.task("trials", total=trials, completed=min(trials, st.count(study)))
            st.run_trials(study, st.make_objective(p.space, p.proxy, p.profile.predict, p.budget.ms, trials), trials,
                          on_trial=lambda done: task.update(completed=min(done, trials)), deadline=deadline,
                          space=p.space, seed=st.worker_seed(req.seed, url), sampler=req.study.sampler)
    p.run.write_trials(trial_rows(study))
    feasible = st.feasible_trials(study)
    if not feasible:
        raise CaitsearchError(f"no trial of study '{req.study.name}' is predicted within the budget; "
                              "run more --trials or raise the budget.")
    return Studied(study, feasible)


# ---------------------------------------------------------------- remeasure


def remeasure_best(p: Prepared, s: Studied) -> Remeasured:
    """Time the finalists against dense on the profile's runtime (backend, dtype, threads, CUDA
    graphs; recorded, so a resumed run keeps the same finalists); if too few stay within budget,
    the next best in a later round."""
    req = p.request
    recorded = _read_remeasured(p.run, s.feasible)
    if recorded is not None:
        return recorded
    wanted = max(req.rank.finalists, req.retrain_top, 1)
    finalists = rk.pick_finalists(s.feasible, p.spec, wanted)
    queue = finalists + [t for t in s.feasible if t not in finalists]
    with Progress(req.progress) as bar:

        def on_round(n: int) -> Callable[[], None]:
            return bar.task(f"re-measuring {n} candidates", total=req.measure.repeats).advance

        def measure(batch: list):
            return remeasure(p.teacher, batch, p.spec, p.budget, p.runtime, p.proxy.stats_images,
                             repeats=req.measure.repeats, progress=on_round(len(batch)), task=p.task)

        dense_timing, measured = remeasure_until_within(measure, queue, p.spec, p.budget, p.profile.dense_ms,
                                                        wanted=wanted, per_round=max(wanted, req.measure.remeasure))
    measured.sort(key=lambda m: (not m.within_budget, m.proxy["kl"]))
    write_json(p.run.remeasured, {"dense": dense_timing, "candidates": [m.to_dict() for m in measured]})
    return Remeasured(dense_timing, measured)


def _read_remeasured(run: RunFolder, feasible: list) -> Optional[Remeasured]:
    data = run.read_remeasured()
    if data is None:
        return None
    numbers = {t.number for t in feasible}
    measured = [Measured.from_dict(c) for c in data["candidates"]]
    if not all(m.trial in numbers for m in measured):
        return None  # a different study: measure again
    return Remeasured(data["dense"], measured)


# ---------------------------------------------------------------- rank


def rank_finalists(p: Prepared, m: Remeasured) -> Ranked:
    """Short fine-tunes of the candidates within budget, halved by validation accuracy at every
    rung (`rank`); without anything to retrain, or fewer than two candidates, the proxy order stands."""
    req = p.request
    # the re-measured candidates are in proxy order: take them in rounds over the kinds again
    within = rk.pick_finalists([c for c in m.candidates if c.within_budget], p.spec,
                               max(req.rank.finalists, req.retrain_top), config_of=lambda c: c.config)
    proxy_order = [c.trial for c in within]
    if req.retrain_top == 0 or req.rank.finalists < 2 or len(within) < 2:
        return Ranked(proxy_order + [c.trial for c in m.candidates if c.within_budget and c.trial not in proxy_order],
                      [], ())
    steps = rk.rung_steps(req.rank.tune_steps, rk.rungs_for(len(within), req.rank.eta))
    recipe = req.recipe.with_(steps=steps[-1], save_every=max(steps[-1], 1))
    by_trial = {c.trial: c for c in within}
    runs: dict[int, Retraining] = {}

    def tune(trial: int, until: int) -> tuple[float, Optional[float]]:
        if trial not in runs:
            folder = rk.tune_folder(p.run.candidate(trial))
            runs[trial] = Retraining(p.teacher, by_trial[trial].config, p.splits, recipe, folder, device=p.device,
                                     anneal_steps=int(recipe.anneal * steps[0]), task=p.task)
        stats = runs[trial].run(until=until, progress=False)
        return runs[trial].score(p.splits.val), stats.get("step_seconds")

    study = rk.rank_study(p.run.ranking_url(), req.study.name, steps, req.rank.eta)
    with Progress(req.progress) as bar:
        task = bar.task("short fine-tunes", total=sum(len(within) // req.rank.eta ** r for r in range(len(steps))))

        def on_rung(rung: int, alive: int) -> None:
            task.update(description=f"short fine-tunes, rung {rung + 1}/{len(steps)} ({alive} candidates, "
                                    f"{steps[rung]} steps)")

        def counted(trial: int, until: int):
            result = tune(trial, until)
            task.advance()
            return result

        results = rk.run_halving(study, proxy_order, steps, counted, on_rung=on_rung)
    families = {c.trial: p.space.family_of(c.config) for c in within}
    p.run.write_ranking(rk.ranking_rows(results, {c.trial: c.proxy["kl"] for c in within}, families, steps))
    order = [r.trial for r in results]
    return Ranked(order + [c.trial for c in m.candidates if c.within_budget and c.trial not in order], results, steps)


# ---------------------------------------------------------------- retrain


def retrain_best(p: Prepared, m: Remeasured, r: Ranked) -> Retrained:
    """Fully retrain the `retrain_top` best of the ranking (each cut to whole steps that fit what
    is left of `--minutes`), evaluate the rest untrained, everything on validation and test."""
    req = p.request
    batch = max(req.recipe.batch_size, 256)
    dense_accuracy = float(evaluate(p.teacher, p.splits.test, batch_size=batch, task=p.task))
    rank_of = {trial: i for i, trial in enumerate(r.order)}
    step_seconds = {res.trial: res.step_seconds for res in r.results}
    ordered = sorted(m.candidates, key=lambda c: rank_of.get(c.trial, len(rank_of)))
    retrain = {c.trial for c in ordered if c.within_budget and rank_of.get(c.trial, len(rank_of)) < req.retrain_top}
    results, final = {}, []
    # the untrained ones are evaluated first, so the retrainings are sized to the time really left
    for c in sorted((c for c in ordered if c.within_budget), key=lambda c: c.trial in retrain):
        folder = p.run.candidate(c.trial)
        plan = plan_retraining(p, c, folder, step_seconds.get(c.trial)) if c.trial in retrain else None
        results[c.trial] = finish_candidate(p, c, folder, plan)
        if plan:
            final.append({"trial": c.trial, **plan})
    rows, candidates = [], []
    for c in ordered:
        folder, result = p.run.candidate(c.trial), results.get(c.trial)
        row = {"rank": rank_of.get(c.trial), "trial": c.trial, "family": p.space.family_of(c.config),
               "within_budget": c.within_budget, "retrained": bool(result and result["retrained"]),
               "val_accuracy": result["val_accuracy"] if result else None,
               "accuracy": result["accuracy"] if result else None, "latency_ms": c.latency_ms,
               "predicted_latency_ms": c.predicted_ms, "speedup": c.timing["dense_ms"] / c.latency_ms,
               "proxy_kl": c.proxy["kl"], "proxy_agreement": c.proxy["agreement"],
               "macs": c.config.macs(p.spec)["total"], "merge_share": rk.merge_share(c.config, p.spec),
               "config_path": str(folder / "config.json") if result else None}
        rows.append(row)
        if result:
            candidates.append({**{k: row[k] for k in ("val_accuracy", "accuracy", "latency_ms", "predicted_latency_ms",
                                                      "speedup", "retrained", "trial", "family", "merge_share",
                                                      "proxy_kl", "proxy_agreement", "rank")},
                               "steps": result.get("steps"), "timing": c.timing, "config": c.config.to_dict(),
                               "path": str(folder)})
    candidates.sort(key=lambda c: (not c["retrained"], -c["val_accuracy"], c["latency_ms"]))
    return Retrained(dense_accuracy, rows, candidates, final)


def plan_retraining(p: Prepared, c: Measured, folder: Path, step_seconds: Optional[float]) -> dict:
    """How long the full retraining of `c` runs: the recipe's epochs, cut to whole steps that fit
    what is left of `--minutes`. Recorded in the candidate folder, so a resumed run keeps it."""
    path = folder / "plan.json"
    if path.is_file():
        return json.loads(path.read_text())
    req = p.request
    full = _full_steps(p)
    plan = {"steps": full, "full_steps": full, "epochs": req.recipe.epochs, "limited_by": None,
            "step_seconds": step_seconds}
    left = p.seconds_left()
    if left is not None:
        if step_seconds is None:
            step_seconds = _probe_step_seconds(p, c, folder)
            plan["step_seconds"] = step_seconds
        fits = int(max(0.0, left - EVAL_RESERVE_S) / step_seconds)
        if fits < full:
            plan.update(steps=max(1, fits), limited_by=f"--minutes {req.minutes:g}")
            log(f"final retraining of trial {c.trial}: {plan['steps']} of {full} steps "
                f"({plan['steps'] / full * req.recipe.epochs:.2f} of {req.recipe.epochs} epochs, "
                f"{step_seconds:.2f} s per step) to fit --minutes {req.minutes:g}; --minutes 0 runs the full recipe")
    write_json(path, plan)
    return plan


def _full_steps(p: Prepared) -> int:
    from ..training.loop import total_steps

    return total_steps(p.request.recipe, len(p.splits.train))


def _probe_step_seconds(p: Prepared, c: Measured, folder: Path, steps: int = 6) -> float:
    """Seconds per retraining step of `c`, from a few throwaway steps (no short fine-tune timed it)."""
    probe = Retraining(p.teacher, c.config, p.splits, p.request.recipe.with_(steps=steps, save_every=steps),
                       folder / "probe", device=p.device, anneal_steps=steps, task=p.task)
    return float(probe.run(progress=False)["step_seconds"])


def finish_candidate(p: Prepared, c: Measured, folder: Path, plan: Optional[dict]) -> dict:
    """Retrain `c` as `plan` says (or, without a plan, evaluate it untrained); finished ones are not redone."""
    req = p.request
    done = folder / "result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if result.get("retrained") or plan is None:
            return result
    c.config.save(folder / "config.json")
    if plan is not None:
        recipe = req.recipe if plan["steps"] == plan["full_steps"] else req.recipe.with_(steps=plan["steps"])
        run = Retraining(p.teacher, c.config, p.splits, recipe, folder, device=p.device, task=p.task)
        run.run(progress=req.progress)
        _, metrics = run.finish()
        result = {"accuracy": float(metrics["accuracy"]), "val_accuracy": float(metrics["val_accuracy"]),
                  "steps": metrics["steps"], "seconds": metrics["seconds"]}
    else:
        model = p.task.materialize(p.task.student(p.teacher, c.config, p.proxy.stats_images)).eval()
        batch = max(req.recipe.batch_size, 256)
        result = {"accuracy": float(evaluate(model, p.splits.test, batch_size=batch, task=p.task)),
                  "val_accuracy": float(evaluate(model, p.splits.val, batch_size=batch, task=p.task)), "steps": 0}
        save_weights(model, folder / MODEL_FILE)
    result.update(retrained=plan is not None, trial=c.trial, epochs=req.recipe.epochs if plan else 0)
    write_json(done, result)
    return result


# ---------------------------------------------------------------- summarise


def summarise(p: Prepared, s: Studied, m: Remeasured, r: Ranked, t: Retrained) -> dict:
    """Write results.parquet/.csv and summary.json; return the summary. The first candidate is
    the one to deploy: the best validation accuracy among those retrained and within budget."""
    p.run.write_results(t.rows)
    steps = list(r.steps)
    summary = {
        "model": p.spec.name, "strategy": p.request.strategy, "task": p.task.name, "metric": p.task.metric,
        "data": p.splits.name,
        "device": str(p.runtime.device), "train_device": str(p.device),
        "batch_size": p.profile.manifest.get("batch_size"), "dtype": p.profile.manifest.get("dtype"),
        "threads": p.threads, "runtime": p.runtime.as_dict(), "budget": {"ratio": p.budget.ratio, "ms": p.budget.ms},
        "selection": "val_accuracy",
        "dense": {"accuracy": t.dense_accuracy, "val_accuracy": p.teacher_info.get("val_accuracy"),
                  "latency_ms": m.dense["latency_ms"], "predicted_latency_ms": float(p.profile.dense_ms),
                  "timing": m.dense["timing"]},
        "teacher": p.teacher_info,
        "trials": {"finished": st.count(s.study), "requested": p.request.study.trials or p.space.default_trials(),
                   "feasible": len(st.feasible_trials(s.study))},
        "ranking": {"finalists": len(r.results), "rung_steps": steps,
                    "candidates": [{"trial": x.trial, "val_at": {str(k): v for k, v in x.scores.items()},
                                    "survived": x.survived} for x in r.results]},
        "final_retraining": t.final,
        "candidates": t.candidates,
        "over_budget": [{"trial": c.trial, "latency_ms": c.latency_ms, "predicted_latency_ms": c.predicted_ms}
                        for c in m.candidates if not c.within_budget],
        "wall_seconds": round(time.monotonic() - p.started, 1),
    }
    p.run.write_summary(summary)
    return summary

