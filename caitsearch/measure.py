"""Wall-clock measurement shared by `bench` and `profile`: warm-up, interleaved repeats, medians.

Timings on shared machines drift, so every comparison measures its candidates in one interleaved
loop (A B C, B C A, ...) and reports medians; ratios against a dense model timed in the same loop
are the figures to trust.
"""
from __future__ import annotations

import ctypes
import os
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

if TYPE_CHECKING:  # imported where used: `steady_allocator` runs at CLI start-up, before torch is needed
    import torch


@dataclass(frozen=True)
class Timing:
    """Per-call latency samples in milliseconds."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p90(self) -> float:
        s = sorted(self.samples)
        return s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]

    @property
    def spread(self) -> float:
        """Interquartile range over the median: a unitless noise figure."""
        if len(self.samples) < 4:
            return 0.0
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) / self.median

    def summary(self) -> dict:
        return {"median_ms": self.median, "p90_ms": self.p90, "spread": self.spread, "repeats": len(self.samples)}


def steady_allocator(threshold: int = 1 << 30) -> bool:
    """Keep freed CPU tensors in the heap instead of returning them to the OS (glibc `mallopt`).

    By default glibc serves large blocks with fresh `mmap`s and moves that threshold with what
    the process freed before, so the same model pays page faults or not depending on history: a
    compressed model, whose blocks differ in shape, paid up to 25% in one process and not in
    another. A fixed threshold makes timings repeatable and is faster for inference too (PyTorch's
    CPU tuning guide suggests a caching allocator for the same reason). Returns False where glibc
    is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, threshold) and libc.mallopt(m_trim_threshold, threshold))


def default_threads(threads: int | None = None) -> int:
    """`threads`, or every core this process may run on (what `set_threads` uses when not told)."""
    return threads or len(os.sched_getaffinity(0))


def set_threads(threads: int | None) -> int:
    """Fix the intra-op thread count (all cores by default) and return it."""
    import torch

    n = default_threads(threads)
    torch.set_num_threads(n)
    return n


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    import torch

    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return run


def measure_interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 20,
    warmup: int = 3,
    warmup_seconds: float = 0.5,
    device: torch.device | str = "cpu",
    max_repeats: int | None = None,
    target_spread: float | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Time each callable `repeats` times in rotating interleaved order after warm-up (by count
    and by time). With `target_spread`, keep adding rounds up to `max_repeats` until every entry's
    spread is below it."""
    import torch

    with torch.inference_mode():
        return _measure(fns, repeats, warmup, warmup_seconds, torch.device(device), max_repeats, target_spread, progress)


def _measure(fns, repeats, warmup, warmup_seconds, device, max_repeats, target_spread, progress) -> dict[str, Timing]:
    timer = _timer(device)
    names = list(fns)
    deadline = time.perf_counter() + warmup_seconds
    for i in range(10_000):
        for name in names:
            fns[name]()
        if i + 1 >= warmup and time.perf_counter() >= deadline:
            break
    samples: dict[str, list[float]] = {n: [] for n in names}
    limit = max(repeats, max_repeats or repeats)
    r = 0
    while r < limit:
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            samples[name].append(timer(fns[name]))
        r += 1
        if progress:
            progress()
        if r >= repeats and (target_spread is None or all(
            Timing(tuple(s)).spread <= target_spread for s in samples.values()
        )):
            break
    return {n: Timing(tuple(s)) for n, s in samples.items()}
