"""Side by side: cait against atme (merging only), cdcp (pruning only) and the ToMe baseline, each
searched, retrained and measured by the same code. Writes bench/results/strategies.json and
bench/results/strategies.png (BENCHMARKS.md: bench/write_benchmarks.py).

    .venv/bin/python bench/strategies_bench.py                  # both sections
    .venv/bin/python bench/strategies_bench.py --only latency   # re-measure one section, keep the other

Sections:
- `accuracy`: on the embedded default model, `caitsearch search --strategy S --budget B` for every
  strategy and budget with one shared recipe (`RECIPE`: the default trial count, 8 finalists
  ranked by short fine-tunes, the best retrained for `--epochs` with no time cut), into
  results/bench/<S>-b<B>/. A finished run (summary.json present) is read, not repeated. The
  deployed candidate of each is the one chosen on the validation split; its test accuracy is reported.
  Rows of other budgets and strategies already in the JSON stay when they were run with this recipe,
  so the 12 runs (24 min for cait at 0.5 on a 2-core AMD EPYC) can be spread over several sittings.
- `ranking`: does the ranking predict? `caitsearch search --budget 0.6 --retrain-top 8` fully
  retrains all eight finalists; Spearman between each finalist's validation accuracy after its
  first short fine-tune rung and its final test accuracy (and, beside it, the untrained proxy's).
- `latency`: DeiT-Tiny, -Small and -Base at 224 with random weights (latency does not depend on
  them), batch 32 and 1. At each budget every strategy's uniform schedule predicted closest under
  it (`SearchSpace.schedule_for`: for tome ToMe's own constant-r schedule) is timed against dense
  in one interleaved loop per model and batch. Without weights there is no accuracy to search on,
  so these are the schedules the predictor picks, not searched ones. Models without a committed
  profile (DeiT-Base) are profiled here with `--quick` resolution first.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from caitsearch import CompressionConfig, ModelSpec, compress, create_model, materialize
from caitsearch.models import DEFAULT_MODEL
from caitsearch.device import resolve_device, resolve_dtype
from caitsearch.io import atomic_write_text
from caitsearch.measure import measure_interleaved, set_threads, steady_allocator
from caitsearch.space import STRATEGIES, SearchSpace

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BUDGETS = (0.7, 0.6, 0.5)
LATENCY_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")
# one recipe for every strategy: the search's defaults (trials sized to the space, 8 finalists, 25-step
# first rung), retraining EPOCHS epochs on all training images, never cut by --minutes
EPOCHS = 3
RECIPE = ["--epochs", str(EPOCHS), "--minutes", "0", "--repeats", "10"]
RANKED = 8  # finalists fully retrained by the ranking section


def teacher_digest() -> str:
    """First 12 hex digits of the committed default weights' SHA-256: rows retrained from another
    teacher are not comparable, so they are not kept beside this one's."""
    import hashlib

    from caitsearch.models import default_checkpoint

    return hashlib.sha256(Path(default_checkpoint(DEFAULT_MODEL)).read_bytes()).hexdigest()[:12]


def same_loop_ratio(candidate: dict, dense: dict) -> float:
    """A candidate's latency over the dense model's timed in the same loop: re-measurement runs in
    rounds, and the summary's dense timing is the first round's (another state of the machine)."""
    return candidate["latency_ms"] / candidate.get("timing", {}).get("dense_ms", dense["latency_ms"])


def trials_by_family(run: Path) -> dict:
    """How many of a run's trials each family had, and how many of them were predicted within
    budget (from RUN/trials.parquet): does every family get searched?"""
    import pandas as pd

    spec = ModelSpec.from_model(create_model(DEFAULT_MODEL))
    space = SearchSpace(spec)
    trials = pd.read_parquet(run / "trials.parquet")
    trials = trials[trials["state"] == "COMPLETE"]
    counts: dict[str, dict] = {}
    for config, feasible in zip(trials["config"], trials["feasible"]):
        family = space.family_of(CompressionConfig.from_dict(json.loads(config) if isinstance(config, str) else config))
        entry = counts.setdefault(family, {"trials": 0, "within_budget": 0})
        entry["trials"] += 1
        entry["within_budget"] += int(bool(feasible))
    return counts


