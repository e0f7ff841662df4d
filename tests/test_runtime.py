"""One runtime for every timing: re-measurement and `bench` time on the profile's backend, dtype,
threads and CUDA graphs; half-precision profiles work end to end (compression stays fp32, only
the timed copies are cast); `search --device` says where training runs. GPU-only checks (CUDA
graph capture and replay) skip here with the reason."""
from __future__ import annotations

import gc
import json
from types import SimpleNamespace

import pytest
import torch

from caitsearch.compress import compress, materialize
from caitsearch.config import CompressionConfig
from caitsearch.errors import CaitsearchError
from caitsearch.models import DEFAULT_MODEL, ModelSpec, create_model
from caitsearch.profile import Runtime
from caitsearch.profile.backends import TorchBackend, make_backend

from conftest import assert_one_line_error, run_cli

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA graph capture)")


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return create_model(DEFAULT_MODEL).eval()


def test_calibration_on_a_bf16_model_compresses(dense):
    """The issue's reproduction: channel statistics of a bf16 model from fp32 images."""
    spec = ModelSpec.from_model(dense)
    config = CompressionConfig.uniform(spec, keep_rate=0.5, merge_every=2)
    half = create_model(DEFAULT_MODEL).eval()  # a copy to cast: the fixture stays fp32
    half.load_state_dict(dense.state_dict())
    half = half.to(torch.bfloat16)
    model = materialize(compress(half, config, torch.randn(8, 1, 32, 32)))  # fp32 images: used to fail here
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        out = model(x.to(torch.bfloat16))
        want = materialize(compress(dense, config, torch.randn(8, 1, 32, 32)))(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert out.shape == want.shape
    assert all(p.dtype == torch.float32 for p in dense.parameters())


def test_prepare_times_a_cast_copy_that_lives_as_long_as_the_callable(dense):
    be = TorchBackend("torch-cpu", "bf16", threads=torch.get_num_threads())
    x = torch.randn(2, 1, 32, 32)
    run = be.prepare(materialize(compress(dense, CompressionConfig.uniform(dense, 0.5, 2))), (x,))
    gc.collect()  # the caller kept no reference to the model: the callable holds its copy
    with torch.inference_mode():
        out = run()
    assert out.dtype == torch.bfloat16 and out.shape == (2, 10)
    be.prepare(dense, (x,))
    assert all(p.dtype == torch.float32 for p in dense.parameters())  # timing never casts the caller's model
    fp32 = TorchBackend("torch-cpu", "fp32", threads=torch.get_num_threads())
    with torch.inference_mode():
        assert torch.equal(fp32.prepare(dense, (x,))(), dense(x))  # already deployable: used as it is


def test_runtime_comes_from_the_profile_manifest():
    manifest = {"backend": "torch-cpu", "dtype": "bf16", "threads": 1, "cuda_graphs": False, "batch_size": 8}
    rt = Runtime.of_profile(manifest)
    assert rt == Runtime("torch-cpu", "bf16", 1, False, 8) and rt.device.type == "cpu"
    assert Runtime.of_profile(manifest, threads=2).threads == 2
    gpu = Runtime.of_profile({**manifest, "backend": "cuda", "threads": None, "cuda_graphs": True})
    if not torch.cuda.is_available():
        with pytest.raises(CaitsearchError, match="no CUDA device is visible"):
            gpu.device
    with pytest.raises(CaitsearchError, match="CUDA graphs replay PyTorch modules on the cuda backend"):
        make_backend("torch-cpu", "fp32", 1, cuda_graphs=True)


def _trial(number: int, config: CompressionConfig) -> SimpleNamespace:
    return SimpleNamespace(number=number, value=0.1, user_attrs={"config": config.to_dict(), "predicted_ms": 1.0})


def test_remeasure_times_candidates_on_the_profile_runtime_and_leaves_the_teacher_fp32(dense):
    from caitsearch.search.remeasure import remeasure
    from caitsearch.search.request import Budget

    spec = ModelSpec.from_model(dense)
    trials = [_trial(3, CompressionConfig.uniform(spec, 0.5, 2)), _trial(5, CompressionConfig.tome(spec, 4))]
    runtime = Runtime("torch-cpu", "bf16", threads=1, batch_size=4)
    calls = []
    dense_timing, measured = remeasure(dense, trials, spec, Budget(ratio=10.0, ms=1e9), runtime,
                                       torch.randn(16, 1, 32, 32), repeats=3, progress=lambda: calls.append(1))
    assert dense_timing["runtime"] == runtime.as_dict() and dense_timing["latency_ms"] > 0
    assert [m.trial for m in measured] == [3, 5] and all(m.latency_ms > 0 and m.within_budget for m in measured)
    assert len(calls) >= 3
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in dense.parameters())


