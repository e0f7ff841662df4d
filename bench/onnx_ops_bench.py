"""What each compression family hands TensorRT: the ONNX op counts of ATME-only, CDCP-only, joint
and ToMe configs of a model, and `export.tensorrt_audit`'s concerns (scatters with a reduction,
data-dependent shapes, TopK limits, non-static values). TensorRT cannot be installed where this
was written, so this reading of the graphs is what stands in for building engines. Writes
bench/results/onnx_ops.json (BENCHMARKS.md: bench/write_benchmarks.py).

    .venv/bin/python bench/onnx_ops_bench.py                       # the default model and DeiT-Small
    .venv/bin/python bench/onnx_ops_bench.py --models deit_tiny_patch16_224
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import onnx
import torch

from caitsearch import CompressionConfig, ModelSpec, compress, create_model, materialize
from caitsearch.export import export_onnx, tensorrt_audit
from caitsearch.io import atomic_write_text
from caitsearch.models import DEFAULT_MODEL

RESULTS = Path(__file__).parent / "results"

# (family, uniform-schedule arguments or the ToMe r); the same families tests/test_onnx_ops.py audits
FAMILIES = {
    "atme": dict(keep_rate=1.0, merge_every=2),
    "cdcp": dict(keep_rate=0.5),
    "joint": dict(keep_rate=0.75, merge_every=2),
    "tome": 4,
}
# ops that are not plain tensor algebra: where a runtime might need something special
NOTABLE = ("TopK", "ArgMax", "ScatterElements", "ScatterND", "GatherElements", "GatherND", "CumSum", "Where",
           "NonZero", "Unique", "Compress", "Loop", "If")


def config_for(spec: ModelSpec, family: str) -> CompressionConfig:
    arg = FAMILIES[family]
    return CompressionConfig.tome(spec, arg) if family == "tome" else CompressionConfig.uniform(spec, **arg)


def audit(name: str, batch: int, opset: int) -> dict:
    torch.manual_seed(0)
    dense = create_model(name).eval()
    spec = ModelSpec.from_model(dense)
    calib = torch.randn(8, spec.in_chans, *spec.img_size)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES:
            config = config_for(spec, family)
            model = materialize(compress(dense, config, calib)).eval()
            path = Path(tmp) / f"{family}.onnx"
            # ToMe's argsort is discontinuous: with random weights, near-equal scores can order differently in
            # onnxruntime and merge another pair (seen on DeiT-Small: 4.6e-3, the same before and after e69e422)
            check = export_onnx(model, path, batch_size=batch, opset=opset, tolerance=5e-2 if family == "tome" else None)
            found = tensorrt_audit(path)
            rows[family] = {"config": config.to_dict(), "max_abs_diff_vs_pytorch": check["max_abs_diff"],
                            "nodes": sum(found["ops"].values()), "ops": found["ops"],
                            "notable": {op: n for op, n in found["ops"].items() if op in NOTABLE},
                            "topk_k": found["topk_k"], "concerns": found["concerns"],
                            "tensorrt_native": not found["concerns"]}
            print(f"{spec.name} {family:6s} {rows[family]['nodes']:4d} nodes, notable {rows[family]['notable']}, "
                  f"concerns {found['concerns'] or 'none'}", flush=True)
    return {"model": spec.name, "img_size": list(spec.img_size), "families": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[DEFAULT_MODEL, "deit_small_patch16_224"])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--opset", type=int, default=18)
    args = ap.parse_args()
    result = {"models": [audit(name, args.batch_size, args.opset) for name in args.models]}
    result["meta"] = {"torch": torch.__version__, "onnx": onnx.__version__, "opset": args.opset,
                      "batch_size": args.batch_size, "exporter": "torch.onnx.export(dynamo=True)",
                      "tensorrt": "not installed: never built or run here",
                      "note": "Before merge_matrix lost its scatter_add_ (commit e69e422), ATME graphs held one "
                              "ScatterElements with reduction=add per merge step and ToMe graphs one per block"}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "onnx_ops.json", json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
