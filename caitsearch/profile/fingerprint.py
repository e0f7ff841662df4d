"""Device fingerprints: what must match for a latency profile to describe this machine.

Only stable facts go in (CPU model, logical cores, threads, library versions; GPU name, UUID,
driver, CUDA): never clocks, load or temperatures, so re-running on the same machine matches.
"""
from __future__ import annotations

import os
import platform
from typing import Optional

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _tensorrt_version() -> Optional[str]:
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except ImportError:
        return None


def _nvidia_driver() -> Optional[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, no driver: the field just stays empty
        return None


def fingerprint(backend: str, threads: Optional[int]) -> dict:
    """The stable identity of the device a `backend` measures on."""
    import timm

    fp = {
        "backend": backend,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    if backend == "torch-cpu":
        fp.update(cpu=cpu_model(), logical_cores=os.cpu_count(), threads=threads)
    else:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        fp.update(gpu=props.name, gpu_uuid=str(getattr(props, "uuid", "")), driver=_nvidia_driver(),
                  cuda=torch.version.cuda, compute_capability=f"{props.major}.{props.minor}")
        if backend == "tensorrt":
            fp["tensorrt"] = _tensorrt_version()
    return fp


def differences(a: dict, b: dict) -> list[str]:
    """Human-readable `key: profile -> here` for every field that differs."""
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
