"""`report` and `compare`: read run folders and write plots, tables and documents about them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..console import print_table, say
from ..errors import CaitsearchError
from ..io import check_input_dir, check_output_dir
from .app import app, emit_json
from .options import JsonOpt

FormatsOpt = Annotated[str, typer.Option(
    "--format", "-f", help="Comma-separated outputs: md (Markdown + PNGs), html (self-contained), csv, parquet, json.")]


def _print_written(written: dict[str, Path], as_json: bool, extra: dict) -> None:
    if as_json:
        emit_json({**extra, "files": {k: str(v) for k, v in written.items()}})
        return
    for name, path in written.items():
        say(f"wrote {path}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder written by `caitsearch search --out`.", show_default=False)],
    formats: FormatsOpt = "md,html",
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write (default: RUN/report).")] = None,
    storage: Annotated[Optional[str], typer.Option(
        "--storage", help="Read the trials from this Optuna storage URL (sqlite:///..., postgresql://...) instead of RUN.")] = None,
    study_name: Annotated[Optional[str], typer.Option(
        "--study-name", help="Study name inside --storage (default: the run's).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Report one search run: which candidate to deploy, and why.

    Writes the latency-accuracy plot (every trial's proxy vs predicted latency with the uniform
    baselines; re-measured candidates' test accuracy vs measured latency with the dense model, the
    budget line, the Pareto front, and the recommended candidate annotated: the most accurate one
    measured within budget), a per-block schedule picture per candidate, the candidates table,
    the environment the latencies hold for, and the commands that reproduce the run. An unfinished
    run, or one with no candidate within budget, still reports and says so.

    Examples:

      caitsearch report results/search

      caitsearch report results/search --format html,csv --out /tmp/rep

      caitsearch report results/search --storage postgresql://user@db-host/optuna
    """
    check_input_dir(run_dir, "run folder")
    check_output_dir(out_dir or run_dir / "report")
    from ..report import load_run, parse_formats, write_report

    wanted = parse_formats(formats)
    run = load_run(run_dir, storage=storage, study_name=study_name)
    written = write_report(run, out_dir or run_dir / "report", wanted)
    rec = run.recommended
    if not as_json:
        for note in run.notes:
            say(f"note: {note}")
        if rec:
            say(f"recommended: trial {rec['trial']}, {rec['accuracy']:.1%} test accuracy, "
                f"{rec['speedup']:.2f}x faster than dense ({rec.get('path', '')})")
    _print_written(written, as_json, {"recommended": rec, "notes": run.notes})


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders to put side by side.", show_default=False)],
    formats: FormatsOpt = "md,html",
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where to write the comparison.")] = Path("compare"),
    as_json: JsonOpt = False,
) -> None:
    """Compare several runs (budgets, devices, samplers) in one table and one plot.

    The plot shows test accuracy against speedup over each run's own dense model, so runs timed on
    different devices or batch sizes sit on one axis; each run's budget is a dashed line.

    Examples:

      caitsearch compare results/cpu-0.6 results/cpu-0.8 results/gpu-0.6 --out results/compare
    """
    for path in run_dirs:
        check_input_dir(path, "run folder")
    twice = next((p for i, p in enumerate(run_dirs) if p.resolve() in {q.resolve() for q in run_dirs[:i]}), None)
    if twice is not None:
        raise CaitsearchError(f"run folder {twice} is given twice; compare distinct runs.")
    check_output_dir(out_dir)
    from ..report import compare_table, load_run, parse_formats, write_compare

    wanted = parse_formats(formats)
    runs = [load_run(p) for p in run_dirs]
    written = write_compare(runs, out_dir, wanted)
    frame = compare_table(runs)
    if not as_json:
        columns = ("run", "device", "batch_size", "budget_ratio", "sampler", "trials", "candidates", "recommended",
                   "accuracy", "speedup")
        print_table("runs compared", columns, ([_cell(r[c]) for c in columns] for _, r in frame.iterrows()))
    _print_written(written, as_json, {"runs": json.loads(frame.to_json(orient="records"))})


def _cell(v) -> str:
    import math

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3g}" if isinstance(v, float) else str(v)
