"""Files: written atomically (a killed process never leaves a half-written file behind), strict
JSON, the one safetensors writer for model weights, and the checks every command runs on its input
and output paths before any work, so that a run is never lost to a path it could not write."""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from .errors import CaitsearchError

if TYPE_CHECKING:  # torch loads only with the first weights written: the CLI answers bad input without it
    import torch


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary file beside `path`, renamed onto it only when the block ends without an error
    (e.g. after a check of the written file passed); otherwise removed, and `path` left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place."""
    with staged(path) as tmp:
        write(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def finite(data: Any) -> Any:
    """`data` with NaN and infinite floats replaced by None (JSON null)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def to_json(data: Any) -> str:
    """Standard JSON (NaN and Infinity, which other readers reject, become null); numpy and torch
    scalars as floats."""
    return json.dumps(finite(json.loads(json.dumps(data, default=float))), indent=1, allow_nan=False) + "\n"


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, to_json(data))


def save_weights(weights: "torch.nn.Module | Mapping[str, torch.Tensor]", path: Path) -> None:
    """A module's state dict (or a state dict) as safetensors, on the CPU, written atomically."""
    import torch
    from safetensors.torch import save_file

    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp)))


# ----- paths, checked before any work ---------------------------------------------------------------


def check_input_file(path: Path, what: str) -> Path:
    """Refuse a `what` (e.g. "config") at `path` that is missing or is a folder."""
    path = Path(path)
    if not path.exists():
        raise CaitsearchError(f"{what} {path} does not exist.")
    if path.is_dir():
        raise CaitsearchError(f"{what} {path} is a folder, not a file.")
    return path


def check_input_dir(path: Path, what: str) -> Path:
    """Refuse a `what` (e.g. "run folder") at `path` that is missing or is a file."""
    path = Path(path)
    if not path.exists():
        raise CaitsearchError(f"{what} {path} does not exist.")
    if not path.is_dir():
        raise CaitsearchError(f"{what} {path} is a file, not a folder.")
    return path


def check_output_dir(path: Path, what: str = "--out") -> Path:
    """Refuse an output folder that is a file or cannot be created or written (a file on its way,
    no write permission, a read-only file system); nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CaitsearchError(f"{what} {path} is a file, not a folder.")
    _check_creatable(path, what)
    return path


def check_output_file(path: Path, what: str = "--out") -> Path:
    """Refuse an output file that is a folder or cannot be written; nothing is created."""
    path = Path(path)
    if path.is_dir():
        raise CaitsearchError(f"{what} {path} is a folder, not a file.")
    _check_creatable(path.parent, what, shown=path)
    return path


def holds_files(folder: Path) -> bool:
    """Whether `folder` exists and holds anything but the temporary files a killed write leaves."""
    folder = Path(folder)
    return folder.is_dir() and any(not (p.name.startswith(".") and p.name.endswith(".tmp")) for p in folder.iterdir())


def _check_creatable(folder: Path, what: str, shown: Path | None = None) -> None:
    shown = shown or folder
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CaitsearchError(f"{what} {shown} cannot be written: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CaitsearchError(f"{what} {shown} cannot be written: no permission to write in {existing}.")
