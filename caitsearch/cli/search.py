"""`search`: find the most accurate compressed config under a latency budget, then retrain it."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..console import print_table, say
from .app import app, emit_json, resumable
from ..defaults import CALIB_SIZE, DEFAULT_MINUTES, DEFAULT_MODEL, PROXY_SIZE, VAL_SIZE
from ..io import check_output_dir
from .options import (
    AllowForeignOpt, CalibOpt, CheckpointOpt, ImgSizeOpt, JsonOpt, ModelOpt, NoProgressOpt, ProfileOpt, ProxySizeOpt,
    StrategyOpt, TaskOpt, ThreadsOpt, ValSizeOpt, check_inputs,
)


@app.command()
def search(
    budget: Annotated[Optional[float], typer.Option(
        "--budget", help="Latency budget as a fraction of the dense model's latency, e.g. 0.6.")] = None,
    budget_ms: Annotated[Optional[float], typer.Option(
        "--budget-ms", help="Latency budget in milliseconds per batch at the profile's batch size.")] = None,
    profile: ProfileOpt = None,
    model: ModelOpt = None,
    strategy: StrategyOpt = "cait",
    task: TaskOpt = "classification",
    img_size: ImgSizeOpt = None,
    checkpoint: CheckpointOpt = None,
    data: Annotated[str, typer.Option(
        "--data", help="'fashion-mnist' or an ImageFolder directory with train/ and val/.")] = "fashion-mnist",
    trials: Annotated[Optional[int], typer.Option(
        "--trials", min=1, help="Total trials of the study, across resumes and workers (default: 8 per parameter, 100-400; the cait space sums what its three families would get alone: 436 on the default model; a trial takes well under a second).")] = None,
    search_minutes: Annotated[Optional[float], typer.Option(
        "--search-minutes", help="Stop sampling trials after this many minutes, even below --trials.")] = None,
    sampler: Annotated[str, typer.Option("--sampler", help="tpe, nsga2 or random (all honour the budget constraint).")] = "tpe",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampler, data splits and retraining.")] = 0,
    storage: Annotated[Optional[str], typer.Option(
        "--storage", help="Optuna storage URL shared by several workers, e.g. postgresql://user@host/db (default: sqlite in --out).")] = None,
    study_name: Annotated[str, typer.Option("--study-name", help="Study name inside the storage.")] = "search",
    finalists: Annotated[int, typer.Option(
        "--finalists", min=0, help="Candidates that get a short fine-tune, halved by validation accuracy at every rung (0: rank by the proxy alone).")] = 8,
    tune_steps: Annotated[int, typer.Option(
        "--tune-steps", min=1, help="Optimizer steps of the first rung of short fine-tunes; each later rung doubles the total.")] = 25,
    retrain_top: Annotated[int, typer.Option("--retrain-top", min=0, help="Fully retrain this many best candidates with distillation.")] = 1,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Retraining epochs (and dense training epochs without --checkpoint).")] = 6,
    minutes: Annotated[float, typer.Option(
        "--minutes", help="Wall-time budget of the whole run: the final retraining is cut to the whole steps that fit what is left (0: no limit, the full --epochs).")] = DEFAULT_MINUTES,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Training and evaluation batch size.")] = 128,
    calib_size: CalibOpt = CALIB_SIZE,
    proxy_size: ProxySizeOpt = PROXY_SIZE,
    val_size: ValSizeOpt = VAL_SIZE,
    train_limit: Annotated[Optional[int], typer.Option("--train-limit", min=1, help="Use only this many training images.")] = None,
    test_limit: Annotated[Optional[int], typer.Option("--test-limit", min=1, help="Evaluate on only this many test images.")] = None,
    remeasure: Annotated[int, typer.Option("--remeasure", min=1, help="Best feasible trials re-measured end to end.")] = 4,
    repeats: Annotated[int, typer.Option("--repeats", min=3, help="Interleaved timing rounds when re-measuring.")] = 15,
    threads: ThreadsOpt = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="cpu or cuda: where the teacher, the proxy, retraining and evaluation run "
                         "(default: the profile's device). Candidates are always timed on the profile's runtime.")] = None,
    allow_foreign_profile: AllowForeignOpt = False,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Run folder, resumed if it exists (default: results/<model>-b<budget>).")] = None,
    no_progress: NoProgressOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Search per-block ATME merges and CDCP widths under a latency budget, then re-measure, rank, retrain and report the best candidates.

    1. Screen: each trial's latency is predicted from the latency profile; configs over budget are rejected before any accuracy work (an Optuna constraint). The rest are scored, untrained, by how well they follow the dense model on held-out proxy images (KL and top-1 agreement). The joint space gives pure pruning, pure merging and their mixes each the trials its strategy would get searched alone, whatever the proxy prefers, models each from its own trials, and starts from each family's best uniform schedule.

    2. Measure: the --finalists best, taken in rounds over pure-pruning, merge-heavy and mixed candidates (the proxy favours merging across kinds), are timed end to end against the dense model on this machine, in the deployed form the profile was measured in (its backend, dtype, threads and CUDA graphs); over-budget ones drop out.

    3. Rank: short distillation fine-tunes (--tune-steps, doubling per rung), scored on the validation split, keep the better half at every rung.

    4. Retrain: the best --retrain-top are retrained fully (cut to fit --minutes) and evaluated; the one to deploy is the most accurate on the validation split, and its test accuracy is reported, never used to choose.

    Everything lands in --out: summary.json, results.parquet/.csv, trials.parquet, ranking.parquet, candidates/trial-N/. Run the same command again to resume after an interruption.

    Examples:

      caitsearch search --budget 0.6

      caitsearch search --budget 0.6 --strategy tome      # the ToMe baseline, searched the same way

      caitsearch search --budget-ms 12.5 --model deit_tiny_patch16_224 --checkpoint dense.pth --data ./imagenette

      caitsearch search --budget 0.5 --storage postgresql://me@db/studies --study-name deit-t-05 --trials 200

      caitsearch search --budget 0.6 --profile hw_profiles/deit_small_patch16_224_224x224_cuda_b32_fp16   # timed in fp16 on the GPU, retrained there

      caitsearch search --budget 0.6 --task segmentation   # backbone + decoder, screened and ranked by mIoU, timed with the decoder
    """
    resumable()
    check_inputs(checkpoint=checkpoint, profile=profile)
    import optuna

    from ..search import (
        BudgetRequest, DataRequest, MeasureRequest, RankRequest, SearchRequest, StudyRequest, run_search,
    )
    from ..tasks import CLASSIFICATION, get_task
    from ..training import Recipe

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    asked = BudgetRequest(ratio=budget, ms=budget_ms)  # refuses a bad budget before any work
    the_task = get_task(task)
    if out_dir is None:  # one folder per model and budget, so a second budget never resumes the first
        method = "" if strategy == "cait" else f"-{strategy}"
        method = method if the_task is CLASSIFICATION else f"-seg{method}"
        out_dir = Path("results") / f"{model or DEFAULT_MODEL}{method}-{asked.label}"
    check_output_dir(out_dir)
    req = SearchRequest(
        out=out_dir, budget=asked, strategy=strategy, task=the_task.name, model=model, img_size=img_size, checkpoint=checkpoint, seed=seed,
        data=DataRequest(source=data, calib_size=calib_size, proxy_size=proxy_size, val_size=val_size,
                         train_limit=train_limit, test_limit=test_limit),
        study=StudyRequest(trials=trials, minutes=search_minutes, sampler=sampler, storage=storage, name=study_name),
        rank=RankRequest(finalists=finalists, tune_steps=tune_steps),
        measure=MeasureRequest(profile=profile, remeasure=remeasure, repeats=repeats, threads=threads,
                               allow_foreign_profile=allow_foreign_profile),
        recipe=Recipe(epochs=epochs, batch_size=batch_size, seed=seed),
        retrain_top=retrain_top, minutes=minutes, device=device, progress=not no_progress, echo=not as_json,
    )
    summary = run_search(req)
    if as_json:
        emit_json(summary)
        return
    dense = summary["dense"]
    score = "acc" if the_task is CLASSIFICATION else the_task.metric_label
    rows = [("dense", "", _pct(dense.get("val_accuracy")), _pct(dense["accuracy"]), f"{dense['latency_ms']:.3g}",
             f"{dense['predicted_latency_ms']:.3g}", "1.00x", "")]
    rows += [(f"{c['trial']}" + (" DEPLOY" if i == 0 else ""), c.get("family", ""), _pct(c["val_accuracy"]),
              _pct(c["accuracy"]), f"{c['latency_ms']:.3g}", f"{c['predicted_latency_ms']:.3g}",
              f"{c['speedup']:.2f}x", "yes" if c["retrained"] else "no") for i, c in enumerate(summary["candidates"])]
    print_table(f"{summary['model']} ({summary['strategy']}) under {summary['budget']['ratio']:.2f}x dense "
                f"({summary['budget']['ms']:.3g} ms, batch {summary['batch_size']}, {summary['device']})",
                ("trial", "family", f"val {score}", f"test {score}", "ms", "predicted", "speedup", "retrained"),
                rows)
    for plan in summary.get("final_retraining", []):
        if plan.get("limited_by"):
            say(f"trial {plan['trial']} was retrained for {plan['steps']} of {plan['full_steps']} steps to fit "
                f"{plan['limited_by']} (about {plan['step_seconds']:.2f} s per step); --minutes 0 runs all {plan['epochs']} epochs.")
    if summary.get("teacher", {}).get("warning"):
        say(f"warning: {summary['teacher']['warning']}")
    if not summary["candidates"]:
        say(f"no candidate stayed within budget when measured here ({len(summary['over_budget'])} over); "
            "raise the budget, run more --trials or re-profile this machine.")
    say(f"results in {out_dir}/summary.json and {out_dir}/results.csv")


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2%}"
