"""The whole `search` run: budget -> space check -> study -> re-measure -> retrain -> results.

Run folder (every file written atomically; a later `report` command reads it)::

    RUN/manifest.json      the exact command, versions, device, threads, storage (no password)
    RUN/space.json         the search space: choices, and min/mid/max predicted latency and MACs
    RUN/study.db           Optuna SQLite storage (absent with --storage URL); RUN/study.lock
    RUN/trials.parquet     every trial: number, state, proxy (kl, agreement), predicted_ms, config JSON
    RUN/dense/             dense weights when this run had to train them (model.safetensors)
    RUN/candidates/trial-<n>/  one per re-measured candidate within budget (n = Optuna trial
                           number, stable across resumes): config.json, model.safetensors
                           (materialised; retrained for the top K), result.json (accuracy,
                           retrained; written last, so its presence means done) and, when
                           retrained, the trainer's metrics.json and state.pt
    RUN/results.parquet    one row per re-measured candidate (same as results.csv)
    RUN/results.csv
    RUN/summary.json       {"budget": {"ratio", "ms"}, "dense": {"accuracy", "latency_ms"},
                            "candidates": [{"accuracy", "latency_ms", "predicted_latency_ms",
                            "speedup", "config", ...}, ...] best first, all measured within budget}

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
import hashlib
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..compress import compress, materialize
from ..config import CompressionConfig
from ..errors import CaitsearchError
from ..io import atomic_write, atomic_write_text
from ..measure import measure_interleaved
from ..models import ModelSpec
from ..space import SearchSpace
from . import study as st
from .proxy import AccuracyProxy, stack_images


@dataclass(frozen=True)
class Budget:
    ratio: float  # of the dense latency
    ms: float  # per batch, at the profile's batch size

    @classmethod
    def resolve(cls, ratio: Optional[float], ms: Optional[float], dense_ms: float) -> "Budget":
        if (ratio is None) == (ms is None):
            raise CaitsearchError("give exactly one of --budget (a fraction of dense latency) or --budget-ms.")
        if ratio is not None:
            if not ratio > 0:
                raise CaitsearchError(f"--budget must be a positive fraction of the dense latency, not {ratio:g}.")
            return cls(ratio=ratio, ms=ratio * dense_ms)
        if not ms > 0:
            raise CaitsearchError(f"--budget-ms must be a positive number of milliseconds, not {ms:g}.")
        return cls(ratio=ms / dense_ms, ms=ms)

    def admits(self, latency_ms: float, dense_ms: float) -> bool:
        """Within budget, judged against a dense latency from the same measurement."""
        return latency_ms <= self.ratio * dense_ms


def corner_configs(space: SearchSpace) -> dict[str, CompressionConfig]:
    """The fastest, a middle and the slowest (dense) point of the space."""
    s = space.spec

    def point(width_at: float, merge: float) -> CompressionConfig:
        params = {}
        for i in range(s.depth):
            params[f"b{i}_axis"] = space.axes[1 + i % (len(space.axes) - 1)] if len(space.axes) > 1 else "none"
            params[f"b{i}_merge"] = merge
            for key, choices in (("qk", space.qk_choices), ("v", space.v_choices), ("mlp", space.mlp_choices)):
                params[f"b{i}_{key}"] = choices[round(width_at * (len(choices) - 1))]
        return space.config_from_params(params)

    return {"min": point(0.0, 0.5), "mid": point(0.5, 0.25), "max": point(1.0, 0.0)}


def describe_space(space: SearchSpace, predict_ms: Callable[[CompressionConfig], float]) -> dict:
    s = space.spec
    dense_macs = CompressionConfig.dense(s).macs(s)["total"]
    corners = {}
    for name, cfg in corner_configs(space).items():
        macs = cfg.macs(s)["total"]
        corners[name] = {"predicted_ms": float(predict_ms(cfg)), "macs": macs, "mac_ratio": macs / dense_macs,
                         "config": cfg.to_dict()}
    return {"model": s.name, "img_size": list(s.img_size), "depth": s.depth, "axes": list(space.axes),
            "qk_choices": space.qk_choices, "v_choices": space.v_choices, "mlp_choices": space.mlp_choices,
            "token_counts": space.token_counts(), "corners": corners}


def check_reachable(budget: Budget, described: dict) -> None:
    fastest = described["corners"]["min"]["predicted_ms"]
    if budget.ms < fastest:
        raise CaitsearchError(
            f"budget {budget.ms:.3g} ms ({budget.ratio:.2f}x dense) is below the fastest config in the space "
            f"({fastest:.3g} ms predicted); raise the budget.")


def warm_starts(space: SearchSpace, predict_ms: Callable[[CompressionConfig], float], budget: Budget,
                limit: int) -> list[CompressionConfig]:
    """Uniform schedules predicted within budget, slowest (most capacity) first."""
    found = {}
    for cfg in space.uniform_schedules():
        ms = float(predict_ms(cfg))
        if ms <= budget.ms:
            found.setdefault(json.dumps(cfg.to_dict()), (ms, cfg))
    return [cfg for _, cfg in sorted(found.values(), key=lambda p: -p[0])][:limit]


@dataclass
class Measured:
    trial: int
    config: CompressionConfig
    proxy: dict
    predicted_ms: float
    latency_ms: float
    within_budget: bool
    timing: dict = field(default_factory=dict)


def remeasure(dense: nn.Module, trials: list, spec: ModelSpec, budget: Budget, batch_size: int,
              device: torch.device, dtype: torch.dtype, calib: torch.Tensor, repeats: int = 15,
              progress: Optional[Callable[[], None]] = None) -> tuple[dict, list[Measured]]:
    """Time the dense model and the materialised candidates in one interleaved loop on this device."""
    models = {"dense": dense.to(device, dtype).eval()}
    for t in trials:
        cfg = CompressionConfig.from_dict(t.user_attrs["config"])
        models[f"trial{t.number}"] = materialize(compress(dense, cfg, calib)).to(device, dtype).eval()
    x = torch.randn(batch_size, spec.in_chans, *spec.img_size, device=device, dtype=dtype)
    timings = measure_interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, repeats=repeats,
                                  warmup=2, device=device, progress=progress)
    dense_ms = timings["dense"].median
    out = []
    for t in trials:
        ms = timings[f"trial{t.number}"].median
        out.append(Measured(trial=t.number, config=CompressionConfig.from_dict(t.user_attrs["config"]),
                            proxy={"kl": t.value, "agreement": t.user_attrs.get("agreement")},
                            predicted_ms=t.user_attrs["predicted_ms"], latency_ms=ms,
                            within_budget=budget.admits(ms, dense_ms), timing=timings[f"trial{t.number}"].summary()))
    return {"latency_ms": dense_ms, "timing": timings["dense"].summary()}, out


def remeasure_until_within(dense, feasible: list, spec: ModelSpec, budget: Budget, prof, device, dtype,
                           stats_images: torch.Tensor, req: "SearchRequest", rounds: int = 3,
                           on_round=None, advance=None) -> tuple[dict, list[Measured]]:
    """Re-measure the best feasible trials; if fewer than --retrain-top (at least one) stay within
    budget on this device, correct the predictions by the measured/predicted ratio seen so far and
    try the next best trials that still fit, up to `rounds` times."""
    wanted, measured, dense_timing, correction = max(1, req.retrain_top), [], None, 1.0
    queue = list(feasible)
    for _ in range(rounds):
        batch = [t for t in queue
                 if correction * t.user_attrs["predicted_ms"] / prof.dense_ms <= budget.ratio][: req.remeasure]
        if not batch:
            break
        queue = [t for t in queue if t not in batch]
        task = on_round(len(batch)) if on_round else None
        dense_timing, got = remeasure(dense, batch, spec, budget, prof.manifest.get("batch_size", 32), device, dtype,
                                      stats_images, repeats=req.repeats,
                                      progress=(lambda: advance(task)) if advance else None)
        for m in got:  # ratios against the dense model of the same loop, so rounds compare
            m.timing["dense_ms"] = dense_timing["latency_ms"]
        measured += got
        if sum(m.within_budget for m in measured) >= wanted:
            break
        ratios = sorted((m.latency_ms / m.timing["dense_ms"]) / (m.predicted_ms / prof.dense_ms) for m in measured)
        correction = max(correction, ratios[len(ratios) // 2])
    return dense_timing, measured


def save_state(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=float) + "\n")


def write_table(run_dir: Path, name: str, rows: list[dict], csv: bool = True) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    atomic_write(run_dir / f"{name}.parquet", lambda tmp: frame.to_parquet(tmp, index=False))
    if csv:
        atomic_write(run_dir / f"{name}.csv", lambda tmp: frame.to_csv(tmp, index=False))


def trial_rows(study) -> list[dict]:
    return [{
        "number": t.number, "state": t.state.name, "kl": t.value,
        "agreement": t.user_attrs.get("agreement"), "predicted_ms": t.user_attrs.get("predicted_ms"),
        "feasible": bool(t.constraints) and all(c <= 0 for c in t.constraints.values()),
        "warm_start": bool(t.user_attrs.get("warm_start")),
        "config": json.dumps(t.user_attrs["config"]) if "config" in t.user_attrs else None,
    } for t in study.get_trials(deepcopy=False)]


def manifest(extra: dict) -> dict:
    import optuna
    import timm

    return {"command": [Path(sys.argv[0]).name, *sys.argv[1:]], "cwd": os.getcwd(), "python": platform.python_version(),
            "torch": torch.__version__, "timm": timm.__version__, "optuna": optuna.__version__,
            "host": platform.node(), "platform": platform.platform(), "torch_threads": torch.get_num_threads(), **extra}


@dataclass
class SearchRequest:
    """Everything one `caitsearch search` run needs; the CLI fills it from its options."""

    out: Path
    strategy: str = "cait"  # cait, atme, cdcp or tome (space.STRATEGIES)
    budget: Optional[float] = None
    budget_ms: Optional[float] = None
    model: Optional[str] = None
    img_size: Optional[tuple[int, int]] = None
    checkpoint: Optional[Path] = None
    data: str = "fashion-mnist"
    profile: Optional[Path] = None
    trials: int = 40
    sampler: str = "tpe"
    seed: int = 0
    storage: Optional[str] = None
    study_name: str = "search"
    retrain_top: int = 1
    epochs: int = 6  # retraining epochs: 3 left the 0.6 main job 0.89 points below the 90.12% teacher, 6 within 0.34
    batch_size: int = 128
    calib_size: int = 1000
    proxy_size: int = 512
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    remeasure: int = 4
    repeats: int = 15
    threads: Optional[int] = None
    allow_foreign_profile: bool = False
    progress: bool = True  # bars on stderr
    echo: bool = True  # the space and budget lines on stdout (off for --json)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..cli.app import console

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not enabled, transient=False)


def _log(message: str) -> None:
    from ..cli.app import console

    console.print(message, highlight=False, soft_wrap=True)


def _say(message: str) -> None:
    from ..cli.app import out

    out.print(message, highlight=False, soft_wrap=True)


def load_profile(req: SearchRequest, spec: ModelSpec, model_name: str):
    return find_profile(spec, req.profile, threads=req.threads, allow_foreign=req.allow_foreign_profile,
                        progress=req.progress)


def find_profile(spec: ModelSpec, profile: Optional[Path] = None, threads: Optional[int] = None,
                 allow_foreign: bool = False, progress: bool = True, quick: bool = False):
    """The latency profile: the given one, else this machine's CPU profile of the model, built if
    missing. A default profile measured elsewhere (the committed ones, on another machine kind) is
    not used: this machine gets its own folder beside it, named by its fingerprint, profiled once.
    `quick` applies only to a profile built here from nothing."""
    from ..profile import build_profile, default_profile_path
    from ..profile.build import MANIFEST, read_manifest
    from ..profile.fingerprint import differences, fingerprint

    if profile is not None:
        if not Path(profile).exists():
            raise CaitsearchError(f"profile {profile} does not exist; build one with `caitsearch profile`.")
        return _loaded(Path(profile), spec, allow_foreign)
    path = default_profile_path(spec.name, spec.img_size, "torch-cpu", 32, "fp32")
    if (path / MANIFEST).is_file():
        if allow_foreign:
            return _loaded(path, spec, allow_foreign)
        manifest = read_manifest(path)
        here = fingerprint("torch-cpu", manifest.get("threads"))
        if differences(manifest.get("fingerprint", {}), here):
            tag = hashlib.sha1(json.dumps(here, sort_keys=True).encode()).hexdigest()[:8]
            _log(f"{path} was measured on another machine; using this machine's own profile {path.name}-{tag}")
            path = path.with_name(f"{path.name}-{tag}")
    if (path / MANIFEST).is_file():  # ours: the same build resumes it or tops up rows a newer plan added
        manifest = read_manifest(path)
        threads, quick = manifest.get("threads"), bool(manifest.get("quick"))
        if not manifest.get("complete"):
            _log(f"resuming the unfinished latency profile {path}")
    else:
        _log(f"no latency profile for {spec.name} at {path}; profiling this machine first")
    build_profile(spec.name, img_size=spec.img_size, backend="torch-cpu", batch_size=32, dtype="fp32",
                  threads=threads, out=path, progress=progress, quick=quick)  # a no-op when nothing is missing
    return _loaded(path, spec, allow_foreign)


def _loaded(path: Path, spec: ModelSpec, allow_foreign: bool):
    from ..profile import LatencyProfile

    prof = LatencyProfile.load(path, allow_foreign=allow_foreign)
    prof.check_model(spec)
    return prof


def run_search(req: SearchRequest) -> dict:
    """Run (or resume) one search and return the summary written to RUN/summary.json."""
    from ..data import load_dataset
    from ..measure import set_threads, steady_allocator
    from ..models import DEFAULT_MODEL, create_model

    if req.trials < 1:
        raise CaitsearchError(f"--trials must be at least 1, not {req.trials}.")
    if req.retrain_top < 0:
        raise CaitsearchError(f"--retrain-top must be 0 or more, not {req.retrain_top}.")
    st.make_sampler(req.sampler, req.seed)  # refuse a bad name before any work
    Budget.resolve(req.budget, req.budget_ms, 1.0)  # refuse a bad budget before any work
    threads = set_threads(req.threads)
    steady_allocator()
    name = req.model or DEFAULT_MODEL
    probe = create_model(name, img_size=req.img_size)
    spec = ModelSpec.from_model(probe)
    prof = load_profile(req, spec, name)
    if req.threads is None and prof.manifest.get("threads"):
        threads = set_threads(int(prof.manifest["threads"]))  # time candidates as the profile was timed
    budget = Budget.resolve(req.budget, req.budget_ms, prof.dense_ms)
    space = SearchSpace.for_strategy(spec, req.strategy)
    predict = prof.predict
    described = describe_space(space, predict)
    described["dense_predicted_ms"] = float(prof.dense_ms)
    say = _say if req.echo else (lambda message: None)
    for corner in ("min", "mid", "max"):
        c = described["corners"][corner]
        say(f"space {corner}: {c['predicted_ms']:.3g} ms predicted ({c['predicted_ms'] / prof.dense_ms:.2f}x dense), "
             f"{c['mac_ratio']:.2f}x dense MACs")
    say(f"budget: {budget.ms:.3g} ms per batch of {prof.manifest.get('batch_size')} ({budget.ratio:.2f}x dense)")
    check_reachable(budget, described)

    run_dir = Path(req.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    url = req.storage or st.default_storage(run_dir)
    write_json(run_dir / "space.json", described)
    write_json(run_dir / "manifest.json", manifest({
        "storage": st.redact(url), "study_name": req.study_name, "threads": threads,
        "profile": prof.manifest, "request": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(req).items()
                                              if k != "storage"}}))

    splits = load_dataset(req.data, spec, seed=req.seed, calib_size=req.calib_size,
                          train_limit=req.train_limit, test_limit=req.test_limit)
    dense = dense_model(req, name, spec, splits, run_dir)
    calib = stack_images(splits.calib, req.proxy_size)
    proxy = AccuracyProxy(dense, calib)

    # what the user asked for, not derived floats: the same command always finds its own study
    identity = {"model": spec.name, "img_size": list(spec.img_size),
                "budget": {"ratio": req.budget} if req.budget is not None else {"ms": req.budget_ms},
                "profile": prof.manifest.get("table_sha256"),
                "space": {"qk": space.qk_choices, "mlp": space.mlp_choices, "axes": list(space.axes)},
                "data": splits.name, "calib_size": req.calib_size, "proxy_size": int(calib.shape[0]), "seed": req.seed}
    study, created = st.open_study(url, req.study_name,
                                   st.make_sampler(req.sampler, st.worker_seed(req.seed, url), req.trials), identity)
    local = st.is_local(url)
    with st.exclusive(run_dir) if local else contextlib.nullcontext():
        if local and (orphans := st.fail_orphans(study)):
            _log(f"resuming: {orphans} trial(s) interrupted by a killed run marked failed and not counted")
        st.enqueue_warm_starts(study, space, warm_starts(space, predict, budget, limit=max(1, min(4, req.trials // 4))),
                               may_enqueue=created or local)
        with _progress(req.progress) as bars:
            task = bars.add_task("trials", total=req.trials, completed=min(req.trials, st.count(study)))
            st.run_trials(study, st.make_objective(space, proxy, predict, budget.ms, req.trials), req.trials,
                          on_trial=lambda done: bars.update(task, completed=min(done, req.trials)))
    write_table(run_dir, "trials", trial_rows(study), csv=False)

    feasible = st.feasible_trials(study)
    if not feasible:
        raise CaitsearchError(f"no trial of study '{req.study_name}' is predicted within the budget; "
                              "run more --trials or raise the budget.")
    device, dtype = _device_dtype(prof.manifest)
    with _progress(req.progress) as bars:
        dense_timing, measured = remeasure_until_within(
            dense, feasible, spec, budget, prof, device, dtype, proxy.stats_images, req,
            on_round=lambda n: bars.add_task(f"re-measuring {n} candidates", total=req.repeats),
            advance=lambda task: bars.advance(task))
    dense.to("cpu", torch.float32)
    measured.sort(key=lambda m: (not m.within_budget, m.proxy["kl"]))
    dense_acc = _evaluate(dense, splits.test, req.batch_size)

    rows, candidates = [], []
    for rank, m in enumerate(measured):
        folder = run_dir / "candidates" / f"trial-{m.trial}"
        retrain = m.within_budget and rank < req.retrain_top
        metrics = candidate(dense, m, splits, folder, req, retrain, proxy.stats_images) if m.within_budget else None
        row = {"rank": rank, "trial": m.trial, "within_budget": m.within_budget, "retrained": bool(metrics and metrics["retrained"]),
               "accuracy": metrics["accuracy"] if metrics else None, "latency_ms": m.latency_ms,
               "predicted_latency_ms": m.predicted_ms, "speedup": m.timing["dense_ms"] / m.latency_ms,
               "proxy_kl": m.proxy["kl"], "proxy_agreement": m.proxy["agreement"],
               "macs": m.config.macs(spec)["total"], "config_path": str(folder / "config.json") if metrics else None}
        rows.append(row)
        if metrics:
            candidates.append({**{k: row[k] for k in ("accuracy", "latency_ms", "predicted_latency_ms", "speedup",
                                                      "retrained", "trial", "proxy_kl", "proxy_agreement")},
                               "timing": m.timing, "config": m.config.to_dict(), "path": str(folder)})
    candidates.sort(key=lambda c: (not c["retrained"], -c["accuracy"]))
    write_table(run_dir, "results", rows)
    summary = {
        "model": spec.name, "strategy": req.strategy, "data": splits.name, "device": str(device),
        "batch_size": prof.manifest.get("batch_size"), "dtype": prof.manifest.get("dtype"), "threads": threads,
        "budget": {"ratio": budget.ratio, "ms": budget.ms},
        "dense": {"accuracy": dense_acc, "latency_ms": dense_timing["latency_ms"],
                  "predicted_latency_ms": float(prof.dense_ms), "timing": dense_timing["timing"]},
        "trials": {"finished": st.count(study), "requested": req.trials, "feasible": len(st.feasible_trials(study))},
        "candidates": candidates,
        "over_budget": [{"trial": m.trial, "latency_ms": m.latency_ms, "predicted_latency_ms": m.predicted_ms}
                        for m in measured if not m.within_budget],
    }
    write_json(run_dir / "summary.json", summary)
    return summary


def _device_dtype(profile_manifest: dict) -> tuple[torch.device, torch.dtype]:
    from ..cli.common import resolve_dtype

    backend = str(profile_manifest.get("backend", "torch-cpu"))
    device = torch.device("cuda" if "cuda" in backend or "tensorrt" in backend else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaitsearchError(f"the profile was measured with {backend}, but no CUDA device is visible here.")
    return device, resolve_dtype(str(profile_manifest.get("dtype", "fp32")))


def _evaluate(model: nn.Module, dataset, batch_size: int) -> float:
    from ..train import evaluate

    return float(evaluate(model, dataset, batch_size=batch_size))


def dense_model(req: SearchRequest, name: str, spec: ModelSpec, splits, run_dir: Path) -> nn.Module:
    """The dense teacher: --checkpoint, else weights trained here once (RUN/dense/, resumable)."""
    from ..models import create_model
    from ..train import MODEL_FILE, train_dense

    from ..models import default_checkpoint

    checkpoint = req.checkpoint
    if checkpoint is None and splits.name == "fashion-mnist" and splits.num_classes == spec.num_classes:
        checkpoint = default_checkpoint(name)  # the embedded model's committed weights, if any
    if checkpoint is not None:
        return create_model(name, img_size=spec.img_size, num_classes=splits.num_classes, checkpoint=checkpoint)
    model = create_model(name, img_size=spec.img_size, num_classes=splits.num_classes)
    folder = run_dir / "dense"
    if not (folder / "result.json").is_file():
        _log(f"no --checkpoint: training the dense {name} on {splits.name} for {req.epochs} epoch(s) first")
        train_dense(model, splits, req.epochs, folder, batch_size=req.batch_size, seed=req.seed,
                    train_limit=req.train_limit, progress=req.progress)
        write_json(folder / "result.json", {"trained": True, "epochs": req.epochs})
    from ..models import load_checkpoint

    load_checkpoint(model, folder / MODEL_FILE)
    return model.cpu().eval()


def candidate(dense: nn.Module, m: Measured, splits, folder: Path, req: SearchRequest, retrain: bool,
              stats_images: torch.Tensor) -> dict:
    """Retrain (or, beyond the top K, just evaluate) one candidate; finished ones are not redone."""
    done = folder / "result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        if result.get("retrained") or not retrain:
            return result
    m.config.save(folder / "config.json")
    if retrain:
        from ..train import retrain_compressed

        model, metrics = retrain_compressed(dense, m.config, splits, req.epochs, folder, batch_size=req.batch_size,
                                            seed=req.seed, train_limit=req.train_limit, progress=req.progress)
        accuracy = float(metrics["accuracy"])  # the trainer's test accuracy of the materialised model
    else:
        model = materialize(compress(dense, m.config, stats_images)).eval()
        accuracy = _evaluate(model, splits.test, req.batch_size)
        save_state(model, folder / "model.safetensors")
    result = {"accuracy": accuracy, "retrained": retrain, "trial": m.trial, "epochs": req.epochs if retrain else 0}
    write_json(done, result)
    return result
