"""Core speed figures (issue 2): overhead of the compressed path, cost of a merge step, and the
wall-clock speedup of half-MAC configs, each against the dense timm model timed in the same
interleaved run. Writes bench/results/core.json (BENCHMARKS.md: bench/write_benchmarks.py).

    .venv/bin/python bench/core_bench.py                 # DeiT-Tiny and DeiT-Small, batch 32 and 1
    .venv/bin/python bench/core_bench.py --only overhead # re-measure one section, keep the others

The overhead of the compressed path is its own A/B (stock timm vs `compress` with nothing
compressed, two models in one interleaved loop): in a loop of five models the allocator and cache
traffic of the others add a few percent of noise that is not the path's own cost.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from caitsearch import CompressionConfig, ModelSpec, compress, create_model, materialize
from caitsearch.compress.atme import TokenGrid
from caitsearch.io import atomic_write_text
from caitsearch.measure import measure_interleaved, set_threads, steady_allocator
from write_benchmarks import core_section  # one renderer for the console and BENCHMARKS.md

RESULTS = Path(__file__).parent / "results"

# (label, uniform-schedule arguments): each removes about half the MACs of DeiT-S/T at 224
CONFIGS = {
    "atme (merge only)": dict(keep_rate=1.0, merge_every=3, merge_fraction=0.25),
    "cdcp (prune only)": dict(keep_rate=0.5),
    "cait (both)": dict(keep_rate=0.75, merge_every=4, merge_fraction=0.25, merge_start=1),
}


def end_to_end(name: str, batch: int, repeats: int) -> list[dict]:
    dense = create_model(name)
    spec = ModelSpec.from_model(dense)
    x = torch.randn(batch, spec.in_chans, *spec.img_size)
    dense_macs = CompressionConfig.dense(spec).macs(spec)["total"]
    models = {"dense (timm)": (dense, 1.0)}
    for label, kwargs in CONFIGS.items():
        config = CompressionConfig.uniform(spec, **kwargs)
        models[label] = (materialize(compress(dense, config)).eval(), config.macs(spec)["total"] / dense_macs)
    timings = measure_interleaved({k: (lambda m=m: m(x)) for k, (m, _) in models.items()}, repeats=repeats, warmup=3)
    base = timings["dense (timm)"].median
    rows = []
    for label, (_, mac_ratio) in models.items():
        t = timings[label]
        speedup = base / t.median
        rows.append({"model": name, "batch": batch, "variant": label, "median_ms": t.median, "p90_ms": t.p90,
                     "spread": t.spread, "mac_ratio": mac_ratio, "speedup": speedup,
                     "realised": speedup * mac_ratio})
    return rows


def path_overhead(name: str, batch: int, repeats: int) -> list[dict]:
    """Stock timm against the compressed code path with nothing compressed, A/B."""
    dense = create_model(name)
    spec = ModelSpec.from_model(dense)
    same = compress(dense, CompressionConfig.dense(dense)).eval()
    x = torch.randn(batch, spec.in_chans, *spec.img_size)
    t = measure_interleaved({"timm": lambda: dense(x), "caitsearch": lambda: same(x)}, repeats=repeats, warmup=3)
    return [{"model": name, "batch": batch, "timm_ms": t["timm"].median, "caitsearch_ms": t["caitsearch"].median,
             "ratio": t["caitsearch"].median / t["timm"].median}]


def merge_cost(name: str, batch: int, repeats: int) -> list[dict]:
    """Time of one ATME step against the whole block it sits in (first merge, and a later one)."""
    dense = create_model(name)
    spec = ModelSpec.from_model(dense)
    rows = []
    for label, grid_hw, count in (("first merge, 14x14 -> 14x10", spec.grid, 4),
                                  ("later merge, 10x10 -> 10x8", (10, 10), 2)):
        h, w = grid_hw
        blocks = CompressionConfig.dense(spec).blocks
        blocks = [blocks[0].__class__(spec.head_dim, spec.head_dim, spec.mlp_hidden, "cols", count)] + blocks[1:]
        block = compress(dense, CompressionConfig.dense(spec).with_blocks(blocks)).vit.blocks[0].eval()
        tokens = torch.randn(batch, spec.num_prefix_tokens + h * w, spec.embed_dim)
        grid = TokenGrid(spec.num_prefix_tokens, h, w)
        if grid_hw != spec.grid:  # a grid that has merged before carries sizes and a bias
            ones = torch.ones(batch, h), torch.ones(batch, w) * 1.4
            grid = TokenGrid(spec.num_prefix_tokens, h, w, ones[0], ones[1]).with_bias(tokens.dtype)
        keys = torch.randn(batch, tokens.shape[1], spec.head_dim)
        timings = measure_interleaved({
            "block with merge": lambda: block(tokens, grid),
            "merge step": lambda: grid.merge(tokens, keys, "cols", count),
        }, repeats=repeats, warmup=3)
        rows.append({"model": name, "batch": batch, "case": label,
                     "block_ms": timings["block with merge"].median, "merge_ms": timings["merge step"].median,
                     "share": timings["merge step"].median / timings["block with merge"].median})
    return rows


SECTIONS = ("end_to_end", "merge_cost", "overhead")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224"])
    ap.add_argument("--batches", nargs="+", type=int, default=[32, 1])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=SECTIONS, nargs="+", default=list(SECTIONS),
                    help="sections to measure; the others are kept from an existing core.json")
    args = ap.parse_args()
    steady_allocator()
    threads = set_threads(args.threads)
    previous = json.loads((RESULTS / "core.json").read_text()) if (RESULTS / "core.json").exists() else {}
    results = {k: previous.get(k, []) for k in SECTIONS}
    for section in args.only:
        results[section] = []
    for name in args.models:
        for batch in args.batches:
            reps = args.repeats if batch > 1 else args.repeats * 4
            if "end_to_end" in args.only:
                results["end_to_end"] += end_to_end(name, batch, reps)
            if "overhead" in args.only:
                results["overhead"] += path_overhead(name, batch, reps + 5)
        if "merge_cost" in args.only:
            results["merge_cost"] += merge_cost(name, max(args.batches), args.repeats * 2)
        print(f"{name} done", flush=True)
    meta = {"cpu": platform.processor() or platform.machine(), "threads": threads, "torch": torch.__version__,
            "repeats": args.repeats}
    try:
        meta["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "core.json", json.dumps({"meta": meta, **results}, indent=1))
    print("\n".join(core_section({"meta": meta, **results})))  # BENCHMARKS.md: bench/write_benchmarks.py


if __name__ == "__main__":
    main()
