"""Export of materialised compressed models, always checked against PyTorch after writing.

Every format follows one path: write a temporary file beside the output, load it back with its own
runtime, run a fresh random batch through it and through the PyTorch model (fp32), and refuse it when
the largest difference exceeds the tolerance; only a file that passed is renamed onto the output, so
a failed export never replaces a good file. Formats: ONNX (onnxruntime check; `dtype="fp16"` writes
an FP16 graph, which is how TensorRT 11 gets FP16 since it has no FP16 builder flag), TorchScript
(traced: ATME's shapes are static, so tracing is exact), and TensorRT (an engine built from the
ONNX file; needs the `tensorrt` package and an NVIDIA GPU, and has never run on the machines this
was written on). `tensorrt_audit` reads an ONNX file for what TensorRT would not run natively,
which is what can be checked without TensorRT.
"""
from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .device import DTYPES, tensorrt_missing
from .errors import CaitsearchError
from .io import staged

FORMATS = ("onnx", "torchscript", "tensorrt")
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}  # largest |exported - PyTorch fp32| on the check batch


def _inputs(model: torch.nn.Module, batch_size: int) -> torch.Tensor:
    spec = model.spec
    return torch.randn(batch_size, spec.in_chans, *spec.img_size)


def check_against_pytorch(model: torch.nn.Module, run: Callable[[torch.Tensor], np.ndarray], path: Path, fmt: str,
                          batch_size: int, tolerance: float) -> float:
    """Largest |run(x) - model(x)| on a fresh batch; raises when it exceeds `tolerance`."""
    check = _inputs(model, batch_size)
    got = np.asarray(run(check), dtype=np.float32)
    with torch.no_grad():
        want = model(check).float().numpy()
    if got.shape != want.shape:
        raise CaitsearchError(f"{fmt} output has shape {got.shape}, PyTorch {want.shape}; {path} was not written.")
    diff = float(np.abs(got - want).max())
    if not diff <= tolerance:
        raise CaitsearchError(f"{fmt} output differs from PyTorch by {diff:.2e} (> --tolerance {tolerance:g}); "
                              f"{path} was not written.")
    return diff


def check_export(fmt: str, dtype: str, tolerance: Optional[float]) -> None:
    """Refuse, before any work, a format, dtype or tolerance no export could honour."""
    if fmt not in WRITERS:
        raise CaitsearchError(f"--format must be one of {', '.join(FORMATS)}, not '{fmt}'.")
    _dtype(dtype)
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise CaitsearchError(f"--tolerance must be a finite number of at least 0, not {tolerance:g}.")


def _dtype(dtype: str) -> torch.dtype:
    """The exportable dtypes: those with a tolerance for the check against PyTorch."""
    if dtype not in TOLERANCE:
        raise CaitsearchError(f"export --dtype must be one of {', '.join(TOLERANCE)}, not '{dtype}'.")
    return DTYPES[dtype]


def _result(path: Path, fmt: str, diff: float, batch_size: int, dtype: str, tolerance: float, **extra) -> dict:
    return {"path": str(path), "format": fmt, "bytes": path.stat().st_size, "max_abs_diff": diff,
            "tolerance": tolerance, "batch_size": batch_size, "dtype": dtype, **extra}


def _write_onnx(model: torch.nn.Module, path: Path, batch_size: int, dtype: str, opset: int) -> None:
    dt = _dtype(dtype)
    net = copy.deepcopy(model).to(dt) if dt != torch.float32 else model
    x = _inputs(model, batch_size).to(dt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (x,), dynamo=True, opset_version=opset, verbose=False)
    program.save(str(path))


def export_onnx(model: torch.nn.Module, path: Path, batch_size: int = 1, tolerance: Optional[float] = None,
                opset: int = 18, dtype: str = "fp32") -> dict:
    """Write `model` as ONNX through the dynamo exporter and compare onnxruntime with PyTorch."""
    import onnxruntime as ort

    model, path = model.eval().float().cpu(), Path(path)
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    with staged(path) as tmp:
        _write_onnx(model, tmp, batch_size, dtype, opset)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        feed = session.get_inputs()[0].name
        np_dtype = np.float16 if dtype == "fp16" else np.float32
        diff = check_against_pytorch(model, lambda x: session.run(None, {feed: x.numpy().astype(np_dtype)})[0], path,
                                     "ONNX", batch_size, tolerance)
    return _result(path, "onnx", diff, batch_size, dtype, tolerance, opset=opset)


