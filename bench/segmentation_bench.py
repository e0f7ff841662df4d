"""Segmentation transfer (issue 6): does a compressed backbone's unmerged patch map serve a dense
head as well as the dense model's, and how much faster is it? Per-pixel Fashion-MNIST labels
(caitsearch/segment.py), one light decoder per backbone trained with the same recipe on the frozen
backbone, mIoU on the test split, and backbone+head latency at batch 32 with every model in one
interleaved loop. Writes bench/results/segmentation.json and prints a Markdown table.

    .venv/bin/python bench/segmentation_bench.py --variant cait=RUN/candidates/trial-17 --variant atme=atme.json
    .venv/bin/python bench/segmentation_bench.py --train-limit 5000 --epochs 3 --variant uniform=uniform.json

A variant is LABEL=CANDIDATE_DIR (a retrained, materialised candidate: config.json +
model.safetensors) or LABEL=CONFIG.json (the config applied to the dense weights, channel
importance calibrated on training images, no retraining). Goal: at least 1.3x faster than dense
with mIoU at most 1 point lower.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from caitsearch import CaitViT, CaitsearchError, CompressionConfig, ModelSpec, compress, create_model, materialize
from caitsearch.compress import load_materialized
from caitsearch.io import atomic_write_text
from caitsearch.measure import measure_interleaved, set_threads, steady_allocator
from caitsearch.models import DEFAULT_MODEL, default_checkpoint
from caitsearch.profile.fingerprint import cpu_model
from caitsearch.segment import FOREGROUND_THRESHOLD, SegmentationModel, miou, segmentation_split, train_head

RESULTS = Path(__file__).parent / "results"
DENSE = "dense"
GOAL_SPEEDUP, GOAL_MIOU_DROP = 1.3, 1.0  # points


@dataclass(frozen=True)
class Variant:
    """One backbone to compare: `kind` is "dense", "candidate" (a folder) or "config" (a JSON file)."""

    label: str
    kind: str
    path: Optional[Path] = None


def parse_variant(text: str, taken: set[str]) -> Variant:
    """LABEL=PATH -> Variant, refusing with one line anything that cannot be loaded later, so a
    typo fails before minutes of feature extraction."""
    label, sep, raw_path = text.partition("=")
    label, path = label.strip(), Path(raw_path.strip())
    if not sep or not label or not raw_path.strip():
        raise SystemExit(f"--variant {text!r}: expected LABEL=CANDIDATE_DIR or LABEL=CONFIG.json.")
    if label == DENSE or label in taken:
        raise SystemExit(f"--variant {text!r}: label {label!r} is {'reserved' if label == DENSE else 'used twice'}.")
    if path.is_dir():
        missing = [f for f in ("config.json", "model.safetensors") if not (path / f).is_file()]
        if missing:
            raise SystemExit(f"--variant {text!r}: {path} is not a candidate folder (missing {', '.join(missing)}).")
        return Variant(label, "candidate", path)
    if path.is_file() and path.suffix == ".json":
        return Variant(label, "config", path)
    raise SystemExit(f"--variant {text!r}: {path} is neither a candidate folder nor a config .json file.")


def build_backbone(variant: Variant, dense: torch.nn.Module, spec: ModelSpec, calib: torch.Tensor) -> CaitViT:
    """The variant's materialised backbone (dense: the compressed code path with nothing compressed)."""
    if variant.kind == DENSE:
        return compress(dense, CompressionConfig.dense(spec)).eval()
    config_path = variant.path / "config.json" if variant.kind == "candidate" else variant.path
    config = CompressionConfig.load(config_path)
    if config.model != spec.name:
        raise SystemExit(f"variant {variant.label}: {config_path} is for {config.model}, the dense model is {spec.name}.")
    if variant.kind == "config":
        return materialize(compress(dense, config, calib)).eval()
    from safetensors.torch import load_file

    try:
        state = load_file(str(variant.path / "model.safetensors"))
    except Exception as e:  # a corrupt or truncated file
        raise SystemExit(f"variant {variant.label}: cannot read {variant.path / 'model.safetensors'}: {e}") from e
    return load_materialized(create_model(spec.name), config, state).eval()


def backbone_mac_ratio(backbone: CaitViT, spec: ModelSpec) -> float:
    return backbone.config.macs(spec)["total"] / CompressionConfig.dense(spec).macs(spec)["total"]


