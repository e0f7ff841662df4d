"""What TensorRT would be handed, read from the ONNX graphs, since TensorRT itself cannot run here.

ATME, CDCP and joint configs of the default model must export to ops TensorRT runs natively: no
scatter with a reduction (a plugin), nothing with a data-dependent output shape, every TopK with a
constant K below 3840, every value's shape static. ToMe's graph is audited the same way; what it
needs beyond the ATME graph (ArgMax and a full-length TopK for its matching) is recorded by
`bench/onnx_ops_bench.py` in bench/results/onnx_ops.json.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from caitsearch.compress import compress, materialize
from caitsearch.config import CompressionConfig
from caitsearch.export import export_onnx, onnx_op_counts, tensorrt_audit
from caitsearch.models import DEFAULT_MODEL, ModelSpec, create_model

FAMILIES = {
    "atme": dict(keep_rate=1.0, merge_every=2),
    "cdcp": dict(keep_rate=0.5),
    "joint": dict(keep_rate=0.75, merge_every=2),
}


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return create_model(DEFAULT_MODEL).eval()


def family_config(spec: ModelSpec, family: str) -> CompressionConfig:
    return CompressionConfig.tome(spec, 4) if family == "tome" else CompressionConfig.uniform(spec, **FAMILIES[family])


def exported(dense, family: str, path) -> dict:
    spec = ModelSpec.from_model(dense)
    config = family_config(spec, family)
    model = materialize(compress(dense, config, torch.randn(8, spec.in_chans, *spec.img_size))).eval()
    export_onnx(model, path, batch_size=2)  # checked against PyTorch by onnxruntime on the way
    return tensorrt_audit(path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["atme", "cdcp", "joint"])
def test_atme_and_cdcp_graphs_use_only_ops_tensorrt_runs_natively(dense, family, tmp_path):
    audit = exported(dense, family, tmp_path / f"{family}.onnx")
    assert audit["concerns"] == []
    ops = audit["ops"]
    assert not {"NonZero", "Unique", "Compress", "Loop", "If"} & set(ops)
    merges = sum(b.merge_count > 0 for b in family_config(ModelSpec.from_model(dense), family).blocks)
    if merges:  # one TopK per ATME step, K = lines merged, a constant
        assert len(audit["topk_k"]) == merges and all(0 < k < 3840 for k in audit["topk_k"])
    else:
        assert "TopK" not in ops and "ScatterElements" not in ops


@pytest.mark.slow
def test_tome_graph_is_audited_and_needs_no_plugin_either(dense, tmp_path):
    audit = exported(dense, "tome", tmp_path / "tome.onnx")
    assert audit["concerns"] == []
    assert "ArgMax" in audit["ops"]  # each A token's best B partner
    n_a = (ModelSpec.from_model(dense).grid[0] * ModelSpec.from_model(dense).grid[1] + 1) // 2
    assert audit["topk_k"][0] == n_a  # the argsort of the A set: a TopK over all of it


class _Unfriendly(nn.Module):
    """The old merge (scatter-add) and a data-dependent shape: what the audit must catch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        target = (x[:, :, 0] > 0).long()
        sums = x.new_zeros(x.shape[0], 2).scatter_add_(1, target, x[:, :, 1])
        return sums.sum() + x[x > 0].sum()


def test_the_audit_catches_a_scatter_add_and_a_data_dependent_shape(tmp_path):
    import warnings

    path = tmp_path / "bad.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Unfriendly(), (torch.randn(2, 5, 3),), dynamo=True, opset_version=18,
                          verbose=False).save(str(path))
    audit = tensorrt_audit(path)
    assert any("reduction=add" in c for c in audit["concerns"]), audit
    assert any("NonZero" in c for c in audit["concerns"]), audit
    assert onnx_op_counts(path) == audit["ops"] and audit["ops"]["ScatterElements"] >= 1