def export_torchscript(model: torch.nn.Module, path: Path, batch_size: int = 1, tolerance: Optional[float] = None,
                       dtype: str = "fp32") -> dict:
    """Trace `model` to TorchScript, reload the file and compare it with PyTorch."""
    model, path = model.eval().float().cpu(), Path(path)
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    dt = _dtype(dtype)
    net = copy.deepcopy(model).to(dt) if dt != torch.float32 else model
    with staged(path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit's deprecation notices
            traced = torch.jit.trace(net, _inputs(model, batch_size).to(dt))
            torch.jit.save(traced, str(tmp))
            loaded = torch.jit.load(str(tmp), map_location="cpu")

        def run(x: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return loaded(x.to(dt)).float().numpy()

        diff = check_against_pytorch(model, run, path, "TorchScript", batch_size, tolerance)
    return _result(path, "torchscript", diff, batch_size, dtype, tolerance)


def export_tensorrt(model: torch.nn.Module, path: Path, batch_size: int = 1, tolerance: Optional[float] = None,
                    dtype: str = "fp32", opset: int = 18) -> dict:
    """Build a serialized TensorRT engine from the ONNX export (written beside it as PATH.onnx),
    run it on the GPU and compare with PyTorch. Untested here: no GPU or TensorRT on the dev machine."""
    missing = tensorrt_missing()
    if missing:
        raise CaitsearchError(f"--format tensorrt needs tensorrt and an NVIDIA GPU: {' and '.join(missing)}.")
    import tensorrt as trt

    model, path = model.eval().float().cpu(), Path(path)
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    onnx_path = path.with_suffix(".onnx")
    with staged(onnx_path) as onnx_tmp, staged(path) as tmp:  # both renamed into place only once the check passed
        _write_onnx(model, onnx_tmp, batch_size, dtype, opset)  # FP16 lives in the graph, not in a builder flag
        diff = _build_and_check_engine(trt, model, onnx_tmp, tmp, path, batch_size, dtype, tolerance)
    return _result(path, "tensorrt", diff, batch_size, dtype, tolerance, onnx=str(onnx_path),
                   tensorrt=trt.__version__)


def _build_and_check_engine(trt, model: torch.nn.Module, onnx_path: Path, engine_path: Path, path: Path,
                            batch_size: int, dtype: str, tolerance: float) -> float:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CaitsearchError(f"TensorRT cannot parse the ONNX export of {path}: {errors[:300]}")
    engine_bytes = builder.build_serialized_network(network, builder.create_builder_config())
    if engine_bytes is None:
        raise CaitsearchError(f"TensorRT failed to build an engine for {path} (see its log above).")
    engine_path.write_bytes(bytes(engine_bytes))
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    outp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    dt = _dtype(dtype)

    def run(x: torch.Tensor) -> np.ndarray:
        x = x.to("cuda", dt).contiguous()
        y = torch.empty(tuple(engine.get_tensor_shape(outp)), device="cuda", dtype=dt)
        context.set_tensor_address(inp, x.data_ptr())
        context.set_tensor_address(outp, y.data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise CaitsearchError(f"TensorRT engine {path} failed to run.")
        stream.synchronize()
        return y.float().cpu().numpy()

    return check_against_pytorch(model, run, path, "TensorRT", batch_size, tolerance)


# ONNX ops whose output shape depends on tensor values, or that branch on them: TensorRT needs
# data-dependent shapes (or plugins) for these, and a static engine per shape is the point here
DATA_DEPENDENT_OPS = ("NonZero", "Unique", "Compress", "NonMaxSuppression", "If", "Loop", "Scan")
TOPK_LIMIT = 3840  # TensorRT's largest K for TopK


def onnx_op_counts(path: Path) -> dict[str, int]:
    """How often each op type occurs in the ONNX graph at `path` (nested functions included)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in [*model.graph.node, *(n for f in model.functions for n in f.node)]:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def tensorrt_audit(path: Path) -> dict:
    """What in the ONNX graph at `path` TensorRT would not run natively as one static engine:
    scatters with a reduction (a plugin), ops with data-dependent output shapes or control flow,
    TopK without a constant K below 3840, and values whose shape ONNX shape inference cannot pin
    down. Returns {"ops", "topk_k", "concerns"}; an empty `concerns` is a graph TensorRT parses
    into native layers (as far as a reading of the graph can tell: nothing here runs TensorRT)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(path), load_external_data=False)
    graph = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    concerns, ks = [], []
    for node in [*graph.node, *(n for f in model.functions for n in f.node)]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type in ("ScatterElements", "ScatterND") and attrs.get("reduction", b"none") != b"none":
            concerns.append(f"{node.op_type} with reduction={attrs['reduction'].decode()} (a TensorRT plugin)")
        elif node.op_type in DATA_DEPENDENT_OPS:
            concerns.append(f"{node.op_type} (data-dependent shape or control flow)")
        elif node.op_type == "TopK":
            k = constants.get(node.input[1])
            if k is None:
                concerns.append("TopK with a computed K")
            else:
                ks.append(int(k.reshape(-1)[0]))
                if ks[-1] >= TOPK_LIMIT:
                    concerns.append(f"TopK with K={ks[-1]} (TensorRT's limit is {TOPK_LIMIT - 1})")
    for value in [*graph.input, *graph.value_info, *graph.output]:
        t = value.type.tensor_type
        if not t.HasField("shape") or any(not d.HasField("dim_value") for d in t.shape.dim):
            concerns.append(f"value {value.name} has no static shape")
    return {"ops": onnx_op_counts(path), "topk_k": ks, "concerns": sorted(set(concerns))}


WRITERS = {"onnx": export_onnx, "torchscript": export_torchscript, "tensorrt": export_tensorrt}


def export_model(model: torch.nn.Module, fmt: str, path: Path, batch_size: int = 1, tolerance: Optional[float] = None,
                 dtype: str = "fp32") -> dict:
    """Write `model` in `fmt` (onnx, torchscript, tensorrt) and check it against PyTorch."""
    check_export(fmt, dtype, tolerance)
    return WRITERS[fmt](model, path, batch_size=batch_size, tolerance=tolerance, dtype=dtype)