def markdown_table(rows: list[dict]) -> str:
    header = ["variant", "kind", "backbone MACs", "batch-32 ms", "speedup", "mIoU", "Δ mIoU (points)", "goal"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        goal = "" if r["kind"] == DENSE else ("met" if r["meets_goal"] else "**missed**")
        lines.append(f"| {r['label']} | {r['kind']} | {r['mac_ratio']:.3f}x | {r['median_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {100 * r['miou']:.2f}% | {r['miou_delta_points']:+.2f} | {goal} |")
    return "\n".join(lines)


def run(args: argparse.Namespace, variants: list[Variant]) -> dict:
    dense = create_model(args.model, checkpoint=args.checkpoint)
    spec = ModelSpec.from_model(dense)
    train_images, train_labels = segmentation_split("train", spec, limit=args.train_limit, seed=args.seed)
    test_images, test_labels = segmentation_split("test", spec, limit=args.test_limit, seed=args.seed)
    calib = train_images[:args.calib]
    models: dict[str, SegmentationModel] = {}
    rows = []
    for variant in variants:
        start = time.perf_counter()
        backbone = build_backbone(variant, dense, spec, calib)
        model = train_head(backbone, train_images, train_labels, epochs=args.epochs, seed=args.seed)
        seconds = time.perf_counter() - start
        score = miou(model, test_images, test_labels)
        models[variant.label] = model
        rows.append({"label": variant.label, "kind": variant.kind, "path": str(variant.path) if variant.path else None,
                     "mac_ratio": backbone_mac_ratio(backbone, spec), "miou": score, "train_seconds": seconds})
        print(f"{variant.label}: mIoU {100 * score:.2f}% (head trained in {seconds:.0f} s)", file=sys.stderr, flush=True)
    x = test_images[:args.batch]
    timings = measure_interleaved({label: (lambda m=m: m(x)) for label, m in models.items()},
                                  repeats=args.repeats, warmup=3)
    base_ms, base_miou = timings[DENSE].median, rows[0]["miou"]
    for row in rows:
        t = timings[row["label"]]
        row.update(t.summary())
        row["speedup"] = base_ms / t.median
        row["miou_delta_points"] = 100 * (row["miou"] - base_miou)
        row["meets_goal"] = None if row["kind"] == DENSE else (
            row["speedup"] >= GOAL_SPEEDUP and row["miou_delta_points"] >= -GOAL_MIOU_DROP)
    settings = {"model": spec.name, "checkpoint": str(args.checkpoint), "train_limit": args.train_limit,
                "test_images": len(test_images), "train_images": len(train_images), "epochs": args.epochs,
                "seed": args.seed, "calib": len(calib), "batch": args.batch, "repeats": args.repeats,
                "foreground_threshold": FOREGROUND_THRESHOLD, "goal": {"speedup": GOAL_SPEEDUP,
                                                                      "max_miou_drop_points": GOAL_MIOU_DROP}}
    meta = {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__}
    return {"meta": meta, "settings": settings, "rows": rows, "command": shlex.join(sys.argv)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=PATH",
                    help="a candidate folder (config.json + model.safetensors) or a config .json; repeatable")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="dense weights (default: the committed weights of the default model)")
    ap.add_argument("--train-limit", type=int, default=10000, help="seeded subset of the training images for the heads")
    ap.add_argument("--test-limit", type=int, default=None, help="seeded subset of the test images (default: all 10,000)")
    ap.add_argument("--epochs", type=int, default=5, help="head training epochs over the cached features")
    ap.add_argument("--calib", type=int, default=256, help="training images that calibrate a config variant's CDCP")
    ap.add_argument("--batch", type=int, default=32, help="batch size of the latency measurement")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "segmentation.json")
    args = ap.parse_args()
    for name in ("train_limit", "test_limit", "epochs", "calib", "batch", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1 (got {value}).")
    variants = [Variant(DENSE, DENSE)]
    for text in args.variant:
        variants.append(parse_variant(text, {v.label for v in variants}))
    if args.checkpoint is None:
        args.checkpoint = default_checkpoint(args.model)
        if args.checkpoint is None:
            raise SystemExit(f"{args.model} has no committed weights; pass --checkpoint with its dense weights.")
    steady_allocator()
    args.threads = set_threads(args.threads)
    try:
        result = run(args, variants)
    except CaitsearchError as e:
        raise SystemExit(str(e)) from None
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(markdown_table(result["rows"]))


if __name__ == "__main__":
    main()
