"""The latency-budgeted search, end to end on tiny real settings: a real timm ViT, a real latency
profile, real Optuna storages (SQLite, PostgreSQL), real Fashion-MNIST and a real ImageFolder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

from caitsearch.config import CompressionConfig
from caitsearch.errors import CaitsearchError
from caitsearch.models import DEFAULT_MODEL, ModelSpec, create_model
from caitsearch.search import (
    AccuracyProxy, count, driver_url, enqueue_warm_starts, feasible_trials, make_objective, make_sampler, open_study,
    run_trials,
)
from caitsearch.space import SearchSpace

from conftest import TINY, assert_one_line_error, run_cli

optuna.logging.set_verbosity(optuna.logging.WARNING)



def _study(url: str, name: str = "search") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=driver_url(url))


def test_proxy_scores_dense_as_exact_and_compression_as_worse():
    torch.manual_seed(0)
    model = create_model(DEFAULT_MODEL)
    spec = ModelSpec.from_model(model)
    proxy = AccuracyProxy(model, torch.randn(48, 1, 32, 32), torch.randn(16, 1, 32, 32), batch_size=16)
    dense = proxy.score(CompressionConfig.dense(spec))
    assert dense.agreement == 1.0 and dense.kl < 1e-6
    squeezed = proxy.score(CompressionConfig.uniform(spec, keep_rate=0.25, merge_every=1, merge_fraction=0.5))
    assert squeezed.kl > 1e-4 and squeezed.kl > dense.kl
    assert proxy.floor.agreement == 0.0 and proxy.floor.kl > 0


@pytest.mark.slow
def test_budget_constraint_warm_starts_and_exact_counts_across_resumes(tmp_path, quick_profile):
    from caitsearch.profile import LatencyProfile

    torch.manual_seed(0)
    model = create_model(DEFAULT_MODEL)
    spec = ModelSpec.from_model(model)
    space = SearchSpace(spec)
    prof = LatencyProfile.load(quick_profile)
    budget_ms = 0.6 * prof.dense_ms
    proxy = AccuracyProxy(model, torch.randn(32, 1, 32, 32), torch.randn(16, 1, 32, 32))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    # one warm start surely under budget (the narrowest, most merged), one surely over (dense)
    warm = [CompressionConfig.uniform(spec, 0.25, 1, merge_fraction=0.5), CompressionConfig.dense(spec)]
    identity = {"model": spec.name, "budget": {"ratio": 0.6}}
    for total in (5, 9):  # a first run, then a resumed one asking for more
        study, created = open_study(url, "s", make_sampler("random", 0), identity)
        assert created == (total == 5)  # the resumed run loads the study it made
        enqueue_warm_starts(study, space, warm)
        run_trials(study, make_objective(space, proxy, prof.predict, budget_ms, total), total)
        assert count(study) == total
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert sum(bool(t.user_attrs.get("warm_start")) for t in trials) == len(warm)  # enqueued once
    over = [t for t in trials if t.user_attrs["predicted_ms"] > budget_ms]
    under = [t for t in trials if t.user_attrs["predicted_ms"] <= budget_ms]
    assert over and under
    for t in over:  # rejected before any accuracy work: the floor score, a positive constraint
        assert t.constraints["latency"] > 0 and t.user_attrs["agreement"] == 0.0 and t.value == pytest.approx(proxy.floor.kl)
    assert {t.number for t in feasible_trials(study)} <= {t.number for t in under}
    with pytest.raises(CaitsearchError, match="different budget"):
        open_study(url, "s", make_sampler("random", 0), {**identity, "budget": {"ratio": 0.3}})
    # a worker that only joined a shared study leaves the warm starts to the one that created it
    joined, created = open_study(url, "fresh", make_sampler("random", 0), identity)
    joined, created = open_study(url, "fresh", make_sampler("random", 0), identity)
    assert not created and enqueue_warm_starts(joined, space, warm, may_enqueue=False) == 0


@pytest.mark.slow
def test_search_pipeline_on_fashion_mnist(tmp_path, quick_profile, dense_checkpoint):
    run = tmp_path / "run"
    args = ["search", "--budget", "0.9", "--profile", quick_profile, "--checkpoint", dense_checkpoint,
            "--trials", "8", "--retrain-top", "1", "--out", run, *TINY, "--json"]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary == json.loads((run / "summary.json").read_text())
    assert summary["budget"]["ratio"] == 0.9 and summary["budget"]["ms"] > 0
    assert 0 <= summary["dense"]["accuracy"] <= 1 and summary["dense"]["latency_ms"] > 0
    assert summary["trials"]["finished"] == 8
    cands = summary["candidates"]
    assert cands and cands[0]["retrained"]
    for c in cands:  # measured within budget against the dense model of the same timing loop
        assert c["latency_ms"] <= 0.9 * c["timing"]["dense_ms"] + 1e-9
        assert set(c) >= {"accuracy", "latency_ms", "predicted_latency_ms", "speedup", "config"}
        CompressionConfig.from_dict(c["config"]).validate(create_model(DEFAULT_MODEL))
    best = Path(cands[0]["path"])
    for name in ("config.json", "model.safetensors", "result.json", "metrics.json"):
        assert (best / name).is_file()
    results = pd.read_parquet(run / "results.parquet")
    assert len(results) == len(pd.read_csv(run / "results.csv")) >= len(cands)
    assert len(pd.read_parquet(run / "trials.parquet")) == 8
    # the same command again: the study is complete, finished candidates are not redone
    stamp = (best / "result.json").stat().st_mtime_ns
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["trials"]["finished"] == 8
    assert (best / "result.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_tome_strategy_is_searched_and_retrained_the_same_way(tmp_path, quick_profile, dense_checkpoint):
    run = tmp_path / "run"
    res = run_cli("search", "--strategy", "tome", "--budget", "0.8", "--profile", quick_profile, "--checkpoint",
                  dense_checkpoint, "--trials", "6", "--retrain-top", "1", "--out", run, *TINY, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["strategy"] == "tome" and summary["candidates"][0]["retrained"]
    spec = ModelSpec.from_model(create_model(DEFAULT_MODEL))
    for c in summary["candidates"]:
        blocks = CompressionConfig.from_dict(c["config"]).blocks
        assert {b.merge_axis for b in blocks} <= {"tokens", "none"}
        assert all((b.keep_qk, b.keep_v, b.keep_mlp) == (spec.head_dim, spec.head_dim, spec.mlp_hidden) for b in blocks)


@pytest.mark.slow
def test_foreign_default_profile_gives_this_machine_its_own(tmp_path, quick_profile, monkeypatch):
    import shutil

    from caitsearch.profile import build_profile, default_profile_path, find_profile

    spec = ModelSpec.from_model(create_model(DEFAULT_MODEL))
    monkeypatch.chdir(tmp_path)
    committed = default_profile_path(spec.name, spec.img_size)
    shutil.copytree(quick_profile, committed)
    manifest = json.loads((committed / "manifest.json").read_text())
    manifest["fingerprint"]["cpu"] = "Some Other CPU"
    (committed / "manifest.json").write_text(json.dumps(manifest))
    prof = find_profile(spec, progress=False, quick=True)
    assert prof.path.parent == committed.parent and prof.path.name.startswith(committed.name + "-")
    assert json.loads((prof.path / "manifest.json").read_text())["complete"]
    assert json.loads((committed / "manifest.json").read_text())["fingerprint"]["cpu"] == "Some Other CPU"
    assert find_profile(spec, progress=False).path == prof.path  # found again, not rebuilt
    assert build_profile(DEFAULT_MODEL, quick=True, progress=False) == prof.path  # `caitsearch profile` without --out
    shutil.rmtree(committed)  # the other machine's profile gone: this machine's own is still the one found
    assert find_profile(spec, progress=False).path == prof.path and not committed.exists()


@pytest.mark.slow
def test_search_pipeline_on_image_folder(tmp_path, quick_profile):
    from PIL import Image

    root = tmp_path / "stripes"
    for split, n in (("train", 48), ("val", 12)):
        for label, horizontal in (("horizontal", True), ("vertical", False)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                g = torch.Generator().manual_seed(hash((split, label, i)) % 2**31)
                stripes = (torch.arange(20) // (2 + i % 3) % 2).float()
                img = (stripes[:, None] if horizontal else stripes[None, :]).expand(20, 20) * 200 + torch.rand(20, 20, generator=g) * 50
                Image.fromarray(img.byte().numpy()).convert("RGB").save(folder / f"{i}.png")
    run = tmp_path / "run"
    res = run_cli("search", "--budget", "0.9", "--profile", quick_profile, "--data", root, "--trials", "6",
                  "--retrain-top", "1", "--out", run, *TINY, "--calib-size", "16", "--proxy-size", "16", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["data"] == "stripes" and (run / "dense" / "model.safetensors").is_file()  # teacher trained here
    assert summary["trials"]["finished"] == 6
    for c in summary["candidates"]:
        assert 0 <= c["accuracy"] <= 1 and c["latency_ms"] <= 0.9 * c["timing"]["dense_ms"] + 1e-9


@pytest.mark.slow
def test_sigkill_during_search_then_resume_loses_and_repeats_nothing(tmp_path, quick_profile, dense_checkpoint):
    run = tmp_path / "run"
    args = ["search", "--budget", "0.7", "--profile", quick_profile, "--checkpoint", dense_checkpoint,
            "--trials", "16", "--retrain-top", "0", "--out", run, *TINY, "--no-progress"]
    url = f"sqlite:///{run / 'study.db'}"
    proc = subprocess.Popen([sys.executable, "-m", "caitsearch", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            done = _study(url).get_trials(states=(TrialState.COMPLETE,))
        except Exception:  # storage or study not created yet
            continue
        if len(done) >= 4:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the search finished before it could be killed"
    before = {t.number: (t.value, t.params) for t in _study(url).get_trials(states=(TrialState.COMPLETE,))}
    assert len(before) >= 4
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    study = _study(url)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 16
    after = {t.number: (t.value, t.params) for t in complete}
    assert all(after[n] == v for n, v in before.items())  # nothing lost or rescored
    assert len(study.get_trials(states=(TrialState.RUNNING,))) == 0
    warm = [t for t in study.get_trials() if t.user_attrs.get("warm_start")]
    assert len({json.dumps(t.params, sort_keys=True) for t in warm}) == len(warm)  # enqueued once


@pytest.mark.slow
def test_two_workers_share_one_postgres_study(tmp_path, quick_profile, dense_checkpoint, postgres_url):
    trials = 10
    procs = [subprocess.Popen(
        [sys.executable, "-m", "caitsearch", "search", "--budget", "0.7", "--profile", str(quick_profile),
         "--checkpoint", str(dense_checkpoint), "--trials", str(trials), "--retrain-top", "0",
         "--storage", postgres_url, "--study-name", "shared", "--out", str(tmp_path / f"worker{i}"),
         *TINY, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    study = _study(postgres_url, "shared")
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == trials
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == trials  # no duplicates
    assert all(json.loads(o)["trials"]["finished"] == trials for o, _ in outs)
    assert not (tmp_path / "worker0" / "study.db").exists()


@pytest.mark.parametrize("extra, message", [
    (["--budget", "0"], "--budget must be a positive"),
    (["--budget-ms", "-3"], "--budget-ms must be a positive"),
    (["--budget", "0.05"], "is below the fastest config"),
    (["--budget", "0.6", "--model", "deit_tiny_patch16_224", "--img-size", "64", "64"], "profile"),
])
@pytest.mark.slow
def test_bad_budgets_and_foreign_profile_exit_2_with_one_line(tmp_path, quick_profile, extra, message):
    res = run_cli("search", "--profile", quick_profile, "--out", tmp_path / "run", *extra)
    assert_one_line_error(res, message)
    assert not (tmp_path / "run" / "study.db").exists()


def test_pure_pruning_is_reachable_and_warm_started_in_the_joint_space(tmp_path, quick_profile):
    from collections import Counter

    from caitsearch.profile import LatencyProfile
    from caitsearch.search.pipeline import warm_starts
    from caitsearch.search.request import Budget

    spec = ModelSpec.from_model(create_model(DEFAULT_MODEL))
    space = SearchSpace.for_strategy(spec, "cait")
    rng = __import__("random").Random(0)
    families = Counter(space.family_of(space.random_config(rng)) for _ in range(600))
    assert families["prune"] >= 150 and families["merge"] >= 150  # about a third each, not (1/3)^depth
    prof = LatencyProfile.load(quick_profile)
    budget = Budget(ratio=0.6, ms=0.6 * prof.dense_ms)
    warm = warm_starts(space, prof.predict, budget)
    assert warm and all(prof.predict(c) <= budget.ms for c in warm)
    assert space.family_of(warm[0]) == "prune"  # the best uniform pruning schedule leads
    # enqueued, they are the study's first trials, exactly as built
    torch.manual_seed(0)
    model = create_model(DEFAULT_MODEL)
    proxy = AccuracyProxy(model, torch.randn(16, 1, 32, 32), torch.randn(16, 1, 32, 32))
    study, _ = open_study(f"sqlite:///{tmp_path / 's.db'}", "s", make_sampler("tpe", 0, 20), {"x": 1})
    enqueue_warm_starts(study, space, warm)
    run_trials(study, make_objective(space, proxy, prof.predict, budget.ms, len(warm)), len(warm))
    firsts = [CompressionConfig.from_dict(t.user_attrs["config"]) for t in study.trials[:len(warm)]]
    assert firsts == warm and study.trials[0].params["mix"] == "prune"


def test_the_joint_search_gives_every_family_its_share_whatever_the_proxy_prefers(tmp_path, quick_profile):
    """A sampler that learns from the proxy (which prefers merges) must not starve pure pruning:
    after the warm starts every trial's family is fixed to the one furthest below its share."""
    from collections import Counter

    from caitsearch.profile import LatencyProfile
    from caitsearch.search import balance_families

    spec = ModelSpec.from_model(create_model(DEFAULT_MODEL))
    space = SearchSpace.for_strategy(spec, "cait")
    shares = space.family_shares()  # each family gets what its strategy would get alone
    alone = {f: SearchSpace.for_strategy(spec, s).default_trials() for f, s in (("prune", "cdcp"), ("merge", "atme"))}
    assert alone == {"prune": 144, "merge": 100} and space.default_trials() == 144 + 100 + 192
    assert shares == {"prune": 144 / 436, "merge": 100 / 436, "joint": 192 / 436}
    assert [space.next_family(c) for c in ({}, {"prune": 1}, {"prune": 1, "merge": 1})] == ["prune", "merge", "joint"]
    prof = LatencyProfile.load(quick_profile)
    torch.manual_seed(0)
    proxy = AccuracyProxy(create_model(DEFAULT_MODEL), torch.randn(16, 1, 32, 32), torch.randn(16, 1, 32, 32))
    study, _ = open_study(f"sqlite:///{tmp_path / 's.db'}", "s", make_sampler("tpe", 0, 40), {"x": 1})
    study.enqueue_trial(space.params_of(CompressionConfig.uniform(spec, merge_every=1)))  # a warm start waits
    assert balance_families(study, space, 40) is None  # ... and runs first
    run_trials(study, make_objective(space, proxy, prof.predict, 0.6 * prof.dense_ms, 40), 40, space=space)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    mixes = Counter(t.params["mix"] for t in done)
    assert sum(mixes.values()) == 40
    for family, share in shares.items():  # within one trial of its share (the warm start is one merge trial)
        assert abs(mixes[family] - share * 40) <= 1, mixes
    for t in done:  # each family asks only for its own, family-scoped parameters, and they rebuild its config
        assert all(name == "mix" or name.startswith(t.params["mix"] + "/") for name in t.params)
        assert space.config_from_params(t.params).to_dict() == t.user_attrs["config"]
    assert not [t for t in study.trials if t.state == TrialState.WAITING]
    assert balance_families(optuna.create_study(), SearchSpace.for_strategy(spec, "cdcp"), 40) is None


