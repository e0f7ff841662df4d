"""The one runtime every timing of whole models uses: the profile's.

A latency profile is measured on one backend (torch-cpu, cuda, tensorrt), in one dtype, with a
number of CPU threads, with or without CUDA graphs, at one batch size. A latency compared with it
(re-measuring search candidates, `bench --profile`, `profile validate`) means something only when
it is timed the same way, so `Runtime` carries exactly those settings from the manifest, and
`time_models` times whole models on them through the backend that measured the profile:
`prepare` casts a copy (the caller's fp32 model is never touched) and captures a CUDA graph where
the profile used them, and the models run interleaved with medians taken, as the profile's own
end-to-end rows were.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from ..device import backend_device
from ..measure import Timing
from ..models import ModelSpec
from .backends import make_backend


@dataclass(frozen=True)
class Runtime:
    """How models are timed: backend, dtype, CPU threads (None: all cores), CUDA graphs, batch size."""

    backend: str = "torch-cpu"
    dtype: str = "fp32"
    threads: Optional[int] = None
    cuda_graphs: bool = False
    batch_size: int = 32

    @classmethod
    def of_profile(cls, manifest: Mapping, threads: Optional[int] = None) -> "Runtime":
        """The runtime a profile was measured on (`threads` overrides the profile's own count)."""
        return cls(backend=str(manifest.get("backend", "torch-cpu")), dtype=str(manifest.get("dtype", "fp32")),
                   threads=threads or manifest.get("threads"), cuda_graphs=bool(manifest.get("cuda_graphs", False)),
                   batch_size=int(manifest.get("batch_size", 32)))

    @classmethod
    def on_device(cls, device: torch.device, dtype: str, threads: Optional[int], batch_size: int) -> "Runtime":
        """Eager PyTorch on `device`: what `bench` times when no profile is involved."""
        return cls("torch-cpu" if device.type == "cpu" else "cuda", dtype, threads, False, batch_size)

    @property
    def device(self) -> torch.device:
        """Where it runs; refused in one sentence where that device is not visible here."""
        return backend_device(self.backend)

    def as_dict(self) -> dict:
        return asdict(self)

    def time_models(self, models: Mapping[str, nn.Module], spec: ModelSpec, repeats: int = 15, warmup: int = 2,
                    progress: Optional[Callable[[], None]] = None,
                    batch_size: Optional[int] = None) -> tuple[dict[str, Timing], dict]:
        """Time whole `models` on one random image batch, interleaved: per-model timings and the
        backend's telemetry (GPU clocks, throttling, attempts). The models stay as they are."""
        be = make_backend(self.backend, self.dtype, self.threads, self.cuda_graphs)
        x = be.tensor(batch_size or self.batch_size, spec.in_chans, *spec.img_size)
        fns = {name: be.prepare(model, (x,)) for name, model in models.items()}
        try:
            return be.measure(fns, repeats=repeats, warmup=warmup, progress=progress)
        finally:
            del fns
            be.release()
