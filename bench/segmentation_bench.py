"""Segmentation transfer, end to end (issue 14): every compressed segmentation model is fine-tuned
backbone and decoder together, distilled from the dense segmentation model (per-pixel KL over the
classes + CE), with ONE recipe for every strategy; mIoU on the test split; latency of backbone,
unmerge and decoder at batch 32, every model in one interleaved loop against dense.

    .venv/bin/python bench/segmentation_bench.py                                   # the full protocol
    .venv/bin/python bench/segmentation_bench.py --train-limit 2048 --steps 40 --test-limit 1000 --trials 40   # reduced

Variants, per budget (default 0.7 and 0.5 of the dense latency):
- atme, cdcp, tome: the strategy's uniform schedule predicted closest under the budget (ToMe: the
  same r in every block, as published), retrained with the recipe;
- cait: `caitsearch search --task segmentation --strategy cait` at the budget (its screen, and
  short tunes ranked by validation mIoU), and the first-ranked candidate's config retrained with the same
  recipe as the others (so the comparison is between configs, not training lengths). `--cait-config
  B=PATH` uses a config found before instead of searching;
- cait+merge: when the search's first-ranked candidate merges nothing, the first-ranked one that
  merges at least once, retrained alike (goal 1 asks about such a model).

Goals (printed and stored): (1) a cait model with at least one merge >= 1.3x faster than dense,
measured, at most 1.0 mIoU point below dense; (2) at equal latency (the same budget, latencies
stated) atme >= tome + 3 mIoU points; (3) cait >= the best single strategy at every budget.

Expected wall time on a 2-core CPU (AMD EPYC, 2 threads): the default recipe (2 epochs over 20,000
training images, 312 steps of batch 128, about 0.8 s a step) takes about 4 minutes per variant, so
8 variants are about 35 minutes, plus two searches (200 trials, short tunes) of about 6 minutes each,
plus timing and evaluation: about 50 minutes in all. The reduced command above takes about 10.
Writes bench/results/segmentation.json, bench/results/segmentation.png and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from caitsearch import CaitsearchError, CompressionConfig, ModelSpec
from caitsearch.io import atomic_write, atomic_write_text
from caitsearch.measure import set_threads, steady_allocator
from caitsearch.models import DEFAULT_MODEL
from caitsearch.profile import find_profile
from caitsearch.profile.fingerprint import cpu_model
from caitsearch.profile.runtime import Runtime
from caitsearch.search import strategy_config
from caitsearch.search.rank import merge_share
from caitsearch.tasks import SEGMENTATION
from caitsearch.training import Recipe, Retraining, evaluate, load_teacher

RESULTS = Path(__file__).parent / "results"
STRATEGIES = ("cait", "atme", "cdcp", "tome")
SEARCH_MINUTES = 0.01  # see search_configs
CAIT_MERGE = "cait+merge"  # the cait search's best-ranked candidate that merges, when it deploys one that does not
GOAL_SPEEDUP, GOAL_MIOU_DROP, GOAL_ATME_OVER_TOME = 1.3, 1.0, 3.0  # x, points, points


def search_configs(args, budget: float, work: Path) -> tuple[CompressionConfig, Optional[CompressionConfig]]:
    """The first of a segmentation search's ranking at `budget` (short tunes, validation mIoU; the
    search's own retraining is left to the bench's recipe), and the first of it that merges at
    least once (None if no candidate within budget merges): goal 1 asks whether the joint search
    finds a merging model that is fast and close, whichever one it deploys."""
    from caitsearch.search import BudgetRequest, DataRequest, MeasureRequest, RankRequest, SearchRequest, StudyRequest, run_search

    req = SearchRequest(
        out=work / f"search-b{budget:g}", budget=BudgetRequest(ratio=budget), strategy="cait", task="segmentation",
        model=args.model, checkpoint=args.checkpoint, seed=args.seed,
        data=DataRequest(source=args.data, calib_size=args.calib, proxy_size=args.proxy, val_size=args.val,
                         train_limit=args.train_limit, test_limit=args.test_limit),
        study=StudyRequest(trials=args.trials), rank=RankRequest(finalists=args.finalists, tune_steps=args.tune_steps),
        measure=MeasureRequest(profile=args.profile, threads=args.threads, repeats=5),
        recipe=Recipe(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed),
        # the short tunes run only for something to retrain: one candidate, cut to a single step by a
        # limit long past when it starts (the bench retrains the configs it takes with its own recipe)
        retrain_top=1, minutes=SEARCH_MINUTES, progress=False, echo=False)
    summary = run_search(req)
    if not summary["ranking"]["finalists"]:
        raise CaitsearchError(f"the cait search at {budget} ran no short fine-tunes (fewer than 2 candidates within budget?)")
    ranked = sorted((c for c in summary["candidates"] if c["rank"] is not None), key=lambda c: c["rank"])
    if not ranked:
        raise CaitsearchError(f"the cait search at {budget} found no candidate within budget")
    configs = [CompressionConfig.from_dict(c["config"]) for c in ranked]
    merging = [c for c in configs if merge_count(c) >= 1]
    return configs[0], (merging[0] if merging else None)


def merge_count(config: CompressionConfig) -> int:
    return sum(b.merge_axis.value != "none" for b in config.blocks)


def run(args: argparse.Namespace) -> dict:
    from caitsearch.models import model_spec

    spec: ModelSpec = model_spec(args.model)
    splits = SEGMENTATION.load_splits(args.data, spec, seed=args.seed, calib_size=args.calib, proxy_size=args.proxy,
                                      val_size=args.val, train_limit=args.train_limit, test_limit=args.test_limit)
    teacher = load_teacher(args.model, num_classes=splits.num_classes, checkpoint=args.checkpoint, data=splits.name,
                           task=SEGMENTATION)
    if not teacher.trained:
        raise CaitsearchError("the bench needs the dense segmentation model: pass --checkpoint "
                              "(caitsearch train --task segmentation --out DIR)")
    dense = teacher.model.eval()
    recipe = Recipe(epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    prof = find_profile(spec, args.profile, threads=args.threads)
    given = dict(text.split("=", 1) for text in args.cait_config)
    work = Path(args.work or tempfile.mkdtemp(prefix="segbench-"))
    batch = max(args.batch_size, 256)
    rows = [{"label": "dense", "strategy": "dense", "budget": None, "miou": evaluate(dense, splits.test, batch, task=SEGMENTATION),
             "merges": 0, "mac_ratio": 1.0}]
    models = {"dense": dense}
    dense_macs = CompressionConfig.dense(spec).macs(spec)["total"]
    for budget in args.budgets:
        variants = []
        for strategy in args.strategies:
            if strategy != "cait":
                variants.append((strategy, strategy_config(spec, strategy, budget, None, args.profile)))
            elif f"{budget:g}" in given:
                variants.append((strategy, CompressionConfig.load(given[f"{budget:g}"])))
            else:
                deployed, merging = search_configs(args, budget, work)
                variants.append((strategy, deployed))
                if merging is not None and merging != deployed:
                    variants.append((CAIT_MERGE, merging))
        for strategy, config in variants:
            label = f"{strategy}@{budget:g}"
            started = time.perf_counter()
            retraining = Retraining(dense, config, splits, recipe, work / label, task=SEGMENTATION)
            retraining.run(progress=False)
            model, metrics = retraining.finish()
            models[label] = model.eval()
            merges = merge_count(config)
            rows.append({"label": label, "strategy": strategy, "budget": budget, "miou": metrics["accuracy"],
                         "val_miou": metrics["val_accuracy"], "merges": merges, "merge_share": merge_share(config, spec),
                         "mac_ratio": config.macs(spec)["total"] / dense_macs, "predicted_ratio": prof.predict(config) / prof.dense_ms,
                         "steps": metrics["steps"], "seconds": time.perf_counter() - started, "config": config.to_dict()})
            print(f"{label}: mIoU {100 * metrics['accuracy']:.2f}% ({merges} merges, "
                  f"{time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    runtime = Runtime(threads=args.threads, batch_size=args.batch)
    timings, _ = runtime.time_models(models, spec, repeats=args.repeats, warmup=3)
    base = timings["dense"].median
    for row in rows:
        t = timings[row["label"]]
        row.update(latency_ms=t.median, speedup=base / t.median, miou_delta_points=100 * (row["miou"] - rows[0]["miou"]))
    return {"meta": {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__},
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "recipe": recipe.as_dict(), "teacher": {"source": teacher.source, "path": str(teacher.path)},
            "train_images": len(splits.train), "test_images": len(splits.test),
            "rows": rows, "goals": goals(rows, args.budgets), "command": shlex.join(sys.argv)}


def goals(rows: list[dict], budgets) -> dict:
    by = {r["label"]: r for r in rows}
    merged = [r for r in rows if r["strategy"] in ("cait", CAIT_MERGE) and r["merges"] >= 1]
    fast = [r for r in merged if r["speedup"] >= GOAL_SPEEDUP]
    best = max(fast, key=lambda r: r["miou_delta_points"], default=None)
    out = {"cait_merge_fast_and_close": {
        "met": bool(best and best["miou_delta_points"] >= -GOAL_MIOU_DROP), "best": best and best["label"],
        "speedup": best and best["speedup"], "miou_delta_points": best and best["miou_delta_points"]}}
    for budget in budgets:
        atme, tome, cait = (by.get(f"{s}@{budget:g}") for s in ("atme", "tome", "cait"))
        if atme and tome:
            out[f"atme_over_tome@{budget:g}"] = {
                "met": 100 * (atme["miou"] - tome["miou"]) >= GOAL_ATME_OVER_TOME,
                "points": 100 * (atme["miou"] - tome["miou"]), "atme_ms": atme["latency_ms"], "tome_ms": tome["latency_ms"]}
        singles = [by[f"{s}@{budget:g}"] for s in ("atme", "cdcp", "tome") if f"{s}@{budget:g}" in by]
        if cait and singles:
            top = max(singles, key=lambda r: r["miou"])
            out[f"cait_over_best_single@{budget:g}"] = {"met": cait["miou"] >= top["miou"], "best_single": top["label"],
                                                       "points": 100 * (cait["miou"] - top["miou"])}
    return out


def markdown_table(result: dict) -> str:
    lines = ["| variant | merges | MACs | batch-32 ms | speedup | mIoU | Δ mIoU (points) |", "|" + " --- |" * 7]
    for r in result["rows"]:
        lines.append(f"| {r['label']} | {r['merges']} | {r['mac_ratio']:.3f}x | {r['latency_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {100 * r['miou']:.2f}% | {r['miou_delta_points']:+.2f} |")
    lines += ["", "| goal | met | figures |", "| --- | --- | --- |"]
    for name, g in result["goals"].items():
        figures = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in g.items() if k != "met")
        lines.append(f"| {name} | {'yes' if g['met'] else '**no**'} | {figures} |")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    dense = result["rows"][0]
    ax.scatter([dense["latency_ms"]], [100 * dense["miou"]], marker="*", s=220, color="black", label="dense")
    for i, strategy in enumerate(STRATEGIES + (CAIT_MERGE,)):
        pts = sorted((r["latency_ms"], 100 * r["miou"]) for r in result["rows"] if r["strategy"] == strategy)
        if pts:
            ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=strategy)
    ax.set(xlabel=f"measured latency, ms per batch of {result['settings']['batch']}", ylabel="test mIoU (%)",
           title="segmentation, fine-tuned end to end: mIoU vs measured latency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="dense segmentation weights (default: the committed ones of the default model)")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--profile", type=Path, default=None, help="latency profile (default: this machine's, built if missing)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--cait-config", action="append", default=[], metavar="BUDGET=CONFIG.json",
                    help="use this cait config at BUDGET instead of searching")
    ap.add_argument("--epochs", type=int, default=2, help="retraining epochs of every variant (one recipe)")
    ap.add_argument("--steps", type=int, default=None, help="retraining steps instead of epochs (a reduced run)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-limit", type=int, default=20000)
    ap.add_argument("--test-limit", type=int, default=None)
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--proxy", type=int, default=512)
    ap.add_argument("--val", type=int, default=2000)
    ap.add_argument("--trials", type=int, default=200, help="trials of each cait search")
    ap.add_argument("--finalists", type=int, default=4)
    ap.add_argument("--tune-steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=32, help="batch size of the latency measurement")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="folder for the searches and retrainings (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=RESULTS / "segmentation.json")
    args = ap.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    steady_allocator()
    args.threads = set_threads(args.threads)
    try:
        result = run(args)
    except CaitsearchError as e:
        raise SystemExit(str(e)) from None
    atomic_write_text(args.out, json.dumps(result, indent=1, default=float) + "\n")
    figure(result, args.out.with_suffix(".png"))
    print(markdown_table(result))


if __name__ == "__main__":
    main()
