"""Where a profile measures: PyTorch on the CPU, PyTorch on CUDA, or TensorRT engines.

A backend turns a module and its example inputs into a zero-argument callable that runs one
forward pass in the deployed form (the backend's device and dtype, on a copy, so the caller's
model is never cast; on CUDA with `cuda_graphs`, one captured graph replayed), and times groups of
such callables interleaved (`measure.measure_interleaved`: warm-up by count and time, repeats
until the spread is small, median/p90/spread). On GPUs the timer is CUDA events, and NVML
telemetry (SM clock, temperature, power, throttle reasons) is sampled while a group runs; a group
that ran throttled is measured again. Block parts and whole models go through the same `prepare`.
"""
from __future__ import annotations

import copy
import hashlib
import io
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..device import DTYPES, gpu_missing, tensorrt_missing
from ..errors import CaitsearchError
from ..measure import Timing, measure_interleaved, set_threads, steady_allocator

BACKENDS = ("torch-cpu", "cuda", "tensorrt")

# NVML clock-event reasons that mean the GPU ran slower than it could (thermal, power, HW slowdown)
_THROTTLE_BITS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal",
                  0x80: "hw_power_brake"}


class Telemetry:
    """Samples NVML in a background thread while a measurement window is open."""

    def __init__(self, device_index: int = 0, interval: float = 0.02) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self._interval = interval
        self._samples: list[tuple[float, float, float, int]] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _reasons(self) -> int:
        n = self._nvml
        get = getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or n.nvmlDeviceGetCurrentClocksThrottleReasons
        return int(get(self._handle))

    def _sample(self) -> None:
        n, h = self._nvml, self._handle
        while not self._stop.is_set():
            try:
                self._samples.append((
                    float(n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
                    float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
                    n.nvmlDeviceGetPowerUsage(h) / 1000.0,
                    self._reasons(),
                ))
            except Exception:  # a failed read loses one sample, never the measurement
                pass
            self._stop.wait(self._interval)

    def __enter__(self) -> "Telemetry":
        self._samples.clear()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict:
        if not self._samples:
            return {"sm_clock_mhz": None, "temp_c": None, "power_w": None, "throttled": False, "throttle": ""}
        clocks, temps, powers, reasons = zip(*self._samples)
        mask = 0
        for r in reasons:
            mask |= r
        names = [name for bit, name in _THROTTLE_BITS.items() if mask & bit]
        return {"sm_clock_mhz": sorted(clocks)[len(clocks) // 2], "temp_c": max(temps),
                "power_w": sorted(powers)[len(powers) // 2], "throttled": bool(names), "throttle": ",".join(names)}


class TorchBackend:
    """Eager PyTorch on `cpu` or `cuda` (optionally replayed as a CUDA graph)."""

    def __init__(self, name: str, dtype: str, threads: Optional[int] = None, cuda_graphs: bool = False) -> None:
        self.name, self.dtype_name, self.dtype = name, dtype, DTYPES[dtype]
        self.device = torch.device("cpu" if name == "torch-cpu" else "cuda")
        self.threads = set_threads(threads)
        steady_allocator()  # parts and whole models must see the same allocator policy
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.telemetry = Telemetry(torch.cuda.current_device()) if self.device.type == "cuda" and _has_nvml() else None

    def tensor(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=self.dtype)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)

    def prepare(self, module: nn.Module, inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
        """A callable that runs `module` on `inputs` as deployed: eager, or a replayed CUDA graph."""
        module = deployed(module, self.device, self.dtype)
        inputs = tuple(self.to_device(t).contiguous() for t in inputs)
        if not self.cuda_graphs:
            return lambda: module(*inputs)
        return GraphReplay(module, inputs)

    def measure(self, fns: Mapping[str, Callable[[], object]], retries: int = 2, **kwargs) -> tuple[dict[str, Timing], dict]:
        """Time `fns` interleaved; on a GPU, measure again (up to `retries` times) while throttled."""
        attempts = 0
        while True:
            attempts += 1
            if self.telemetry is None:
                return measure_interleaved(fns, device=self.device, **kwargs), {"attempts": attempts}
            with self.telemetry:
                timings = measure_interleaved(fns, device=self.device, **kwargs)
            tele = self.telemetry.summary()
            if not tele["throttled"] or attempts > retries:
                return timings, {**tele, "attempts": attempts}
            time.sleep(1.0)  # let clocks recover before the window is measured again

    def release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def deployed(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`module`, switched to eval mode, when its floating-point tensors are on `device` in `dtype`
    already, else a cast copy in eval mode: timing never moves or casts the caller's weights (a
    teacher cast to bf16 in place would go on to train on rounded weights)."""
    tensors = [*module.parameters(), *module.buffers()]
    here = all(t.device.type == device.type and (device.index is None or t.device.index == device.index)
               and (t.dtype == dtype or not t.is_floating_point()) for t in tensors)
    return module.eval() if here else copy.deepcopy(module).eval().to(device, dtype)


class GraphReplay:
    """One forward pass captured as a CUDA graph, replayed on call.

    Warm-up runs on a side stream (cuDNN/cuBLAS pick their kernels and workspaces outside the
    capture); the inputs are the graph's static buffers and the outputs of the captured call are
    kept, and so are the module and the graph, so nothing the replay reads or writes is freed
    while the callable lives; one replay is checked against the eager output before timing.
    Capture needs static shapes and no host synchronisation in the forward pass: the compressed
    path is written that way (tests/test_capture.py checks it on the CPU).
    """

    def __init__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], warmup: int = 3) -> None:
        self.module, self.inputs = module, inputs
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup)):
                    eager = module(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = module(*inputs)
            self.graph.replay()
            torch.cuda.synchronize()
            if not _close(self.outputs, eager):  # a replay must compute what the eager call did
                raise CaitsearchError(f"the CUDA graph of {type(module).__name__} does not replay what it computes "
                                      "eagerly, so it cannot be timed as a graph; measure without --cuda-graphs.")

    def __call__(self) -> object:
        self.graph.replay()
        return self.outputs


def _close(a: object, b: object) -> bool:
    """Outputs (a tensor or a tuple of them) equal up to half-precision rounding."""
    a, b = ((a,), (b,)) if isinstance(a, torch.Tensor) else (tuple(a), tuple(b))
    return len(a) == len(b) and all(
        x is y is None or (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                           and torch.allclose(x.float(), y.float(), rtol=1e-2, atol=1e-2)) for x, y in zip(a, b))


class TensorRTBackend(TorchBackend):
    """One TensorRT engine per measured module, built from its ONNX export and cached on disk.

    TensorRT fuses whole transformer blocks, so every profiled shape gets its own small engine.
    FP16 comes from exporting an FP16 ONNX model into a strongly typed network (TensorRT 11 has no
    FP16 builder flag); engines are cached under `cache_dir` by the hash of their ONNX bytes.
    """

    def __init__(self, dtype: str, cache_dir: Path, threads: Optional[int] = None) -> None:
        if dtype == "bf16":
            raise CaitsearchError("the tensorrt backend profiles fp32 or fp16; bf16 is for the cuda backend.")
        super().__init__("cuda", dtype, threads)
        self.name = "tensorrt"
        import tensorrt as trt

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.cache_dir = Path(cache_dir)

    def _onnx(self, module: nn.Module, inputs: tuple) -> bytes:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, inputs, dynamo=True, opset_version=18, verbose=False)
        buf = io.BytesIO()
        import onnx

        onnx.save_model(program.model_proto, buf)
        return buf.getvalue()

    def _engine(self, onnx_bytes: bytes):
        from ..io import atomic_write

        trt = self.trt
        path = self.cache_dir / f"{hashlib.sha256(onnx_bytes).hexdigest()[:24]}.engine"
        if not path.is_file():
            builder = trt.Builder(self.logger)
            flags = 0
            typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
            if typed is not None:
                flags |= 1 << int(typed)
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, self.logger)
            if not parser.parse(onnx_bytes):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise CaitsearchError(f"TensorRT cannot parse the exported block: {errors[:300]}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise CaitsearchError("TensorRT failed to build an engine for a profiled block (see its log above).")
            atomic_write(path, lambda tmp: tmp.write_bytes(bytes(serialized)))
        return self.runtime.deserialize_cuda_engine(path.read_bytes())

    def prepare(self, module: nn.Module, inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
        trt = self.trt
        module = deployed(module, self.device, self.dtype)
        inputs = tuple(self.to_device(t).contiguous() for t in inputs)
        engine = self._engine(self._onnx(module, inputs))
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        feeds = iter(inputs)
        keep = []
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                t = next(feeds)
                context.set_input_shape(name, tuple(t.shape))
            else:
                shape = tuple(context.get_tensor_shape(name))
                t = torch.empty(shape, device=self.device, dtype=_torch_dtype(trt, engine.get_tensor_dtype(name)))
            keep.append(t)
            context.set_tensor_address(name, t.data_ptr())

        def run() -> None:
            context.execute_async_v3(torch.cuda.current_stream().cuda_stream)

        run.keep = (engine, context, keep)  # the buffers must live as long as the callable
        return run


def _torch_dtype(trt, dt) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.bool: torch.bool}
    if getattr(trt, "bfloat16", None) is not None:
        table[trt.bfloat16] = torch.bfloat16
    return table[dt]


def _has_nvml() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return True
    except Exception:
        return False


def check_backend(backend: str, dtype: str) -> None:
    """Refuse, in one sentence, a backend or dtype this machine cannot run."""
    if backend not in BACKENDS:
        raise CaitsearchError(f"--backend must be one of {', '.join(BACKENDS)}, not '{backend}'.")
    if dtype not in DTYPES:
        raise CaitsearchError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'.")
    missing = tensorrt_missing() if backend == "tensorrt" else gpu_missing() if backend == "cuda" else []
    if missing:
        raise CaitsearchError(f"backend {backend} needs {' and '.join(missing)}.")
    if backend == "tensorrt" and dtype == "bf16":
        raise CaitsearchError("the tensorrt backend profiles fp32 or fp16; bf16 is for the cuda backend.")


def make_backend(backend: str, dtype: str, threads: Optional[int] = None, cuda_graphs: bool = False,
                 cache_dir: Optional[Path] = None):
    """The backend that times on `backend` in `dtype`, refused in one sentence where this machine cannot run it."""
    check_backend(backend, dtype)
    if cuda_graphs and backend != "cuda":
        raise CaitsearchError(f"CUDA graphs replay PyTorch modules on the cuda backend, not on {backend}; "
                              "drop --cuda-graphs or use --backend cuda.")
    if backend == "tensorrt":
        return TensorRTBackend(dtype, cache_dir or Path("hw_profiles/.trt_cache"), threads)
    return TorchBackend(backend, dtype, threads, cuda_graphs)
