"""Where a retraining step's time goes on this machine, and what the usual levers buy (issue 13,
item 4): the default model's distillation step (batch 128, a cait config near 0.6x dense) split
into loading the batch, the teacher's forward pass and the student's forward, backward and AdamW
step; then the whole step with 1 and 2 threads, under bf16 autocast, and with the student under
`torch.compile`. Every variant is timed in one interleaved loop (medians), so a shared machine's
drift hits them alike. Writes bench/results/train_step.json and prints a Markdown table.

    .venv/bin/python bench/train_step_bench.py                 # about 5 minutes on a 2-core CPU
    .venv/bin/python bench/train_step_bench.py --steps 10 --skip-compile
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from caitsearch.data import load_dataset
from caitsearch.io import atomic_write_text
from caitsearch.measure import steady_allocator
from caitsearch.models import DEFAULT_MODEL, model_spec
from caitsearch.profile.fingerprint import cpu_model
from caitsearch.search.schedule import strategy_config
from caitsearch.training import Recipe, Retraining, load_teacher
from caitsearch.training.loop import load_batch
from caitsearch.training.retrain import distillation_loss

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant (after 2 untimed)")
    ap.add_argument("--budget", type=float, default=0.6, help="the cait config: uniform schedule at this latency ratio")
    ap.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile variant")
    args = ap.parse_args()
    steady_allocator()
    torch.set_num_threads(2)
    spec = model_spec(DEFAULT_MODEL)
    splits = load_dataset("fashion-mnist", spec, train_limit=4096, test_limit=256, val_size=256)
    teacher = load_teacher(DEFAULT_MODEL, img_size=spec.img_size, num_classes=splits.num_classes).model.eval()
    config = strategy_config(spec, "cait", args.budget, None, None, True)
    recipe = Recipe(batch_size=128)
    with tempfile.TemporaryDirectory(prefix="train-step-bench-") as out:  # nothing is saved: no step goes through fit
        job = Retraining(teacher, config, splits, recipe, Path(out))
    student, masks = job.student, job.masks
    masks.attach(True)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    loss_fn = distillation_loss(recipe, teacher)
    rows = torch.arange(recipe.batch_size)
    x, y = load_batch(splits.train, rows)

    def step(net, autocast: bool = False) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = loss_fn(net, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def student_only() -> None:
        loss = torch.nn.functional.cross_entropy(student(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(x)

    variants = {  # name -> (threads, one call)
        "load batch (128 images, augmented)": (2, lambda: load_batch(splits.train, rows)),
        "teacher forward": (2, teacher_forward),
        "student forward+backward+AdamW": (2, student_only),
        "whole step, 2 threads": (2, lambda: step(student)),
        "whole step, 2 threads, bf16 autocast": (2, lambda: step(student, autocast=True)),
        "whole step, 1 thread": (1, lambda: step(student)),
    }
    compile_seconds = None
    if not args.skip_compile:
        began = time.perf_counter()
        try:
            compiled = torch.compile(student)
            step(compiled)  # compiles
            compile_seconds = time.perf_counter() - began
            variants["whole step, 2 threads, torch.compile"] = (2, lambda: step(compiled))
        except Exception as e:  # report, do not hide: the loop stays eager where compile fails
            compile_seconds = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.steps + 2):
        for name, (threads, fn) in variants.items():
            torch.set_num_threads(threads)
            began = time.perf_counter()
            fn()
            if i >= 2:
                times[name].append(time.perf_counter() - began)
    base = statistics.median(times["whole step, 2 threads"])
    result = {
        "cpu": cpu_model(), "torch": torch.__version__, "batch_size": recipe.batch_size, "steps": args.steps,
        "config_budget": args.budget, "compile_seconds": compile_seconds,
        "cpu_bf16": cpu_bf16(),
        "variants": {name: {"median_s": statistics.median(t), "vs_whole_step": statistics.median(t) / base,
                            "threads": variants[name][0]} for name, t in times.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "train_step.json", json.dumps(result, indent=2) + "\n")
    print(f"retraining step of {DEFAULT_MODEL}, batch {recipe.batch_size}, on {result['cpu']} "
          f"(medians of {args.steps} interleaved steps)\n")
    print("| part / variant | threads | median s | vs whole step (2 threads) |\n| --- | ---: | ---: | ---: |")
    for name, r in result["variants"].items():
        print(f"| {name} | {r['threads']} | {r['median_s']:.3f} | {r['vs_whole_step']:.2f}x |")
    if compile_seconds is not None:
        print(f"\ntorch.compile: {compile_seconds if isinstance(compile_seconds, str) else f'{compile_seconds:.0f} s to compile'}")
    return 0


def cpu_bf16() -> list[str]:
    """The CPU's bf16 instruction sets (AVX512-BF16, AMX-BF16): without one, bf16 autocast is emulated."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16"))


if __name__ == "__main__":
    sys.exit(main())
