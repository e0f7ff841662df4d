"""Latency profiles: build, reload, predict, resume after SIGKILL, refuse foreign or damaged tables."""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from caitsearch.config import CompressionConfig
from caitsearch.errors import CaitsearchError
from caitsearch.models import DEFAULT_MODEL, create_model
from caitsearch.profile import LatencyProfile, build_profile, default_profile_path, validate_profile
from caitsearch.profile.backends import check_backend
from caitsearch.profile.validate import metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prof") / "default"
    return build_profile(DEFAULT_MODEL, threads=1, batch_size=16, out=out, quick=True, progress=False)


@pytest.mark.slow
def test_profile_builds_reloads_and_predicts(profile_dir):
    prof = LatencyProfile.load(profile_dir)
    m = prof.manifest
    assert m["model"] == DEFAULT_MODEL and m["batch_size"] == 16 and m["threads"] == 1 and m["complete"]
    assert m["fingerprint"]["threads"] == 1 and m["fingerprint"]["logical_cores"] >= 1
    table = pd.read_parquet(profile_dir / "table.parquet")
    assert table["key"].is_unique and len(table) == m["rows"]
    assert len(pd.read_csv(profile_dir / "table.csv")) == len(table)
    assert set(table["kind"]) == {"stem", "attn", "merge", "mlp", "head", "e2e"}
    assert (table["median_ms"] > 0).all() and (table["p90_ms"] >= table["median_ms"]).all()

    spec = prof.spec
    dense = CompressionConfig.dense(spec)
    # at sampled points the raw estimate is exactly the sum of table rows
    t, full = table, spec.num_tokens
    attn = t[(t.kind == "attn") & (t.tokens == full) & (t.qk == spec.head_dim) & (t.v == spec.head_dim)].median_ms.item()
    mlp = t[(t.kind == "mlp") & (t.tokens == full) & (t.mlp == spec.mlp_hidden)].median_ms.item()
    head = t[(t.kind == "head") & (t.tokens == full)].median_ms.item()
    stem = t[t.kind == "stem"].median_ms.item()
    assert prof.raw(dense) == pytest.approx(stem + spec.depth * (attn + mlp) + head)
    assert prof.dense_ms == pytest.approx(float(prof.part_sums(dense) @ prof.factors))

    small = CompressionConfig.uniform(spec, keep_rate=0.25, merge_every=1, merge_fraction=0.5)
    assert 0 < prof.predict(small) < prof.dense_ms
    assert (prof.factors >= 0).all() and prof.factors.sum() > 0
    prof.check_model(create_model(DEFAULT_MODEL))
    with pytest.raises(CaitsearchError, match="is for deit_fmnist_patch4_32"):
        prof.check_model(create_model("deit_tiny_patch16_224", img_size=(64, 64)))
    assert default_profile_path(DEFAULT_MODEL, (32, 32)) == Path("hw_profiles/deit_fmnist_patch4_32_32x32_torch-cpu_b32_fp32")