def test_the_family_sampler_is_the_one_asked_for():
    """--sampler random draws each family's trial at random; NSGA-II, whose generations live in the
    study it samples, only gets the family fixed."""
    from caitsearch.search import balance_families

    space = SearchSpace.for_strategy(ModelSpec.from_model(create_model(DEFAULT_MODEL)), "cait")
    fixed = []
    for sampler in ("random", "random", "nsga2"):
        study = optuna.create_study(direction="minimize")
        assert balance_families(study, space, 100, seed=3, sampler=sampler) == "prune"
        fixed.append(study.trials[0].system_attrs["fixed_params"])
    assert fixed[0] == fixed[1] and set(fixed[0]) == {"mix", *space.param_choices("prune")}  # seeded, whole
    assert fixed[2] == {"mix": "prune"}


def test_a_familys_next_trial_depends_only_on_that_familys_trials():
    """TPE splits good from bad trials over the whole study: with merging trials best by proxy,
    pure pruning was drawn at random. Each family's trial is drawn from its own history alone."""
    import random

    from optuna.distributions import CategoricalDistribution

    from caitsearch.search import balance_families

    spec = ModelSpec.from_model(create_model(DEFAULT_MODEL))
    space = SearchSpace.for_strategy(spec, "cait")
    rng = random.Random(0)
    own = [(space.random_config(rng, "prune"), rng.random(), rng.uniform(-2, 2)) for _ in range(20)]

    def study_with(other_seed: int) -> optuna.Study:
        study = optuna.create_study(direction="minimize")
        other = random.Random(other_seed)
        history = own + [(space.random_config(other, f), other.random(), other.uniform(-2, 2))
                         for f in ["merge"] * 40 + ["joint"] * 60]
        for config, kl, over in history:
            params = space.params_of(config)
            choices = {"mix": list(space.families), **space.param_choices(params["mix"])}
            study.add_trial(optuna.trial.create_trial(
                params=params, distributions={k: CategoricalDistribution(choices[k]) for k in params},
                value=kl, constraints={"latency": over}))
        return study

    drawn = []
    for other_seed in (1, 2):
        study = study_with(other_seed)
        assert balance_families(study, space, 436, seed=5) == "prune"  # 20 of its 144 against 40 of 100, 60 of 192
        drawn.append(space.suggest(study.ask()))  # the enqueued trial, as the objective would build it
    assert drawn[0] == drawn[1] and space.family_of(drawn[0]) == "prune"  # the other families changed nothing



