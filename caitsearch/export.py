"""Export of materialised compressed models, always checked against PyTorch after writing."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import CaitsearchError
from .io import atomic_write


def export_onnx(model: torch.nn.Module, path: Path, batch_size: int = 1, tolerance: float = 1e-3,
                opset: int = 18) -> dict:
    """Write `model` as ONNX through the dynamo exporter and compare onnxruntime with PyTorch."""
    import onnxruntime as ort

    model = model.eval().float().cpu()
    spec = model.spec
    x = torch.randn(batch_size, spec.in_chans, *spec.img_size)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, verbose=False)
        program.save(str(tmp))

    path = Path(path)
    atomic_write(path, write)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = torch.randn_like(x)
    got = session.run(None, {session.get_inputs()[0].name: check.numpy()})[0]
    with torch.no_grad():
        want = model(check).numpy()
    diff = float(np.abs(got - want).max())
    if not diff <= tolerance:
        raise CaitsearchError(f"ONNX output differs from PyTorch by {diff:.2e} (> {tolerance:g}); {path} is suspect.")
    return {"path": str(path), "format": "onnx", "bytes": path.stat().st_size, "max_abs_diff": diff,
            "batch_size": batch_size, "opset": opset}