@pytest.mark.slow
def test_killed_profile_resumes_to_the_same_keys(profile_dir, tmp_path):
    out = tmp_path / "killed"
    code = (f"from caitsearch.profile import build_profile; "
            f"build_profile('{DEFAULT_MODEL}', threads=1, batch_size=16, out=r'{out}', quick=True, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.time() + 120
        while not (out / "table.parquet").exists():
            assert proc.poll() is None, "the profile subprocess ended before writing its first group"
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"], "killed too late to test resuming"
    partial = pd.read_parquet(out / "table.parquet")
    with pytest.raises(CaitsearchError, match="unfinished"):
        LatencyProfile.load(out)

    build_profile(DEFAULT_MODEL, threads=1, batch_size=16, out=out, quick=True, progress=False)
    resumed = pd.read_parquet(out / "table.parquet")
    uninterrupted = pd.read_parquet(profile_dir / "table.parquet")
    assert resumed["key"].is_unique
    assert set(resumed["key"]) == set(uninterrupted["key"])
    assert set(partial["key"]) < set(resumed["key"])
    # rows measured before the kill are kept as they were
    kept = resumed.set_index("key").loc[partial["key"], "median_ms"].to_numpy()
    assert (kept == partial["median_ms"].to_numpy()).all()
    LatencyProfile.load(out)
    with pytest.raises(CaitsearchError, match="other settings"):
        build_profile(DEFAULT_MODEL, threads=1, batch_size=8, out=out, quick=True, progress=False)


@pytest.mark.slow
def test_foreign_fingerprint_is_refused(profile_dir, tmp_path):
    foreign = tmp_path / "foreign"
    shutil.copytree(profile_dir, foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    manifest["fingerprint"]["cpu"] = "Some Other CPU 9000"
    (foreign / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CaitsearchError, match="another device.*Some Other CPU.*--allow-foreign-profile"):
        LatencyProfile.load(foreign)
    assert LatencyProfile.load(foreign, allow_foreign=True).dense_ms > 0
    cli = [sys.executable, "-c", "from caitsearch.cli import main; main()"]
    run = subprocess.run(cli + ["profile", "validate", str(foreign), "--configs", "2"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert "another device" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_corrupt_or_truncated_table_is_refused(profile_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(profile_dir, bad)
    data = (bad / "table.parquet").read_bytes()
    (bad / "table.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(CaitsearchError, match="does not match its manifest"):
        LatencyProfile.load(bad)
    # a manifest that vouches for the truncated file still cannot make it readable
    import hashlib

    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["table_sha256"] = hashlib.sha256(data[: len(data) // 2]).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CaitsearchError, match="corrupt or truncated"):
        LatencyProfile.load(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(CaitsearchError, match="not a readable profile manifest"):
        LatencyProfile.load(bad)
    with pytest.raises(CaitsearchError, match="manifest.json is missing"):
        LatencyProfile.load(tmp_path / "nowhere")


@pytest.mark.slow
def test_validation_reports_every_metric(profile_dir, tmp_path):
    result = validate_profile(profile_dir, configs=3, out=tmp_path, progress=False)
    for key in ("mape_pct", "within_5pct", "within_10pct", "spearman", "max_error_pct"):
        assert key in result
    assert result["configs"] == 3 and 0 <= result["within_5pct"] <= result["within_10pct"] <= 1
    assert (tmp_path / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    detail = json.loads((tmp_path / "validation.json").read_text())["configs_detail"]
    assert len(detail) == 3 and all(d["measured_ms"] > 0 for d in detail)
    # every config is timed in two passes, each judged relative to the dense model timed beside it
    for d in detail:
        assert len(d["passes"]) == result["passes"] == 2
        for q in d["passes"]:
            assert q["drift_corrected_ms"] == pytest.approx(q["measured_ms"] * result["dense_reference_ms"] / q["dense_ms"])
        assert d["drift_corrected_ms"] == pytest.approx(np.sqrt(np.prod([q["drift_corrected_ms"] for q in d["passes"]])))
    assert set(result["absolute"]) >= {"mape_pct", "within_5pct", "within_10pct", "spearman"}
    # the first pass scored against the second: the noise floor any predictor faces on this machine
    assert result["retest"]["all"]["configs"] == 3 and -1 <= result["retest"]["all"]["spearman"] <= 1


def test_grid_interpolates_multilinearly_and_clamps():
    from caitsearch.profile.predictor import Grid

    rows = pd.DataFrame({"tokens": [10, 10, 20, 20], "mlp": [100, 200, 100, 200], "median_ms": [1.0, 3.0, 5.0, 7.0]})
    grid = Grid(rows, ["tokens", "mlp"], "test")
    assert grid(10, 100) == 1.0 and grid(20, 200) == 7.0
    assert grid(15, 150) == pytest.approx(4.0)
    assert grid(12.5, 200) == pytest.approx(4.0)
    assert grid(5, 50) == 1.0 and grid(99, 999) == 7.0
    with pytest.raises(CaitsearchError, match="misses test entries"):
        Grid(rows.iloc[:3], ["tokens", "mlp"], "test")


@pytest.mark.slow
def test_whole_configs_are_timed_beside_dense_and_drift_is_divided_out(profile_dir):
    """Every e2e loop carries dense (`ref_ms`); a machine slowed by 12% during some loops (as seen
    in a DeiT-Tiny build) changes neither the fitted factors nor the profile's dense latency."""
    prof = LatencyProfile.load(profile_dir)
    t = prof.table
    e2e = t[t.kind == "e2e"]
    assert json.loads(e2e.config.iloc[0]) == CompressionConfig.dense(prof.spec).to_dict()
    assert (e2e.ref_ms > 0).all() and e2e.ref_ms.iloc[0] == e2e.median_ms.iloc[0]  # dense is its own loop's reference
    assert t[t.kind != "e2e"].ref_ms.isna().all()
    assert len(set(e2e.ref_ms)) == -(-len(e2e) // prof.manifest["resolution"]["e2e_group"])  # one dense per loop

    slowed = t.copy()
    refs = sorted(set(e2e.ref_ms))
    late = (slowed.kind == "e2e") & (slowed.ref_ms > refs[len(refs) // 2])  # loops above the median dense
    assert late.any()
    slowed.loc[late, ["median_ms", "ref_ms"]] *= 1.12  # the whole loop slower: configs and dense alike
    drifted = LatencyProfile(prof.manifest, slowed, prof.path)
    np.testing.assert_allclose(drifted.factors, prof.factors, rtol=1e-9)
    assert drifted.measured_e2e(CompressionConfig.dense(prof.spec)) == pytest.approx(
        prof.measured_e2e(CompressionConfig.dense(prof.spec)))
    raw = slowed.drop(columns="ref_ms")  # a profile from before ref_ms: its raw timings, drift and all
    assert not np.allclose(LatencyProfile(prof.manifest, raw, prof.path).factors, prof.factors, rtol=1e-3)


@pytest.mark.slow
def test_full_token_and_merged_token_parts_get_their_own_factors(profile_dir):
    """Pure pruning runs every block on the full token count, merging on fewer: a machine that runs
    full-token blocks 8% faster and merged ones 8% slower than timed alone (as a DeiT-Tiny profile
    showed, in the opposite direction) is fitted exactly, pure pruning included."""
    from caitsearch.profile.predictor import PARTS

    prof = LatencyProfile.load(profile_dir)
    spec = prof.spec
    dense = CompressionConfig.dense(spec)
    pruned = CompressionConfig.uniform(spec, keep_rate=0.5, merge_every=0)
    merged = CompressionConfig.uniform(spec, keep_rate=1.0, merge_every=1, merge_fraction=0.5)
    named = lambda c: dict(zip(PARTS, prof.part_sums(c)))  # noqa: E731
    assert named(pruned)["attention_merged"] == named(pruned)["mlp_merged"] == named(pruned)["merge"] == 0.0
    assert named(merged)["attention_merged"] > 0 and named(merged)["merge"] > 0
    assert prof.raw(dense) == pytest.approx(sum(named(dense).values()))

    true = np.array([1.0, 0.92, 1.08, 0.92, 1.08, 1.0, 1.0])
    t = prof.table.copy()
    e2e = t.kind == "e2e"
    t.loc[e2e, "median_ms"] = [float(prof.part_sums(CompressionConfig.from_dict(json.loads(c))) @ true)
                               for c in t.loc[e2e, "config"]]
    t.loc[e2e, "ref_ms"] = 1.0
    refit = LatencyProfile(prof.manifest, t, prof.path)
    for config in (dense, pruned, merged):
        assert refit.predict(config) == pytest.approx(float(prof.part_sums(config) @ true), rel=0.01)


def test_whole_config_groups_fill_their_time_instead_of_stopping_at_the_spread_target():
    """A fast model's whole configs (the default model: ~30 ms) are repeated for the group's whole
    time, so their medians rest on dozens of samples, not the 5 after which a 5% spread stopped them."""
    from caitsearch.profile.plan import FULL, QUICK, whole_config_repeats

    assert whole_config_repeats(FULL, 0.15) == 66  # 5 configs of 30 ms: 10 s of rounds
    assert whole_config_repeats(FULL, 5.0) == FULL.repeats  # DeiT-Small: never fewer than the base repeats
    assert whole_config_repeats(FULL, 1e-5) == FULL.e2e_max_repeats
    assert whole_config_repeats(QUICK, 0.1) == 10


def test_a_second_pass_over_the_whole_configs_opens_the_build():
    """FULL times the fit's whole configs twice: the first pass closes the build as before (same
    keys, so shipped profiles stay complete), a second opens it, in its own order and beside its own
    dense, so the fit does not rest on one stretch of the machine's state."""
    from dataclasses import replace

    from caitsearch.models import ModelSpec
    from caitsearch.profile.plan import FULL, dense_entry, plan
    from caitsearch.space import SearchSpace

    space = SearchSpace(ModelSpec.from_model(create_model(DEFAULT_MODEL)))
    one = plan(space, replace(FULL, e2e_passes=1))
    two = plan(space, FULL)
    assert FULL.e2e_passes == 2
    whole = lambda groups: [e for g in groups for e in g if e.kind == "e2e"]  # noqa: E731
    first, both = whole(one), whole(two)
    assert len(both) == 2 * len(first) and len({e.key for e in both}) == len(both)
    assert {e.key for e in first} <= {e.key for e in both}  # the first pass's keys are unchanged
    second = [e for e in both if e.take == 1]
    assert sorted(e.config for e in second) == sorted(e.config for e in first)
    assert [e.config for e in second] != [e.config for e in first]  # its own order
    n = -(-len(second) // FULL.e2e_group)
    assert all(e.take == 1 for g in two[:n] for e in g)  # it opens the build
    assert all(e.take == 0 for g in two[-n:] for e in g if e.kind == "e2e") and two[-1][0].kind == "e2e"
    assert two[0][0].key == dense_entry(space.spec, 1).key
    assert all(e.kind != "e2e" for g in two[n:-n] for e in g)


def test_attention_timings_are_smoothed_over_widths_per_token_count():
    from caitsearch.profile.predictor import smooth_attention

    rng = np.random.default_rng(0)
    widths = [16, 24, 32, 40, 48, 56, 64]
    rows = pd.DataFrame([{"tokens": n, "qk": q, "v": v} for n in (65, 257) for q in widths for v in widths]
                        + [{"tokens": 17, "qk": q, "v": v} for q in (16, 64) for v in (16, 64)])  # 4 widths: too few
    truth = 0.01 * rows.tokens * (1 + 0.02 * rows.qk + 0.03 * rows.v + 0.01 * np.maximum(rows.qk, rows.v))
    rows["median_ms"] = truth * rng.uniform(0.95, 1.05, len(rows))  # +-5% noise per timing
    before = rows.copy()
    smoothed = smooth_attention(rows)
    assert rows.equals(before)  # the table itself is left as measured
    big = rows.tokens > 17
    raw_err = (rows.median_ms[big] / truth[big] - 1).abs().mean()
    assert (smoothed.median_ms[big] / truth[big] - 1).abs().mean() < raw_err / 2  # the fit averages the noise out
    assert smoothed[~big].equals(rows[~big])  # a token count with too few widths keeps its timings


def test_part_factors_are_recovered_and_stay_non_negative():
    from caitsearch.profile.predictor import fit_factors

    rng = np.random.default_rng(0)
    parts = np.c_[np.full(60, 0.3), rng.uniform(0.5, 5.0, (60, 3)), np.full(60, 0.2)]  # stem, head: constant
    parts[:15, 3] = 0.0  # configs without merges
    true = np.array([1.0, 0.8, 1.1, 1.6, 1.0])
    np.testing.assert_allclose(fit_factors(parts, parts @ true), true, atol=0.02)
    # noise cannot buy a constant part a huge factor (it would act as a free intercept)
    noisy = parts @ true * rng.uniform(0.8, 1.2, 60)
    got = fit_factors(parts, noisy)
    assert (got >= 0).all() and abs(got[0] - 1) < 0.5 and abs(got[4] - 1) < 0.5
    # a part absent from every config keeps factor 1
    assert fit_factors(np.c_[parts[:, :3], np.zeros(60), parts[:, 4]], parts[:, :3].sum(1) + parts[:, 4])[3] == 1.0


def test_metrics_are_computed_correctly():
    m = metrics([110.0, 95.0, 300.0, 40.0], [100.0, 100.0, 200.0, 50.0])
    assert m["mape_pct"] == pytest.approx(100 * (0.10 + 0.05 + 0.5 + 0.2) / 4)
    assert m["within_5pct"] == 0.25 and m["within_10pct"] == 0.5
    # ranks (3, 2, 4, 1) against (2.5, 2.5, 4, 1): Pearson on ranks, ties averaged
    assert m["spearman"] == pytest.approx(4.5 / (5.0 * 4.5) ** 0.5)
    assert m["max_error_pct"] == pytest.approx(50.0)


def test_missing_gpu_or_tensorrt_is_one_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present, so the cuda backend is not missing")
    with pytest.raises(CaitsearchError, match="needs an NVIDIA GPU"):
        check_backend("cuda", "fp16")
    with pytest.raises(CaitsearchError, match="TensorRT Python package|NVIDIA GPU"):
        check_backend("tensorrt", "fp16")
    with pytest.raises(CaitsearchError, match="--backend must be one of"):
        check_backend("tpu", "fp32")


def test_cuda_profile(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    path = build_profile(DEFAULT_MODEL, backend="cuda", dtype="fp16", batch_size=32, out=tmp_path / "cuda",
                         quick=True, progress=False)
    prof = LatencyProfile.load(path)
    assert prof.manifest["fingerprint"]["gpu"] and prof.dense_ms > 0
    table = prof.table
    assert table["sm_clock_mhz"].notna().any()
    result = validate_profile(path, configs=4, progress=False)
    assert 0 <= result["within_10pct"] <= 1


def test_tensorrt_profile(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("tensorrt", reason="needs the TensorRT Python package")
    path = build_profile(DEFAULT_MODEL, backend="tensorrt", dtype="fp16", batch_size=32, out=tmp_path / "trt",
                         quick=True, progress=False)
    prof = LatencyProfile.load(path)
    assert prof.manifest["fingerprint"]["tensorrt"] and prof.dense_ms > 0


def test_profile_command_reports_a_finished_profile_without_remeasuring(profile_dir):
    from typer.testing import CliRunner

    from caitsearch.cli import app

    before = (profile_dir / "table.parquet").stat().st_mtime_ns
    args = ["profile", "--batch-size", "16", "--threads", "1", "--quick", "--out", str(profile_dir), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows"] == json.loads((profile_dir / "manifest.json").read_text())["rows"]
    assert summary["dense_ms"] > 0 and summary["threads"] == 1
    assert (profile_dir / "table.parquet").stat().st_mtime_ns == before


def test_profile_covers_tome_and_validates_its_configs(profile_dir, tmp_path):
    prof = LatencyProfile.load(profile_dir)
    merges = prof.table[prof.table.kind == "merge"]
    assert {"cols", "rows", "tokens"} <= set(merges.axis)
    result = validate_profile(profile_dir, configs=2, out=tmp_path, progress=False, strategy="tome")
    assert result["strategy"] == "tome" and (tmp_path / "validation-tome.png").exists()
    detail = json.loads((tmp_path / "validation-tome.json").read_text())["configs_detail"]
    assert all({b["merge_axis"] for b in d["config"]["blocks"]} <= {"none", "tokens"} for d in detail)


def test_finished_profile_is_topped_up_with_rows_a_newer_plan_adds(profile_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(profile_dir, old)
    table = pd.read_parquet(old / "table.parquet")
    table = table[table.axis != "tokens"].reset_index(drop=True)  # as built before ToMe merges were profiled
    table.to_parquet(old / "table.parquet", index=False)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.update(rows=len(table), table_sha256=hashlib.sha256((old / "table.parquet").read_bytes()).hexdigest())
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CaitsearchError, match="predates ToMe merge rows"):
        LatencyProfile.load(old).predict(CompressionConfig.tome(LatencyProfile.load(old).spec, 4))
    kept = set(table.key)
    build_profile(DEFAULT_MODEL, batch_size=16, threads=1, quick=True, out=old, progress=False)
    topped = pd.read_parquet(old / "table.parquet")
    assert kept < set(topped.key) and set(topped.key) == set(pd.read_parquet(profile_dir / "table.parquet").key)
    assert LatencyProfile.load(old).predict(CompressionConfig.tome(LatencyProfile.load(old).spec, 4)) > 0
