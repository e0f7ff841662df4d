"""Export of a candidate folder (config.json + materialised model.safetensors, as `search` writes
it) to ONNX and TorchScript: the files run in their own runtimes and match PyTorch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from caitsearch.compress import compress, materialize
from caitsearch.config import CompressionConfig
from caitsearch.models import DEFAULT_MODEL, create_model
from caitsearch.io import save_weights

from conftest import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def candidate(tmp_path_factory):
    """A candidate folder of the embedded default model: merged (ATME) and pruned (CDCP)."""
    torch.manual_seed(0)
    dense = create_model(DEFAULT_MODEL).eval()
    config = CompressionConfig.uniform(dense, keep_rate=0.5, merge_every=2)
    assert any(b.merge_count for b in config.blocks)
    model = materialize(compress(dense, config, torch.randn(16, 1, 32, 32))).eval()
    folder = tmp_path_factory.mktemp("run") / "candidates" / "trial-3"
    config.save(folder / "config.json")
    save_weights(model, folder / "model.safetensors")
    return folder, model


@pytest.mark.slow
@pytest.mark.parametrize("fmt, suffix", [("onnx", "onnx"), ("torchscript", "pt")])
def test_candidate_export_round_trips(candidate, tmp_path, fmt, suffix):
    folder, model = candidate
    path = tmp_path / f"m.{suffix}"
    res = run_cli("export", folder, "--format", fmt, "--batch-size", "2", "--out", path, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout)
    assert result["format"] == fmt and result["max_abs_diff"] <= 1e-3 and path.stat().st_size > 100_000
    x = torch.randn(2, 1, 32, 32)  # this process's own check, on its own batch
    with torch.no_grad():
        want = model(x).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    else:
        got = torch.jit.load(str(path))(x).detach().numpy()
    assert np.abs(got - want).max() < 1e-3
    assert np.abs(want).max() > 1e-2  # a real, non-trivial output


@pytest.mark.slow
def test_fp16_onnx_is_an_fp16_graph_close_to_fp32(candidate, tmp_path):
    import onnx

    from caitsearch.export import export_onnx

    folder, model = candidate
    path = tmp_path / "m16.onnx"
    result = export_onnx(model, path, batch_size=2, dtype="fp16")
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert 0 < result["max_abs_diff"] <= 3e-2


@pytest.mark.slow
def test_tensorrt_says_what_is_missing_or_builds(candidate, tmp_path):
    from caitsearch.export import tensorrt_missing

    folder, _ = candidate
    res = run_cli("export", folder, "--format", "tensorrt", "--out", tmp_path / "m.engine", "--json")
    if not tensorrt_missing():  # a GPU machine with TensorRT
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout)["max_abs_diff"] <= 1e-3
    else:
        assert res.returncode == 2 and "needs tensorrt and an NVIDIA GPU" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["{tmp}", "--format", "onnx"], "is not a candidate folder"),
    (["{cand}", "--format", "coreml"], "--format must be one of"),
    (["{cand}", "--config", "{cand}/config.json"], "not both"),
])
@pytest.mark.slow
def test_bad_export_input_exits_2_with_one_line(candidate, tmp_path, args, message):
    folder, _ = candidate
    res = run_cli("export", *[a.format(tmp=tmp_path, cand=folder) for a in args], "--out", tmp_path / "x.onnx")
    assert_one_line_error(res, message)
