"""Files written atomically (a killed process never leaves a half-written file behind), strict
JSON, and the one safetensors writer for model weights."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:  # torch loads only with the first weights written: the CLI answers bad input without it
    import torch


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def to_json(data: Any) -> str:
    """Standard JSON (no NaN or Infinity, which other readers reject); numpy and torch scalars as floats."""
    return json.dumps(data, indent=1, default=float, allow_nan=False) + "\n"


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, to_json(data))


def save_weights(weights: "torch.nn.Module | Mapping[str, torch.Tensor]", path: Path) -> None:
    """A module's state dict (or a state dict) as safetensors, on the CPU, written atomically."""
    import torch
    from safetensors.torch import save_file

    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp)))