@pytest.mark.slow
def test_a_short_run_says_it_cut_the_final_retraining_and_warns_of_a_weak_teacher(tmp_path, quick_profile):
    from caitsearch.io import save_weights

    weak = tmp_path / "weak.safetensors"  # an untrained teacher: near chance on the validation split
    torch.manual_seed(0)
    save_weights(create_model(DEFAULT_MODEL), weak)
    run = tmp_path / "run"
    res = run_cli("search", "--budget", "0.9", "--profile", quick_profile, "--checkpoint", weak, "--trials", "6",
                  "--out", run, *TINY, "--minutes", "0.2", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert "near chance" in summary["teacher"]["warning"] and "near chance" in res.stderr
    plan = summary["final_retraining"][0]
    assert plan["limited_by"] == "--minutes 0.2" and 1 <= plan["steps"] < plan["full_steps"]
    assert summary["candidates"][0]["steps"] == plan["steps"]
    rep = run_cli("report", run, "--format", "md", "--out", tmp_path / "rep")
    assert rep.returncode == 0, rep.stderr[-2000:]
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "to fit --minutes 0.2" in md and "Weak teacher" in md


@pytest.mark.slow
def test_short_fine_tunes_resume_after_sigkill_without_repeating_a_finished_rung(tmp_path, quick_profile,
                                                                                dense_checkpoint):
    run = tmp_path / "run"
    args = ["search", "--budget", "0.9", "--profile", quick_profile, "--checkpoint", dense_checkpoint, "--trials", "12",
            "--out", run, *TINY, "--finalists", "4", "--tune-steps", "6", "--batch-size", "32", "--no-progress"]
    url = f"sqlite:///{run / 'ranking.db'}"
    proc = subprocess.Popen([sys.executable, "-m", "caitsearch", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reported: dict = {}
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            trials = optuna.load_study(study_name="search:rank", storage=url).get_trials()
        except Exception:  # not created yet
            continue
        reported = {t.user_attrs["candidate"]: dict(t.intermediate_values) for t in trials if t.intermediate_values}
        if len(reported) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the search finished before its fine-tunes could be killed"
    states = {c: run / "candidates" / f"trial-{c}" / "tune" / "state.pt" for c in reported}
    stamps = {c: p.stat().st_mtime_ns for c, p in states.items()}
    res = run_cli(*args, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    ranking = {r["trial"]: r for r in json.loads(res.stdout)["ranking"]["candidates"]}
    for c, values in reported.items():  # every rung reported before the kill is kept as it was
        assert all(ranking[c]["val_at"][str(step)] == v for step, v in values.items())
        reached = max(int(s) for s in ranking[c]["val_at"])
        if reached == max(values):  # not promoted after the resume: its fine-tune was not touched again
            assert states[c].stat().st_mtime_ns == stamps[c]
        else:
            assert torch.load(states[c], weights_only=True)["step"] == reached
    trials = optuna.load_study(study_name="search:rank", storage=url).get_trials()
    assert sum(t.state == TrialState.RUNNING for t in trials) == 0


def test_finalists_keep_the_best_pure_pruning_and_merge_heavy_candidate_whatever_the_proxy_says():
    """Re-measured candidates come in proxy order; a proxy that ranks every merge config above the
    pruning ones must not keep pruning out of the short fine-tunes (nor merging out, the other way)."""
    from types import SimpleNamespace

    from caitsearch.search import rank

    spec = ModelSpec.of(create_model(DEFAULT_MODEL))
    joint = [CompressionConfig.uniform(spec, keep_rate=k, merge_every=2, merge_start=1) for k in (0.75, 0.7, 0.65, 0.6)]
    prune = CompressionConfig.uniform(spec, keep_rate=0.5)
    merge = CompressionConfig.uniform(spec, merge_every=1, merge_start=1)
    items = [SimpleNamespace(trial=i, config=c) for i, c in enumerate([*joint, prune, merge])]
    chosen = rank.pick_finalists(items, spec, 3, config_of=lambda c: c.config)
    assert [c.trial for c in chosen] == [0, 4, 5]  # the proxy's best, then the must-haves, in proxy order
    assert [c.trial for c in rank.pick_finalists(items, spec, 8, config_of=lambda c: c.config)] == list(range(6))
    assert rank.pick_finalists(items, spec, 0, config_of=lambda c: c.config) == []
    assert [c.trial for c in rank.pick_finalists(items[:4], spec, 2, config_of=lambda c: c.config)] == [0, 1]
    # rounds over the kinds: a proxy that puts every mixed config first still leaves room for the others
    more = [SimpleNamespace(trial=i, config=c) for i, c in enumerate([*joint, prune, prune.with_blocks(
        b.__class__(b.keep_qk, b.keep_v, b.keep_mlp // 2) for b in prune.blocks), merge])]
    assert [rank.finalist_kind(c.config, spec) for c in more] == ["mixed"] * 4 + ["prune"] * 2 + ["merge-heavy"]
    assert [c.trial for c in rank.pick_finalists(more, spec, 5, config_of=lambda c: c.config)] == [0, 1, 4, 5, 6]


def _remeasure_fixture(ratios: dict, configs: list, dense_predicted_ms: float = 40.0):
    """Trials shaped like the study's (best proxy first) and a `measure` that times trial i at
    `ratios[i]` x dense: the rounds' logic on fixed timings, whatever the machine does."""
    from types import SimpleNamespace

    from caitsearch.search.remeasure import Measured

    trials = [SimpleNamespace(number=i, value=0.1 * i, user_attrs={
        "config": c.to_dict(), "predicted_ms": p * dense_predicted_ms}) for i, (c, p) in enumerate(configs)]
    calls: list[list[int]] = []

    def measure(batch):
        calls.append([t.number for t in batch])
        dense = {"dense_ms": 40.0}
        return dense, [Measured(t.number, CompressionConfig.from_dict(t.user_attrs["config"]), {"kl": t.value},
                                t.user_attrs["predicted_ms"], ratios[t.number] * 40.0, ratios[t.number] <= 0.5, dense)
                       for t in batch]
    return trials, measure, calls


def test_a_kind_that_fell_over_budget_gets_its_next_best_trial_in_the_next_remeasure_round():
    """The proxy ranks every mixed trial above the pruning ones, and the pruning trials of round
    one measure just over budget; the next round must still time the best pruning trial that
    fits after pruning's own correction, or pruning never reaches the ranking (issue 13's budget-0.5
    run: 16 mixed and 6 merge-heavy candidates re-measured, 2 pruning ones, both over budget)."""
    from caitsearch.search import rank
    from caitsearch.search.remeasure import next_round, remeasure_until_within
    from caitsearch.search.request import Budget

    spec = ModelSpec.of(create_model(DEFAULT_MODEL))
    mixed = [CompressionConfig.uniform(spec, keep_rate=k, merge_every=2, merge_start=1) for k in (0.75, 0.7, 0.65, 0.6)]
    prune = [CompressionConfig.uniform(spec, keep_rate=k) for k in (0.5, 0.45, 0.4)]
    merge = CompressionConfig.uniform(spec, merge_every=1, merge_start=1)
    configs = [*mixed, *prune, merge]
    kind_of = {i: rank.finalist_kind(c, spec) for i, c in enumerate(configs)}
    assert list(kind_of.values()) == ["mixed"] * 4 + ["prune"] * 3 + ["merge-heavy"]

    # the round logic alone: short kinds' best first, then rounds over the kinds
    trials, measure, calls = _remeasure_fixture({}, [(c, 0.4) for c in configs])
    numbers = lambda batch: [t.number for t in batch]  # noqa: E731
    assert numbers(next_round(trials, kind_of, {"mixed", "merge-heavy"}, spec, 3)) == [4, 0, 7]
    assert numbers(next_round(trials, kind_of, {"mixed"}, spec, 3)) == [4, 7, 0]
    assert numbers(next_round(trials, kind_of, {"mixed"}, spec, 3, only_short=True)) == [4, 7]
    assert numbers(next_round(trials, kind_of, set(kind_of.values()), spec, 3)) == [0, 4, 7]

    # the whole loop: pruning predicted at 0.49x and 0.47x runs 6% slow (0.52x, 0.498x), merges on time
    ratios = {0: 0.45, 1: 0.46, 2: 0.44, 3: 0.43, 4: 0.519, 5: 0.498, 6: 0.45, 7: 0.47}
    predicted = [0.45, 0.46, 0.44, 0.43, 0.49, 0.47, 0.425, 0.47]
    trials, measure, calls = _remeasure_fixture(ratios, list(zip(configs, predicted)))
    budget = Budget(ms=20.0, ratio=0.5)
    _, measured = remeasure_until_within(measure, [trials[i] for i in (0, 4, 7, 1, 2, 3, 5, 6)], spec, budget, 40.0,
                                         wanted=2, per_round=3)
    # round one: the first three, two within budget (enough), but pruning's 0.519 is over; under
    # pruning's own correction (0.519 / 0.49 = 1.059) trial 5 still fits (0.498), so round two
    # times it alone: the kinds already within budget need nothing more
    assert calls == [[0, 4, 7], [5]]
    assert {m.trial for m in measured if m.within_budget} == {0, 7, 5}

    # one kind alone (cdcp, atme, tome): the next trials that fit in proxy order, as before kinds were told apart
    trials, measure, calls = _remeasure_fixture({0: 0.52, 1: 0.53, 2: 0.45, 3: 0.47},
                                                [(c, p) for c, p in zip(mixed, (0.45, 0.46, 0.44, 0.43))])
    remeasure_until_within(measure, trials, spec, budget, 40.0, wanted=2, per_round=2)
    # round one: 0 and 1 over (ratios 1.156, 1.152 -> correction 1.156); round two: 2 (0.509) no longer
    # fits, 3 (0.497) does
    assert calls == [[0, 1], [3]]


def test_a_teacher_far_below_a_linear_classifier_on_the_pixels_is_called_weak():
    """Issue 13: a teacher well above chance (so the near-chance check is silent) but below what
    the data allows gets a plain warning; the committed teacher gets none."""
    from torch import nn

    from caitsearch.data import load_dataset
    from caitsearch.models import model_spec
    from caitsearch.search.pipeline import teacher_check
    from caitsearch.training import load_batch, load_teacher
    from caitsearch.training.baseline import fit_ridge, pixel_features

    splits = load_dataset("fashion-mnist", model_spec(DEFAULT_MODEL), val_size=1000, train_limit=4000)
    rows = torch.arange(len(splits.train))
    x, y = load_batch(splits.train.subset(rows, augment=False), rows)
    mean, scale, weights = fit_ridge(pixel_features(x, side=2), y, splits.num_classes)

    class Quadrants(nn.Module):  # sees only the mean brightness of the image's four quadrants
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(len(mean), splits.num_classes)
            self.linear.weight.data, self.linear.bias.data = weights[:-1].T.clone(), weights[-1].clone()

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.linear((pixel_features(images, side=2) - mean) / scale)

    weak = teacher_check(Quadrants().eval(), "quadrants", splits, 256)
    assert 2 / splits.num_classes < weak["val_accuracy"] < weak["pixel_baseline_val_accuracy"] - 0.2
    assert "below what the data allows" in weak["warning"] and "near chance" not in weak["warning"]

    teacher = load_teacher(DEFAULT_MODEL, num_classes=splits.num_classes, data=splits.name).model.eval()
    good = teacher_check(teacher, "committed", splits, 256)
    assert good["val_accuracy"] > good["pixel_baseline_val_accuracy"] and "warning" not in good
