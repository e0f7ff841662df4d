"""Shape stability of everything that is timed: what a CUDA graph capture needs, checked on the CPU.

A CUDA graph replays fixed kernels on fixed buffers, so capture fails on data-dependent shapes,
host synchronisation (`.item()`, `nonzero`) and Python branching on tensor values. Where no GPU
is available the same properties are checked here: every profiled part module (from the plan of a
quick profile, built by the profile's own `_modules`) and every whole candidate (ATME, CDCP, joint,
ToMe, the space's fastest corners) of the default model and of DeiT-Tiny at 64x64 must
- `torch.export.export` with every traced value of a static shape, the program matching eager, and
- `torch.compile(fullgraph=True, dynamic=False)` with no graph break, matching eager.
The capture itself (`profile.backends.GraphReplay`) runs in tests/test_runtime.py where a GPU is.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from caitsearch.compress import compress, materialize
from caitsearch.config import CompressionConfig
from caitsearch.models import DEFAULT_MODEL, ModelSpec, create_model
from caitsearch.profile.backends import TorchBackend
from caitsearch.profile.build import _modules
from caitsearch.profile.plan import QUICK, plan
from caitsearch.space import SearchSpace

MODELS = {"default": (DEFAULT_MODEL, None), "deit_tiny": ("deit_tiny_patch16_224", (64, 64))}
FAMILIES = ("atme", "cdcp", "joint", "tome", "cait-min", "tome-min")


def family_config(spec: ModelSpec, family: str) -> CompressionConfig:
    if family.endswith("-min"):  # the most merged and narrowest config the strategy's space holds
        return SearchSpace.for_strategy(spec, family[:-4]).corners()["min"]
    if family == "tome":
        return CompressionConfig.tome(spec, 2)
    return CompressionConfig.uniform(spec, **{"atme": dict(keep_rate=1.0, merge_every=2), "cdcp": dict(keep_rate=0.5),
                                              "joint": dict(keep_rate=0.75, merge_every=2)}[family])


_dense: dict = {}


def dense_model(key: str) -> torch.nn.Module:
    if key not in _dense:
        torch.manual_seed(0)
        name, size = MODELS[key]
        _dense[key] = create_model(name, img_size=size).eval()
    return _dense[key]


def dynamic_values(program) -> list[str]:
    """Nodes of an exported program with a value whose shape is not a plain integer tuple."""
    found = []
    for node in program.graph.nodes:
        val = node.meta.get("val")
        for v in val if isinstance(val, (tuple, list)) else [val]:
            if isinstance(v, torch.Tensor) and not all(type(d) is int for d in v.shape):
                found.append(f"{node.name}: {tuple(v.shape)}")
    return found


def assert_same(got, want) -> None:
    got, want = (got, want) if isinstance(want, (tuple, list)) else ((got,), (want,))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def assert_capturable(module: torch.nn.Module, inputs: tuple, what: str) -> None:
    module = module.eval()
    with torch.no_grad():
        want = module(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, inputs, strict=False)
    assert not dynamic_values(program), f"{what}: values without a static shape: {dynamic_values(program)[:5]}"
    with torch.no_grad():
        assert_same(program.module()(*inputs), want)
    torch._dynamo.reset()  # one compiled graph per module, never the recompile limit
    compiled = torch.compile(module, fullgraph=True, dynamic=False, backend="eager")
    with torch.no_grad():
        assert_same(compiled(*inputs), want)  # fullgraph: a graph break raises instead of running eagerly


@pytest.mark.parametrize("key, family", [
    ("default", "joint"),
    *[pytest.param(k, f, marks=pytest.mark.slow) for k in MODELS for f in FAMILIES if (k, f) != ("default", "joint")],
])
def test_whole_candidates_trace_with_static_shapes(key, family):
    dense = dense_model(key)
    spec = ModelSpec.from_model(dense)
    config = family_config(spec, family)
    assert any(b.merge_count for b in config.blocks) or family == "cdcp"
    model = materialize(compress(dense, config, torch.randn(4, spec.in_chans, *spec.img_size)))
    assert_capturable(model, (torch.randn(2, spec.in_chans, *spec.img_size),), f"{key} {family}")


@pytest.mark.slow
@pytest.mark.parametrize("key", list(MODELS))
def test_every_profiled_part_traces_with_static_shapes(key):
    dense = dense_model(key)
    spec = ModelSpec.from_model(dense)
    space = SearchSpace(spec)
    be = TorchBackend("torch-cpu", "fp32", threads=torch.get_num_threads())
    cache: dict = {}
    kinds = set()
    for group in plan(space, QUICK):
        for entry in group:
            if entry.kind == "e2e":  # whole configs: the test above
                continue
            module, inputs = _modules(entry, dense, spec, space, be, 2, cache)
            assert_capturable(module, tuple(inputs), entry.key)
            kinds.add(entry.kind if entry.kind != "merge" else f"merge-{entry.axis}")
    assert kinds >= {"stem", "attn", "mlp", "head", "merge-cols", "merge-rows", "merge-tokens"}


class _Nonzero(torch.nn.Module):
    def forward(self, x):
        return x[x > 0].sum() + x.sum()


class _Branch(torch.nn.Module):
    def forward(self, x):
        return x * 2 if x.sum().item() > 0 else x


@pytest.mark.parametrize("module", [_Nonzero(), _Branch()])
def test_the_checks_catch_data_dependent_shapes_and_host_syncs(module):
    with pytest.raises(Exception):
        assert_capturable(module, (torch.randn(4, 3),), type(module).__name__)
