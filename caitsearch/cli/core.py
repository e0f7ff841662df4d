"""`inspect`, `bench` and `export`: look at a config, time it (on a profile's runtime where one is
involved), ship it."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..console import print_table, say
from ..errors import CaitsearchError
from ..io import check_input_dir, check_output_file
from .app import app, emit_json
if TYPE_CHECKING:
    from ..models import ModelSpec

from .options import (
    AllowForeignOpt, BatchOpt, BudgetOpt, CheckpointOpt, ConfigOpt, ImgSizeOpt, JsonOpt, ModelOpt, NumClassesOpt,
    ProfileOpt, StrategyOpt, ThreadsOpt, check_inputs,
)


def config_report(spec, config) -> dict:
    """Per-block grid, tokens, widths and MACs of a `CompressionConfig` on a `ModelSpec`, with totals against dense."""
    from ..config import CompressionConfig

    dense = CompressionConfig.dense(spec).macs(spec)
    macs = config.macs(spec)
    blocks = []
    for i, (b, sh, m) in enumerate(zip(config.blocks, config.shapes(spec), macs["blocks"])):
        blocks.append({
            "block": i, "merge": f"{b.merge_axis}:{b.merge_count}" if b.merge_count else "-",
            "grid_in": [sh.h_in, sh.w_in], "grid_out": [sh.h_out, sh.w_out],
            "tokens_in": sh.tokens_in, "tokens_out": sh.tokens_out,
            "keep_qk": b.keep_qk, "keep_v": b.keep_v, "keep_mlp": b.keep_mlp, "macs": m,
        })
    return {
        "model": spec.name, "img_size": list(spec.img_size), "blocks": blocks,
        "macs": macs["total"], "dense_macs": dense["total"], "mac_ratio": macs["total"] / dense["total"],
    }


@app.command()
def inspect(
    model: ModelOpt = None,
    img_size: ImgSizeOpt = None,
    config: ConfigOpt = None,
    num_classes: NumClassesOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a model's blocks under a compression config: grid, tokens, widths and MACs.

    A config is JSON, one entry per block:
    {"model": NAME, "img_size": [H, W], "blocks": [{"merge_axis": "none"|"cols"|"rows",
    "merge_count": 0, "keep_qk": 64, "keep_v": 64, "keep_mlp": 1536}, ...]}.
    merge_* removes grid columns/rows after the block's attention (ATME); keep_* are the per-head
    q/k and v widths and the MLP width kept (CDCP). Without --config the dense model is shown.

    Examples:

      caitsearch inspect --model deit_small_patch16_224

      caitsearch inspect --config results/run/candidate-0/config.json --json
    """
    check_inputs(config)
    from ..models import ModelSpec
    from .common import load_models

    dense, cfg, _ = load_models(model, img_size, config, num_classes=num_classes)
    spec = ModelSpec.from_model(dense)
    report = config_report(spec, cfg)
    report["params"] = sum(p.numel() for p in dense.parameters())
    if as_json:
        emit_json(report)
        return
    print_table(f"{spec.name} {spec.img_size[0]}x{spec.img_size[1]}: {spec.depth} blocks, "
                f"{spec.num_heads} heads of {spec.head_dim}, MLP {spec.mlp_hidden}",
                ("block", "merge", "grid in→out", "tokens in→out", "qk", "v", "mlp", "MMACs"),
                ((b["block"], b["merge"], f"{b['grid_in'][0]}x{b['grid_in'][1]}→{b['grid_out'][0]}x{b['grid_out'][1]}",
                  f"{b['tokens_in']}→{b['tokens_out']}", b["keep_qk"], b["keep_v"], b["keep_mlp"], f"{b['macs'] / 1e6:.1f}")
                 for b in report["blocks"]))
    say(f"total {report['macs'] / 1e9:.3f} GMACs per image = {report['mac_ratio']:.3f} x dense "
        f"({report['dense_macs'] / 1e9:.3f} GMACs)")