def test_search_device_cuda_is_refused_without_a_gpu(tmp_path):
    from caitsearch.search import BudgetRequest, SearchRequest

    if torch.cuda.is_available():
        pytest.skip("a GPU is present, so --device cuda is not refused")
    with pytest.raises(CaitsearchError, match="--device cuda needs an NVIDIA GPU"):
        SearchRequest(out=tmp_path, budget=BudgetRequest(ratio=0.6), device="cuda")
    with pytest.raises(CaitsearchError, match="--device must be cpu or cuda"):
        SearchRequest(out=tmp_path, budget=BudgetRequest(ratio=0.6), device="tpu")


@needs_gpu
def test_cuda_graphs_capture_every_part_and_whole_candidate_and_replay_as_eager(dense):
    from caitsearch.profile.build import _modules
    from caitsearch.profile.plan import QUICK, plan
    from caitsearch.space import SearchSpace

    spec = ModelSpec.from_model(dense)
    space = SearchSpace(spec)
    graphs = make_backend("cuda", "fp16", cuda_graphs=True)
    eager = make_backend("cuda", "fp16")
    cache: dict = {}
    for group in plan(space, QUICK):
        for entry in group:
            module, inputs = _modules(entry, dense, spec, space, graphs, 4, cache)
            replay = graphs.prepare(module, inputs)
            with torch.inference_mode():
                want = eager.prepare(module, inputs)()
                got = replay()
            for g, w in zip(*(((o,) if isinstance(o, torch.Tensor) else o) for o in (got, want))):
                torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)
    timings, _ = Runtime("cuda", "fp16", cuda_graphs=True, batch_size=8).time_models(
        {"dense": dense, "tome": materialize(compress(dense, CompressionConfig.tome(spec, 4)))}, spec, repeats=5)
    assert all(t.median > 0 for t in timings.values())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in dense.parameters())


# ---------------------------------------------------------------- end to end, as CI runs it


@pytest.fixture(scope="module")
def bf16_profile(tmp_path_factory):
    from caitsearch.profile import build_profile

    return build_profile(DEFAULT_MODEL, dtype="bf16", quick=True, threads=1,
                         out=tmp_path_factory.mktemp("profile") / "bf16", progress=False)


@pytest.mark.slow
def test_bench_times_on_the_profile_runtime(bf16_profile):
    res = run_cli("bench", "--strategy", "cait", "--budget", "0.7", "--profile", bf16_profile, "--repeats", "3",
                  "--warmup", "1", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    bench = json.loads(res.stdout)
    assert (bench["dtype"], bench["backend"], bench["threads"], bench["batch_size"]) == ("bf16", "torch-cpu", 1, 32)
    assert bench["profile"] == str(bf16_profile) and bench["speedup"] > 0
    assert_one_line_error(run_cli("bench", "--profile", bf16_profile, "--dtype", "fp32"), "drop --dtype fp32")
    if not torch.cuda.is_available():
        assert_one_line_error(run_cli("bench", "--device", "cuda"), "--device cuda needs an NVIDIA GPU")


@pytest.mark.slow
def test_bf16_profile_search_remeasure_retrain_report(tmp_path, bf16_profile, dense_checkpoint):
    from test_search import TINY

    run = tmp_path / "run"
    res = run_cli("search", "--budget", "0.9", "--profile", bf16_profile, "--checkpoint", dense_checkpoint,
                  "--trials", "6", "--retrain-top", "1", "--out", run, *TINY, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["dtype"] == "bf16" and summary["device"] == summary["train_device"] == "cpu"
    assert summary["runtime"] == {"backend": "torch-cpu", "dtype": "bf16", "threads": 1, "cuda_graphs": False,
                                  "batch_size": 32}
    cands = summary["candidates"]
    assert cands and cands[0]["retrained"] and 0 <= cands[0]["accuracy"] <= 1
    for c in cands:  # re-measured in bf16 against the dense model of the same loop
        assert c["latency_ms"] <= 0.9 * c["timing"]["dense_ms"] + 1e-9
    from safetensors.torch import load_file

    weights = load_file(str(run / "candidates" / f"trial-{cands[0]['trial']}" / "model.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}  # trained in fp32
    rep = run_cli("report", run, "--format", "md,json", "--out", tmp_path / "rep", "--json")
    assert rep.returncode == 0, rep.stderr[-2000:]
    env = json.loads((tmp_path / "rep" / "report.json").read_text())["environment"]
    assert env["dtype"] == "bf16" and env["backend"] == "torch-cpu"


@pytest.mark.slow
def test_validate_times_on_the_bf16_profile_runtime(bf16_profile, tmp_path):
    from caitsearch.profile import validate_profile

    result = validate_profile(bf16_profile, configs=2, out=tmp_path, progress=False)
    assert result["dtype"] == "bf16" and result["backend"] == "torch-cpu" and result["configs"] == 2
    assert (tmp_path / "validation.json").is_file()
