"""Where and in which precision tensors live: the one table of dtype names, and device checks
(what this machine lacks for a GPU or TensorRT, said the same way by every command)."""
from __future__ import annotations

import torch

from .errors import CaitsearchError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = ("cpu", "cuda")


def resolve_dtype(name: str) -> torch.dtype:
    """`fp32`, `fp16` or `bf16` as a torch dtype."""
    if name not in DTYPES:
        raise CaitsearchError(f"--dtype must be one of {', '.join(DTYPES)}, not '{name}'.")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """`cpu` or `cuda`, refused when no GPU is visible."""
    if name not in DEVICES:
        raise CaitsearchError(f"--device must be cpu or cuda, not '{name}'.")
    if name == "cuda" and not torch.cuda.is_available():
        raise CaitsearchError("--device cuda needs an NVIDIA GPU with a CUDA build of torch; none is visible here.")
    return torch.device(name)


def backend_device(backend: str) -> torch.device:
    """The device a latency backend measures on (torch-cpu: the CPU; cuda, tensorrt: the GPU)."""
    device = torch.device("cpu" if backend == "torch-cpu" else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CaitsearchError(f"the profile was measured with {backend}, but no CUDA device is visible here.")
    return device


def gpu_missing() -> list[str]:
    """Why nothing can run on an NVIDIA GPU here (empty when something can)."""
    if torch.cuda.is_available():
        return []
    return [f"an NVIDIA GPU visible to a CUDA build of torch (torch {torch.__version__}, "
            f"CUDA {torch.version.cuda or 'none'}, sees none)"]


def tensorrt_missing() -> list[str]:
    """Why a TensorRT engine cannot be built and run here (empty when it can): no GPU, and/or no
    importable `tensorrt` (PyPI's wheels are stubs that fetch the real one from NVIDIA's index)."""
    missing = gpu_missing()
    try:
        import tensorrt  # noqa: F401
    except Exception:  # ImportError, or a stub wheel that failed to fetch its runtime
        missing.append("the TensorRT Python package (pip install tensorrt, which downloads it from NVIDIA)")
    return missing