def accuracy_runs(budgets, strategies) -> list[dict]:
    rows = []
    for budget in budgets:
        for strategy in strategies:
            out = ROOT / "results" / "bench" / f"{strategy}-b{budget:g}"
            summary_path = out / "summary.json"
            if not summary_path.exists():
                start = time.perf_counter()
                cmd = [sys.executable, "-m", "caitsearch", "search", "--strategy", strategy, "--budget", str(budget),
                       *RECIPE, "--out", str(out), "--no-progress", "--json"]
                print(f"== {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
                run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if run.returncode != 0:  # e.g. no trial predicted within budget: a result, recorded as such
                    error = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"
                    print(f"   failed: {error}", file=sys.stderr)
                    rows.append({"strategy": strategy, "budget": budget, "run": str(out.relative_to(ROOT)), "recipe": RECIPE,
                                 "teacher": teacher_digest(), "accuracy": None, "error": error.removeprefix("error: ")})
                    continue
                print(f"   {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            s = json.loads(summary_path.read_text())
            dense = s["dense"]
            best = next((c for c in s["candidates"] if c.get("retrained")), None)  # chosen on validation
            rows.append({
                "strategy": strategy, "budget": budget, "run": str(out.relative_to(ROOT)), "recipe": RECIPE,
                "teacher": teacher_digest(), "dense_accuracy": dense["accuracy"], "dense_ms": dense["latency_ms"],
                "wall_minutes": s.get("wall_seconds", float("nan")) / 60, "trials": s["trials"]["finished"],
                "family": best.get("family") if best else None,
                "val_accuracy": best.get("val_accuracy") if best else None,
                "accuracy": best["accuracy"] if best else None,
                "latency_ms": best["latency_ms"] if best else None,
                "latency_ratio": same_loop_ratio(best, dense) if best else None,
                "speedup": best["speedup"] if best else None,
                "delta_points": 100 * (best["accuracy"] - dense["accuracy"]) if best else None,
                "config": best["config"] if best else None,
                "trials_by_family": trials_by_family(out),
            })
    return rows


def ranking_run(budget: float = 0.6) -> dict:
    """All finalists of one cait search fully retrained: does the short fine-tune rank like the end?"""
    out = ROOT / "results" / "bench" / f"ranking-b{budget:g}"
    if not (out / "summary.json").exists():
        cmd = [sys.executable, "-m", "caitsearch", "search", "--budget", str(budget), *RECIPE, "--finalists", str(RANKED),
               "--retrain-top", str(RANKED), "--out", str(out), "--no-progress", "--json"]
        print(f"== {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    s = json.loads((out / "summary.json").read_text())
    first = str(s["ranking"]["rung_steps"][0])
    tuned = {c["trial"]: c["val_at"][first] for c in s["ranking"]["candidates"]}
    final = {c["trial"]: c for c in s["candidates"] if c.get("retrained") and c["trial"] in tuned}
    rows = [{"trial": t, "family": final[t].get("family"), "proxy_kl": final[t]["proxy_kl"], "tune_val": tuned[t],
             "final_val": final[t]["val_accuracy"], "final_test": final[t]["accuracy"],
             "latency_ratio": same_loop_ratio(final[t], s["dense"])} for t in sorted(final)]
    return {"run": str(out.relative_to(ROOT)), "budget": budget, "first_rung_steps": int(first),
            "dense_accuracy": s["dense"]["accuracy"], "wall_minutes": s["wall_seconds"] / 60, **ranking_figures(rows)}


def ranking_from(folder: Path) -> dict:
    """The same figures from bench/ranking_gpu.sh's folder: the search's ranking.parquet and
    remeasured.json, and final.json with each finalist's `caitsearch train --config` result."""
    ranking = pd.read_parquet(folder / "ranking.parquet")
    measured = json.loads((folder / "remeasured.json").read_text())
    timed = {c["trial"]: c for c in measured["candidates"]}
    finals = json.loads((folder / "final.json").read_text())
    request = json.loads((folder / "manifest.json").read_text())["request"]
    first = min(int(c.removeprefix("val_at_")) for c in ranking.columns if c.startswith("val_at_"))
    rows = [{"trial": int(r.trial), "family": r.family, "proxy_kl": float(r.proxy_kl),
             "tune_val": float(getattr(r, f"val_at_{first}")), "last_rung": bool(r.survived),
             "final_val": finals[f"trial-{int(r.trial)}"]["val_accuracy"],
             "final_test": finals[f"trial-{int(r.trial)}"]["accuracy"],
             "latency_ratio": same_loop_ratio(timed[int(r.trial)], measured["dense"])} for r in ranking.itertuples()]
    return {"run": str(folder.relative_to(ROOT)), "budget": request["budget"]["ratio"], "first_rung_steps": first,
            "dense_accuracy": None, "wall_minutes": None, "retrained_by": "bench/ranking_gpu.sh",
            "machine": (folder / "machine.txt").read_text().split("\n")[0] if (folder / "machine.txt").exists() else None,
            **ranking_figures(sorted(rows, key=lambda r: r["trial"]))}


def ranking_figures(rows: list[dict]) -> dict:
    from caitsearch.profile.validate import spearman

    final_test = [r["final_test"] for r in rows]
    return {"rows": rows, "spearman_tune_vs_test": spearman([r["tune_val"] for r in rows], final_test),
            "spearman_proxy_vs_test": spearman([-r["proxy_kl"] for r in rows], final_test),
            "spearman_final_val_vs_test": spearman([r["final_val"] for r in rows], final_test)}


def chosen_configs(spec: ModelSpec, budgets, strategies, progress: bool, profile=None) -> tuple[dict, float]:
    from caitsearch.profile import LatencyProfile
    from caitsearch.profile import find_profile

    if profile is not None:  # e.g. a GPU profile of the same machine kind
        prof = LatencyProfile.load(profile, allow_foreign=True)
        prof.check_model(spec)
    else:
        prof = find_profile(spec, progress=progress, quick=True)  # quick only where none exists yet
    configs = {}
    for budget in budgets:
        for strategy in strategies:
            space = SearchSpace.for_strategy(spec, strategy)
            cfg = space.schedule_for(prof.predict, budget * prof.dense_ms)
            configs[(strategy, budget)] = (cfg, float(prof.predict(cfg)) / prof.dense_ms)
    return configs, prof.dense_ms


def latency_runs(models, budgets, strategies, batches, repeats: int, device: str = "cpu", dtype: str = "fp32",
                 profile=None) -> list[dict]:
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    rows = []
    for name in models:
        dense = create_model(name).eval()
        spec = ModelSpec.from_model(dense)
        configs, _ = chosen_configs(spec, budgets, strategies, progress=True, profile=profile)
        dense_macs = CompressionConfig.dense(spec).macs(spec)["total"]
        models_ = {"dense": dense}
        for key, (cfg, _) in configs.items():
            models_[key] = materialize(compress(dense, cfg)).eval().to(dev, dt)
        dense.to(dev, dt)
        for batch in batches:
            x = torch.randn(batch, spec.in_chans, *spec.img_size, device=dev, dtype=dt)
            print(f"== {name} batch {batch}: {len(models_)} models", file=sys.stderr, flush=True)
            with torch.inference_mode():
                timings = measure_interleaved({str(k): (lambda m=m: m(x)) for k, m in models_.items()},
                                              repeats=repeats, warmup=2, device=dev)
            base = timings["dense"].median
            for (strategy, budget), (cfg, predicted_ratio) in configs.items():
                t = timings[str((strategy, budget))]
                mac_ratio = cfg.macs(spec)["total"] / dense_macs
                speedup = base / t.median
                rows.append({"model": name, "device": device, "dtype": dtype, "batch": batch, "strategy": strategy, "budget": budget,
                             "dense_ms": base, "median_ms": t.median, "spread": t.spread, "speedup": speedup,
                             "predicted_ratio": predicted_ratio, "mac_ratio": mac_ratio,
                             "realised": speedup * mac_ratio,  # as in core_bench: 1.0 = all of the MAC cut
                             "config": cfg.to_dict()})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"cait": "o", "atme": "s", "cdcp": "^", "tome": "x"}
    for strategy in STRATEGIES:
        pts = sorted((r["latency_ratio"], 100 * r["accuracy"], r["budget"]) for r in rows
                     if r["strategy"] == strategy and r["accuracy"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[strategy], label=strategy)
    dense = [100 * r["dense_accuracy"] for r in rows]
    if dense:
        ax.axhline(dense[0], color="grey", ls="--", lw=1, label=f"dense {dense[0]:.2f}%")
    for b in sorted({r["budget"] for r in rows}):
        ax.axvline(b, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("measured latency / dense (same run)")
    ax.set_ylabel("Fashion-MNIST test accuracy (%)")
    ax.set_title("Best retrained candidate per strategy and budget (one recipe)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("accuracy", "ranking", "latency"), help="Run one section; keep the others' results.")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    ap.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    ap.add_argument("--models", nargs="+", default=list(LATENCY_MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 1])
    ap.add_argument("--repeats", type=int, default=5, help="Interleaved timing rounds in the latency section.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (latency section)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    ap.add_argument("--profile", type=Path, help="Latency profile folder that picks the schedules (one model only).")
    ap.add_argument("--out", type=Path, default=RESULTS / "strategies.json")
    ap.add_argument("--ranking-from", type=Path, help="Ranking section: read bench/ranking_gpu.sh's folder instead of "
                    "running the search with every finalist retrained here.")
    args = ap.parse_args()
    set_threads(args.threads)
    steady_allocator()
    path = args.out
    result = json.loads(path.read_text()) if path.exists() else {}
    from caitsearch.profile.fingerprint import cpu_model

    meta = result.get("meta", {})
    if "threads" in meta:  # written before sections kept their own: the last run was the latency section
        meta = {"latency": meta}
    for section in ("accuracy", "ranking", "latency"):  # what ran, with what, on which CPU: per section
        if args.only in (None, section):
            meta[section] = {"threads": args.threads, "torch": torch.__version__, "recipe": RECIPE, "cpu": cpu_model(),
                             "command": " ".join(["bench/strategies_bench.py", *sys.argv[1:]])}
    result["meta"] = meta
    if args.only in (None, "accuracy"):
        fresh = accuracy_runs(args.budgets, args.strategies)
        ran = {(r["strategy"], r["budget"]) for r in fresh}  # other budgets' rows stay, if of this recipe
        kept = [r for r in result.get("accuracy", []) if (r["strategy"], r["budget"]) not in ran
                and r.get("recipe") == RECIPE and r.get("teacher") == teacher_digest()]
        order = {s: i for i, s in enumerate(STRATEGIES)}
        result["accuracy"] = sorted(kept + fresh, key=lambda r: (-r["budget"], order[r["strategy"]]))
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")
        plot(result["accuracy"], RESULTS / "strategies.png")
    if args.only in (None, "ranking"):
        result["ranking"] = ranking_from(args.ranking_from.resolve()) if args.ranking_from else ranking_run()
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    if args.only in (None, "latency"):
        result["latency"] = latency_runs(args.models, args.budgets, args.strategies, args.batches, args.repeats,
                                         args.device, args.dtype, args.profile)
        atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    from write_benchmarks import strategies_section

    print("\n".join(strategies_section(result)))


if __name__ == "__main__":
    main()
