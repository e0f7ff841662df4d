"""`profile` (measure a latency table on this machine) and `profile validate` (score its predictor)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..console import print_table, say
from ..defaults import DEFAULT_MODEL
from ..io import check_output_dir
from .app import app, emit_json, resumable
from .options import AllowForeignOpt, BatchOpt, DtypeOpt, ImgSizeOpt, JsonOpt, ModelOpt, NoProgressOpt, ThreadsOpt

profile_app = typer.Typer(no_args_is_help=False, rich_markup_mode="rich")
app.add_typer(profile_app, name="profile")


@profile_app.callback(invoke_without_command=True)
def profile(
    ctx: typer.Context,
    model: ModelOpt = None,
    img_size: ImgSizeOpt = None,
    backend: Annotated[str, typer.Option("--backend", help="torch-cpu, cuda (PyTorch) or tensorrt (one engine per block shape).")] = "torch-cpu",
    batch_size: BatchOpt = 32,
    dtype: DtypeOpt = "fp32",
    threads: ThreadsOpt = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Profile directory (default: hw_profiles/<model>_<H>x<W>_<backend>_b<batch>_<dtype>, or that name + -<device tag> when it holds another machine's profile).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Coarser table, fewer repeats: a smoke test in seconds, not a profile to trust.")] = False,
    cuda_graphs: Annotated[bool, typer.Option("--cuda-graphs", help="cuda backend: replay every measured module as a CUDA graph.")] = False,
    no_progress: NoProgressOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure the latency of every block shape the search space can produce, on this machine.

    The table is factored (attention by tokens and qk/v widths, MLP by tokens and hidden width,
    merge by tokens and axis, stem, head) and interpolated between sampled points; whole random
    configs are timed too, to fit the predictor's correction. Killing the command and running it
    again resumes where it stopped. The profile lands in a directory with table.parquet,
    table.csv and manifest.json (device fingerprint, settings, date).

    Examples:

      caitsearch profile --model deit_small_patch16_224 --batch-size 32 --threads 2

      caitsearch profile --backend cuda --dtype fp16 --model deit_tiny_patch16_224

      caitsearch profile validate hw_profiles/deit_small_patch16_224_224x224_torch-cpu_b32_fp32 --configs 50
    """
    if ctx.invoked_subcommand is not None:
        return
    resumable()
    if out_dir is not None:
        check_output_dir(out_dir)
    from ..profile import LatencyProfile, build_profile

    path = build_profile(model or DEFAULT_MODEL, img_size=img_size, backend=backend, batch_size=batch_size,
                         dtype=dtype, threads=threads, out=out_dir, quick=quick, progress=not no_progress,
                         cuda_graphs=cuda_graphs)
    summary = LatencyProfile.load(path).summary()
    if as_json:
        emit_json(summary)
        return
    say(f"profile {path}: {summary['rows']} entries, {summary['backend']} {summary['dtype']} batch "
        f"{summary['batch_size']}; dense model predicted {summary['dense_ms']:.2f} ms/batch "
        "(per-part factors " + ", ".join(f"{k} {v:.2f}" for k, v in summary["factors"].items()) + ")")


@profile_app.command()
def validate(
    profile_path: Annotated[Path, typer.Argument(metavar="PROFILE", help="Profile directory (or its manifest.json).")],
    configs: Annotated[int, typer.Option("--configs", min=2, help="Random configs to measure end to end.")] = 50,
    seed: Annotated[int, typer.Option("--seed", min=1, help="Seed of the random configs (0 is the one the correction was fitted on).")] = 1,
    allow_foreign: AllowForeignOpt = False,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where validation.json and validation.png go (default: the profile directory).")] = None,
    strategy: Annotated[Optional[str], typer.Option(
        "--strategy", help="Draw the configs from this strategy's space (cait, atme, cdcp, tome), or --configs from each "
                           "of the four with 'all', reported per family; writes validation-<strategy>.*")] = None,
    passes: Annotated[int, typer.Option(
        "--passes", min=1, help="Times each config is measured, in separately shuffled groups; with 2 or more the "
                                "first pass is also scored against the second (the machine's own noise).")] = 2,
    no_progress: NoProgressOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure random configs end to end and score the profile's latency predictions.

    Reports MAPE, the share of configs within ±5% and ±10% of the measured latency, the signed
    mean error (positive: the search overcharges such configs) and the Spearman rank correlation,
    per family with --strategy all, and writes a predicted-vs-measured scatter plot. Each config
    is measured --passes times and judged by their geometric mean; the "retest" line scores one
    pass against the other: how repeatable the timings are here (configs of one family whose
    latencies lie within a few percent of each other cannot be ranked much better than that).

    Example:

      caitsearch profile validate hw_profiles/deit_fmnist_patch4_32_32x32_torch-cpu_b32_fp32 --configs 50

      caitsearch profile validate hw_profiles/deit_small_patch16_224_224x224_torch-cpu_b32_fp32 --strategy all --configs 40
    """
    if out_dir is not None:
        check_output_dir(out_dir)
    from ..profile import validate_profile

    result = validate_profile(profile_path, configs=configs, seed=seed, allow_foreign=allow_foreign,
                              out=out_dir, progress=not no_progress, strategy=strategy, passes=passes)
    if as_json:
        emit_json(result)
        return
    rows = [(f"{name} (vs dense)", r) for name, r in result.get("families", {}).items()]
    rows += [("all, vs dense in the same run" if rows else "vs dense in the same run", result),
             ("absolute ms", result["absolute"])]
    print_table(f"{result['model']} on {result['backend']}, batch {result['batch_size']} {result['dtype']}: "
                f"{result['configs']} random configs",
                ("configs", "measured", "MAPE", "within ±5%", "within ±10%", "signed mean", "Spearman", "worst"),
                ((r["configs"], label, f"{r['mape_pct']:.1f}%", f"{r['within_5pct']:.0%}", f"{r['within_10pct']:.0%}",
                  f"{r['signed_mean_error_pct']:+.1f}%", f"{r['spearman']:.3f}", f"{r['max_error_pct']:.1f}%")
                 for label, r in rows))
    if "retest" in result:
        say("retest (first pass predicting the second, the noise floor), Spearman: "
            + ", ".join(f"{name} {r['spearman']:.3f}" for name, r in result["retest"].items())
            + "; within ±5%: " + ", ".join(f"{name} {r['within_5pct']:.0%}" for name, r in result["retest"].items()))
    lo, hi = result["drift_factor_range"]
    say(f"machine drift during validation (profile's dense / dense measured beside each group): {lo:.3f}-{hi:.3f}")
    say(f"scatter plot: {result['plot']}")
