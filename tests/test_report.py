"""Reports of a real small search run: the files render, the HTML opens in headless Chromium,
Markdown links resolve, unfinished / failed / over-budget runs still report, and runs compare."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from PIL import Image, ImageStat

from caitsearch.report import load_run, pareto_mask

from conftest import SEARCH_RUN_TRIALS, assert_one_line_error, run_cli  # search_run: the session's one real search (conftest)


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["storage"] = f"sqlite:///{dest / 'study.db'}"
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def _png_ok(path: Path) -> Image.Image:
    assert path.stat().st_size > 5_000, path
    img = Image.open(path)
    assert 300 <= img.width <= 3000 and 200 <= img.height <= 3000, (path, img.size)
    return img


@pytest.mark.slow
def test_report_renders_every_format_and_recommends_the_most_accurate_within_budget(search_run, tmp_path):
    out = tmp_path / "rep"
    res = run_cli("report", search_run, "--format", "md,html,csv,parquet,json", "--out", out, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    written = json.loads(res.stdout)
    summary = json.loads((search_run / "summary.json").read_text())
    cands = summary["candidates"]
    assert cands, "the fixture run should have a candidate within budget"
    # chosen on the validation split (retrained first), never on test
    best = max(cands, key=lambda c: (c["retrained"], c["val_accuracy"], -c["latency_ms"]))
    assert written["recommended"]["trial"] == best["trial"]
    assert (search_run / "ranking.parquet").exists(), \
        f"fewer than two finalists within budget: {(search_run / 'remeasured.json').read_text()}"
    for name in ["tradeoff.png", "ranking.png", *[f"schedule-trial-{c['trial']}.png" for c in cands]]:
        _png_ok(out / name)
    table = pd.read_parquet(out / "candidates.parquet")
    assert pd.read_csv(out / "candidates.csv").shape == table.shape
    inside = table[table["within_budget"]]
    assert sorted(inside["trial"]) == sorted(c["trial"] for c in cands)
    assert inside["recommended"].sum() == 1 and int(inside[inside["recommended"]]["trial"].iloc[0]) == best["trial"]
    row = inside.set_index("trial").loc[best["trial"]]
    assert row["speedup"] == pytest.approx(best["speedup"])
    assert row["prediction_error"] == pytest.approx(best["predicted_latency_ms"] / best["latency_ms"] - 1)
    assert 0 < row["mac_ratio"] < 1 and row["params"] > 0 and row["latency_p90_ms"] >= row["latency_p50_ms"]
    assert len(pd.read_parquet(out / "trials.parquet")) == SEARCH_RUN_TRIALS
    data = json.loads((out / "report.json").read_text())
    assert data["environment"]["batch_size"] and data["environment"]["torch"]
    assert any(c.startswith("cd ") and "caitsearch search --budget 0.9" in c for c in data["commands"])
    md = (out / "report.md").read_text()
    assert f"Deploy trial {best['trial']}" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(["tradeoff.png", "ranking.png", *[f"schedule-trial-{c['trial']}.png" for c in cands]])
    for link in links:  # relative, and resolving to the PNGs beside the Markdown
        assert not Path(link).is_absolute()
        _png_ok(out / link)
    page = (out / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(links)
    assert not re.search(r"(src|href)=['\"](?!data:)", page), "the HTML must not load anything from outside"


@pytest.mark.slow
def test_html_report_opens_in_headless_chromium(search_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    out = tmp_path / "rep"
    assert run_cli("report", search_run, "--format", "html", "--out", out).returncode == 0
    moved = tmp_path / "elsewhere" / "r.html"  # self-contained: it works away from its folder
    moved.parent.mkdir()
    shutil.move(out / "report.html", moved)
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
                    moved.as_uri()], capture_output=True, timeout=120)
    img = _png_ok(shot).convert("RGB")
    assert img.size == (1280, 2000)
    assert max(ImageStat.Stat(img).var) > 500, "the screenshot is blank"
    # the embedded plot drew: a good share of the page is neither white nor near-white
    pixels = np.asarray(img.resize((320, 500)))
    assert (pixels.min(axis=2) < 200).mean() > 0.05


@pytest.mark.slow
def test_failed_and_pruned_trials_from_a_storage_url_are_reported(search_run, tmp_path):
    run = _copy(search_run, tmp_path / "run")
    url = f"sqlite:///{run / 'study.db'}"
    study = optuna.load_study(study_name="search", storage=url)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
    out = tmp_path / "rep"
    res = run_cli("report", run, "--storage", url, "--format", "md,json", "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((out / "report.json").read_text())
    assert data["trials"]["total"] == SEARCH_RUN_TRIALS + 2
    assert data["trials"]["states"] == {"COMPLETE": SEARCH_RUN_TRIALS, "FAIL": 1, "PRUNED": 1}
    assert data["environment"]["trials_from"] == url
    md = (out / "report.md").read_text()
    assert "1 trial(s) failed" in md and "1 trial(s) were pruned" in md
    _png_ok(out / "tradeoff.png")


@pytest.mark.slow
def test_run_without_feasible_candidate_or_summary_still_reports(search_run, tmp_path):
    # what search writes when every re-measured candidate ran over budget on the device
    run = _copy(search_run, tmp_path / "over")
    summary = json.loads((run / "summary.json").read_text())
    summary["over_budget"] += [{"trial": c["trial"], "latency_ms": c["latency_ms"],
                                "predicted_latency_ms": c["predicted_latency_ms"]} for c in summary["candidates"]]
    summary["candidates"] = []
    (run / "summary.json").write_text(json.dumps(summary))
    res = run_cli("report", run, "--format", "md,html,json", "--out", tmp_path / "rep")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "No feasible candidate" in res.stdout
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["recommended"] is None and any("nothing to deploy" in n for n in data["notes"])
    assert "Deploy trial" not in (tmp_path / "rep" / "report.md").read_text()
    _png_ok(tmp_path / "rep" / "tradeoff.png")
    # an interrupted search: trials only
    unfinished = _copy(search_run, tmp_path / "unfinished")
    for name in ("summary.json", "results.parquet", "results.csv"):
        (unfinished / name).unlink()
    shutil.rmtree(unfinished / "candidates")
    res = run_cli("report", unfinished, "--format", "json", "--out", tmp_path / "rep2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert any("has not finished" in n for n in json.loads((tmp_path / "rep2" / "report.json").read_text())["notes"])


@pytest.mark.slow
def test_compare_puts_runs_in_one_table_and_plot(search_run, tmp_path):
    other = _copy(search_run, tmp_path / "other")
    res = run_cli("compare", search_run, other, "--format", "md,csv", "--out", tmp_path / "cmp", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(res.stdout)["runs"]
    assert [r["run"] for r in rows] == ["run", "other"] and rows[0]["budget_ratio"] == pytest.approx(0.9)
    assert rows[0]["recommended"] == rows[1]["recommended"] is not None
    assert len(pd.read_csv(tmp_path / "cmp" / "compare.csv")) == 2
    _png_ok(tmp_path / "cmp" / "compare.png")
    assert "](compare.png)" in (tmp_path / "cmp" / "compare.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["report", "/nonexistent/run"], "does not exist"),
    (["report", ".", "--format", "pdf"], "--format takes"),
    (["report", "{run}", "--storage", "sqlite:///{run}/study.db", "--study-name", "nope"], "no study named 'nope'"),
])
@pytest.mark.slow
def test_bad_report_input_exits_2_with_one_line(search_run, args, message):
    res = run_cli(*[a.format(run=search_run) for a in args])
    assert_one_line_error(res, message)


def test_pareto_mask_keeps_only_undominated_points():
    cost = pd.Series([1.0, 2.0, 2.0, 3.0, 4.0])
    value = pd.Series([0.5, 0.7, 0.6, 0.7, 0.9])
    assert pareto_mask(cost, value).tolist() == [True, True, False, False, True]


def test_candidates_are_drawn_at_their_same_loop_ratio_on_the_dense_markers_scale():
    from caitsearch.report.plots import _dense_scale

    # dense timed at 41.6 ms in round one; a candidate of round three measured 26.4 ms against a
    # dense that ran 44.1 ms in its loop: 0.599x, within a 0.6 budget, so drawn left of 0.6 x 41.6
    cands = pd.DataFrame({"latency_ms": [26.4, 20.0], "speedup": [44.1 / 26.4, None]})
    x = _dense_scale(cands, {"latency_ms": 41.6})
    assert x.iloc[0] == pytest.approx(41.6 * 26.4 / 44.1) and x.iloc[0] < 0.6 * 41.6
    assert x.iloc[1] == 20.0  # no same-loop timing: its own milliseconds
    assert _dense_scale(cands, None).tolist() == [26.4, 20.0]


def test_not_a_run_folder_is_refused(tmp_path):
    from caitsearch.errors import CaitsearchError

    with pytest.raises(CaitsearchError, match="not a caitsearch run folder"):
        load_run(tmp_path)


@pytest.mark.slow
def test_deploy_follows_validation_not_test(search_run, tmp_path):
    """A run where the two splits disagree: the candidate best on validation is deployed, even
    though another scores higher on test."""
    run = _copy(search_run, tmp_path / "disagree")
    summary = json.loads((run / "summary.json").read_text())
    first = summary["candidates"][0]
    other = {**first, "trial": first["trial"] + 1000, "val_accuracy": first["val_accuracy"] - 0.05,
             "accuracy": first["accuracy"] + 0.05, "retrained": True}
    first.update(retrained=True)
    summary["candidates"] = [first, other]
    (run / "summary.json").write_text(json.dumps(summary))
    assert load_run(run).recommended["trial"] == first["trial"]
    res = run_cli("report", run, "--format", "md,json", "--out", tmp_path / "rep", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["recommended"]["trial"] == first["trial"]
    assert f"Deploy trial {first['trial']}" in (tmp_path / "rep" / "report.md").read_text()


@pytest.mark.slow
def test_run_chosen_on_validation_without_a_candidates_validation_score_is_refused(search_run, tmp_path):
    """The deploy choice ranks by val_accuracy when the summary says it chose on it; a candidate
    without one (an edited or truncated summary) is refused in one sentence, not a KeyError."""
    from caitsearch.errors import CaitsearchError

    run = _copy(search_run, tmp_path / "edited")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selection"] == "val_accuracy"
    del summary["candidates"][0]["val_accuracy"]
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(CaitsearchError, match=r"'candidates\[0\]\.val_accuracy' must be a number"):
        load_run(run)
