"""Fuzzing of every reader of a user-visible file: compression configs, latency profiles (manifest
and table) and search runs (summary, manifest, trials and results tables).

Hypothesis edits a good file (a value replaced by any JSON, a key dropped or added, a column
dropped or filled with junk, the bytes cut short) and the reader, and what the report builds from
it, must either accept it or refuse it with `CaitsearchError`: never another exception, which the
command line would show as an internal error.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from caitsearch.errors import CaitsearchError

# no example database: tests write only under their temporary folders
FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
SCALARS = (st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats() | st.text(max_size=12)
           | st.sampled_from([0, 1, -1, 8, 32, 64, 512, "none", "cols", "rows", "tokens", "", "deit_tiny_patch16_224"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                         max_size=4), max_leaves=12)


@st.composite
def edited(draw, document):
    """`document` after one to three random edits: a value replaced, a key or item removed or added."""
    doc = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        parent, key, node = None, None, doc
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(list(node) if isinstance(node, dict) else list(range(len(node)))))
            parent, node = node, node[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if parent is None:
            doc = draw(JSON) if action == "replace" else doc
        elif action == "replace":
            parent[key] = draw(JSON)
        elif action == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(JSON)
        else:
            parent.insert(key, draw(JSON))
    return doc


def refused_or_fine(action) -> None:
    try:
        action()
    except CaitsearchError:
        event("refused")
    else:
        event("accepted")


# ----- compression configs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def spec():
    from caitsearch.models import DEFAULT_MODEL, model_spec

    return model_spec(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def configs(spec):
    from caitsearch.config import CompressionConfig

    return [CompressionConfig.dense(spec).to_dict(), CompressionConfig.uniform(spec, 0.5, merge_every=2).to_dict(),
            CompressionConfig.tome(spec, 4).to_dict()]


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_edited_configs_are_accepted_or_refused(data, spec, configs):
    from caitsearch.config import CompressionConfig

    document = data.draw(edited(data.draw(st.sampled_from(configs))))

    def use() -> None:
        config = CompressionConfig.from_dict(document)
        config.validate(spec)
        config.macs(spec)

    refused_or_fine(use)


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_config_files_of_any_bytes_are_accepted_or_refused(data, configs):
    from caitsearch.config import CompressionConfig

    text = json.dumps(data.draw(edited(configs[1]))).encode()
    raw = data.draw(st.sampled_from([
        text, text[: data.draw(st.integers(0, len(text)))], data.draw(st.binary(max_size=64)),
        text.decode().encode(data.draw(st.sampled_from(["utf-16", "utf-32", "latin-1"])), errors="replace"),
        b"[" * 50_000 + b"]" * 50_000]))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.json"
        path.write_bytes(raw)
        refused_or_fine(lambda: CompressionConfig.load(path))


# ----- latency profiles --------------------------------------------------------------------------


def _seal(folder: Path) -> None:
    """Make the manifest agree with the table again (rows, SHA-256), so the deeper checks are reached."""
    import pandas as pd

    manifest = json.loads((folder / "manifest.json").read_text())
    if not isinstance(manifest, dict):
        return
    try:
        rows = len(pd.read_parquet(folder / "table.parquet"))
    except Exception:
        rows = manifest.get("rows")
    manifest.update(rows=rows, table_sha256=hashlib.sha256((folder / "table.parquet").read_bytes()).hexdigest())
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _load_profile(folder: Path) -> None:
    from caitsearch.config import CompressionConfig
    from caitsearch.profile import LatencyProfile

    prof = LatencyProfile.load(folder)
    prof.summary()
    prof.predict(CompressionConfig.dense(prof.spec))


@pytest.mark.slow
@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_edited_profile_manifests_are_accepted_or_refused(data, quick_profile):
    manifest = json.loads((quick_profile / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "profile"
        shutil.copytree(quick_profile, folder)
        (folder / "manifest.json").write_text(json.dumps(data.draw(edited(manifest))))
        refused_or_fine(lambda: _load_profile(folder))


JUNK_COLUMNS = st.sampled_from(["drop", "strings", "nan", "negative", "zero", "huge", "none", "bools"])


def _junk(frame, column: str, how: str):
    import numpy as np

    if how == "drop":
        return frame.drop(columns=[column])
    values = {"strings": "x", "nan": np.nan, "negative": -1.0, "zero": 0, "huge": 1e308, "none": None,
              "bools": True}[how]
    frame = frame.copy()
    frame[column] = [values] * len(frame)
    return frame


@pytest.mark.slow
@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_edited_profile_tables_are_accepted_or_refused(data, quick_profile):
    import pandas as pd

    table = pd.read_parquet(quick_profile / "table.parquet")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "profile"
        shutil.copytree(quick_profile, folder)
        if data.draw(st.booleans()):
            column = data.draw(st.sampled_from(list(table.columns)))
            rows = data.draw(st.sampled_from([slice(None), slice(0, 1), slice(0, len(table) // 2)]))
            _junk(table[rows], column, data.draw(JUNK_COLUMNS)).to_parquet(folder / "table.parquet")
        else:
            raw = (quick_profile / "table.parquet").read_bytes()
            (folder / "table.parquet").write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
        if data.draw(st.booleans()):
            _seal(folder)
        refused_or_fine(lambda: _load_profile(folder))


# ----- search runs -------------------------------------------------------------------------------


def _read_run(folder: Path) -> None:
    from caitsearch.report import compare_table, load_run
    from caitsearch.report.render import candidates_table, report_json

    run = load_run(folder)
    table = candidates_table(run)
    report_json(run, table)
    compare_table([run])
    run.commands()


def _run_copy(search_run: Path, tmp: str) -> Path:
    folder = Path(tmp) / "run"
    shutil.copytree(search_run, folder, ignore=shutil.ignore_patterns("*.pt", "study.db", "study.lock"))
    return folder


@pytest.mark.slow
@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_edited_run_summaries_and_manifests_are_accepted_or_refused(data, search_run):
    name = data.draw(st.sampled_from(["summary.json", "manifest.json"]))
    document = json.loads((search_run / name).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        folder = _run_copy(search_run, tmp)
        (folder / name).write_text(json.dumps(data.draw(edited(document))))
        refused_or_fine(lambda: _read_run(folder))


@pytest.mark.slow
@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_edited_trial_and_result_tables_are_accepted_or_refused(data, search_run):
    import pandas as pd

    name = data.draw(st.sampled_from(["trials.parquet", "results.parquet"]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = _run_copy(search_run, tmp)
        if data.draw(st.booleans()):
            table = pd.read_parquet(search_run / name)
            column = data.draw(st.sampled_from(list(table.columns)))
            _junk(table, column, data.draw(JUNK_COLUMNS)).to_parquet(folder / name)
        else:
            raw = (search_run / name).read_bytes()
            (folder / name).write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
        refused_or_fine(lambda: _read_run(folder))
