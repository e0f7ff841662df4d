"""Where a profile measures: PyTorch on the CPU, PyTorch on CUDA, or TensorRT engines.

A backend turns a module and its example inputs into a zero-argument callable that runs one
forward pass, and times groups of such callables interleaved (`measure.measure_interleaved`:
warm-up by count and time, repeats until the spread is small, median/p90/spread). On GPUs the
timer is CUDA events, and NVML telemetry (SM clock, temperature, power, throttle reasons) is
sampled while a group runs; a group that ran throttled is measured again.
"""
from __future__ import annotations

import hashlib
import io
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..device import DTYPES
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
        module = module.eval().to(self.device, self.dtype)
        inputs = tuple(inputs)
        if not self.cuda_graphs:
            return lambda: module(*inputs)
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    module(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                module(*inputs)
        return graph.replay

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
        module = module.eval().to(self.device, self.dtype)
        inputs = tuple(t.contiguous() for t in inputs)
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
    missing = []
    if backend in ("cuda", "tensorrt") and not torch.cuda.is_available():
        missing.append(f"an NVIDIA GPU visible to a CUDA build of torch (torch {torch.__version__}, "
                       f"CUDA {torch.version.cuda or 'none'}, sees none)")
    if backend == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            missing.append("the TensorRT Python package (pip install tensorrt)")
    if missing:
        raise CaitsearchError(f"backend {backend} needs {' and '.join(missing)}.")
    if backend == "tensorrt" and dtype == "bf16":
        raise CaitsearchError("the tensorrt backend profiles fp32 or fp16; bf16 is for the cuda backend.")


def make_backend(backend: str, dtype: str, threads: Optional[int] = None, cuda_graphs: bool = False,
                 cache_dir: Optional[Path] = None):
    check_backend(backend, dtype)
    if backend == "tensorrt":
        return TensorRTBackend(dtype, cache_dir or Path("hw_profiles/.trt_cache"), threads)
    return TorchBackend(backend, dtype, threads, cuda_graphs)