@app.command()
def bench(
    model: ModelOpt = None,
    config: ConfigOpt = None,
    strategy: StrategyOpt = None,
    budget: BudgetOpt = None,
    profile: ProfileOpt = None,
    img_size: ImgSizeOpt = None,
    checkpoint: CheckpointOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", "-b", min=1, help="Images per forward pass (default: the profile's, else 32).")] = None,
    repeats: Annotated[int, typer.Option(min=3, help="Timed calls per model (interleaved).")] = 20,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed calls per model before timing.")] = 3,
    threads: ThreadsOpt = None,
    device: Annotated[Optional[str], typer.Option(
        "--device", help="cpu or cuda (default: the profile's device where a profile is used, else cpu).")] = None,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="fp32, fp16 or bf16 (default: the profile's where a profile is used, else fp32).")] = None,
    allow_foreign_profile: AllowForeignOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Time the dense timm model and the materialised compressed model in one interleaved run.

    Both see the same random batch; after warm-up the two are called in alternating order and the
    medians compared. Without --config the compressed path runs with nothing compressed, which
    shows the overhead of the compressed code path itself. Where a latency profile is involved
    (--profile, or --budget, which reads one), both are timed the way that profile was measured:
    its backend, dtype, threads and CUDA graphs; otherwise eager PyTorch on --device in --dtype.

    Examples:

      caitsearch bench --config cfg.json --batch-size 32

      caitsearch bench --model deit_small_patch16_224 --batch-size 1 --json

      caitsearch bench --strategy tome --budget 0.6      # ToMe's r-schedule predicted at 0.6x dense

      caitsearch bench --config cfg.json --profile hw_profiles/deit_small_patch16_224_224x224_cuda_b32_fp16
    """
    check_inputs(config, checkpoint, profile)
    import torch

    from ..device import resolve_device, resolve_dtype
    from ..models import ModelSpec
    from .common import load_models

    if device is not None:
        resolve_device(device)  # a bad --device or --dtype is refused before any model is built
    if dtype is not None:
        resolve_dtype(dtype)
    # without --budget, --profile only says which runtime to time on (bench_runtime below)
    dense, cfg, compressed = load_models(model, img_size, config, checkpoint, strategy=strategy, budget=budget,
                                         profile=profile if budget is not None else None,
                                         allow_foreign=allow_foreign_profile)
    spec = ModelSpec.from_model(dense)
    runtime, profile_path = bench_runtime(spec, profile is not None or budget is not None, profile, device, dtype,
                                          threads, batch_size, allow_foreign_profile)
    timings, telemetry = runtime.time_models({"dense": dense, "compressed": compressed}, spec, repeats=repeats,
                                             warmup=warmup)
    n_threads, dev, dtype, batch_size = torch.get_num_threads(), runtime.device, runtime.dtype, runtime.batch_size
    macs = config_report(spec, cfg)
    speedup = timings["dense"].median / timings["compressed"].median
    result = {
        "model": spec.name, "batch_size": batch_size, "device": str(dev), "dtype": dtype, "threads": n_threads,
        "backend": runtime.backend, "cuda_graphs": runtime.cuda_graphs,
        "profile": str(profile_path) if profile_path else None, "telemetry": telemetry,
        "dense": timings["dense"].summary(), "compressed": timings["compressed"].summary(),
        "speedup": speedup, "mac_ratio": macs["mac_ratio"],
        # share of the MAC reduction that became wall-clock speedup (1.0 = all of it)
        "realised": speedup * macs["mac_ratio"],
        "config": cfg.to_dict(),
    }
    if as_json:
        emit_json(result)
        return
    graphs = ", CUDA graphs" if runtime.cuda_graphs else ""
    print_table(f"{spec.name}, batch {batch_size}, {dtype} on {runtime.backend}{graphs} ({n_threads} threads)"
                + (f"\nas profiled in {profile_path}" if profile_path else ""),
                ("model", "median ms", "p90 ms", "spread"),
                ((name, f"{s['median_ms']:.2f}", f"{s['p90_ms']:.2f}", f"{s['spread']:.1%}")
                 for name, s in ((n, result[n]) for n in ("dense", "compressed"))))
    say(f"speedup {speedup:.2f}x at {macs['mac_ratio']:.3f}x the MACs "
        f"({result['realised']:.2f} of the MAC reduction realised)")


def bench_runtime(spec: ModelSpec, use_profile: bool, profile: Optional[Path], device: Optional[str],
                  dtype: Optional[str], threads: Optional[int], batch_size: Optional[int],
                  allow_foreign: bool = False):
    """The runtime `bench` times on, and the profile it comes from (None without one): with
    `use_profile`, the profile's runtime (`profile`, else this machine's default profile), which
    --device and --dtype may only agree with; else eager PyTorch on --device in --dtype."""
    from ..device import resolve_device
    from ..profile import Runtime, find_profile

    if not use_profile:
        return Runtime.on_device(resolve_device(device or "cpu"), dtype or "fp32", threads, batch_size or 32), None
    prof = find_profile(spec, profile, allow_foreign=allow_foreign)
    runtime = Runtime.of_profile(prof.manifest, threads=threads)
    if device is not None and resolve_device(device).type != runtime.device.type:
        raise CaitsearchError(f"profile {prof.path} was measured on {runtime.backend}; bench times on its runtime, "
                              f"so drop --device {device}.")
    if dtype is not None and dtype != runtime.dtype:
        raise CaitsearchError(f"profile {prof.path} was measured in {runtime.dtype}; bench times on its runtime, "
                              f"so drop --dtype {dtype}.")
    if batch_size is not None:
        runtime = dataclasses.replace(runtime, batch_size=batch_size)
    return runtime, prof.path


@app.command()
def export(
    candidate: Annotated[Optional[Path], typer.Argument(
        help="A candidate folder of a search run (RUN/candidates/trial-N: config.json + model.safetensors).",
        show_default=False)] = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    checkpoint: CheckpointOpt = None,
    img_size: ImgSizeOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="onnx, torchscript or tensorrt (needs tensorrt and an NVIDIA GPU).")] = "onnx",
    out_path: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Output file (default: model.onnx, model.pt or model.engine).")] = None,
    batch_size: BatchOpt = 1,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32 or fp16 (fp16: an FP16 graph; TensorRT 11 takes FP16 this way).")] = "fp32",
    tolerance: Annotated[Optional[float], typer.Option(
        min=0, help="Largest allowed |exported - PyTorch| on the check batch (default: 1e-3 for fp32, 3e-2 for fp16).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Export the materialised compressed model (ATME included) and check it against PyTorch.

    Give a candidate folder from a search run, or a model/--config/--checkpoint. The file is loaded
    back with its own runtime (onnxruntime, torch.jit, TensorRT), run on a fresh random batch and
    compared with the PyTorch model; a larger difference than --tolerance is an error.

    Examples:

      caitsearch export results/search/candidates/trial-7 --format torchscript --out m.pt

      caitsearch export results/search/candidates/trial-7 --format onnx --dtype fp16 --out m16.onnx

      caitsearch export --config cfg.json --checkpoint ckpt.pth --format onnx --out deit_small_cait.onnx
    """
    if candidate is not None:
        if config is not None or checkpoint is not None:
            raise CaitsearchError("give either a candidate folder or --config/--checkpoint, not both.")
        check_input_dir(candidate, "candidate folder")
        if not (candidate / "config.json").is_file() or not (candidate / "model.safetensors").is_file():
            raise CaitsearchError(f"{candidate} is not a candidate folder (it needs config.json and model.safetensors).")
        config, checkpoint = candidate / "config.json", candidate / "model.safetensors"
    check_inputs(config, checkpoint)
    default_out = {"onnx": "model.onnx", "torchscript": "model.pt", "tensorrt": "model.engine"}
    if out_path is not None or fmt in default_out:
        check_output_file(out_path or Path(default_out[fmt]))
    from ..export import check_export, export_model
    from .common import load_models

    check_export(fmt, dtype, tolerance)  # before the model is built: a bad request costs nothing
    out_path = out_path or Path(default_out[fmt])
    dense, cfg, compressed = load_models(model, img_size, config, checkpoint)
    result = export_model(compressed, fmt, out_path, batch_size=batch_size, tolerance=tolerance, dtype=dtype)
    if as_json:
        emit_json(result)
    else:
        say(f"wrote {out_path} ({result['bytes'] / 1e6:.1f} MB, {fmt} {dtype}); max |{fmt} - PyTorch| "
            f"{result['max_abs_diff']:.2e} (tolerance {result['tolerance']:g})")
