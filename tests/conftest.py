"""Shared fixtures: a quick latency profile and a briefly trained checkpoint of the embedded default
model, a tiny Fashion-MNIST slice, one small real search run, a throwaway PostgreSQL server, and a
CLI runner."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# search settings small enough for a test: a few hundred images, one epoch, two finalists tuned for two steps
TINY = ["--calib-size", "256", "--proxy-size", "64", "--val-size", "256", "--train-limit", "512", "--test-limit", "256",
        "--threads", "1", "--remeasure", "2", "--repeats", "5", "--epochs", "1", "--batch-size", "128",
        "--finalists", "2", "--tune-steps", "2", "--minutes", "0"]


def pytest_configure(config) -> None:
    """Hypothesis keeps caches (constants, unicode tables) in ./.hypothesis: put them in a
    temporary folder instead, removed at the end, so tests write nothing into the repository."""
    try:
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError:
        return
    config.hypothesis_home = tempfile.mkdtemp(prefix="caitsearch-tests-hypothesis-")
    set_hypothesis_home_dir(config.hypothesis_home)


def pytest_unconfigure(config) -> None:
    if getattr(config, "hypothesis_home", None):
        shutil.rmtree(config.hypothesis_home, ignore_errors=True)


def run_cli(*args, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    """Run `caitsearch ARGS` in a fresh process, as a user would."""
    return subprocess.run([sys.executable, "-m", "caitsearch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str = "") -> None:
    """Bad input: exit code 2, exactly one line on stderr containing `fragment`, no traceback."""
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert fragment in lines[0] and "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture(scope="session")
def fashion_mnist() -> str:
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)")
    return "fashion-mnist"


@pytest.fixture(scope="session")
def quick_profile(tmp_path_factory) -> Path:
    """A quick one-thread torch-cpu latency profile of the default model, built once per session."""
    from caitsearch.models import DEFAULT_MODEL
    from caitsearch.profile import build_profile

    return build_profile(DEFAULT_MODEL, threads=1, out=tmp_path_factory.mktemp("profile") / "default",
                         quick=True, progress=False)


@pytest.fixture(scope="session")
def dense_checkpoint(tmp_path_factory, fashion_mnist) -> Path:
    """The default model trained for one epoch on 1024 Fashion-MNIST images: a real teacher, fast."""
    import torch

    from caitsearch.data import load_dataset
    from caitsearch.models import DEFAULT_MODEL, ModelSpec, create_model
    from caitsearch.training import MODEL_FILE, Recipe, train_dense

    torch.manual_seed(0)
    model = create_model(DEFAULT_MODEL)
    splits = load_dataset(fashion_mnist, ModelSpec.from_model(model), calib_size=256, train_limit=1024, test_limit=256)
    out = tmp_path_factory.mktemp("dense")
    train_dense(model, splits, Recipe(epochs=1, batch_size=128, lr=1e-3), out, progress=False)
    return out / MODEL_FILE


SEARCH_RUN_TRIALS = 10


@pytest.fixture(scope="session")
def search_run(tmp_path_factory, quick_profile, dense_checkpoint) -> Path:
    """One real search (10 trials, 2 finalists, 1 retrained), shared by the modules that read runs:
    treat it as read-only (copy it to change it). Ten trials, not fewer, so that two candidates
    still measure within budget on a noisy CPU: the warm starts sit just under it and can
    measure over, and the remeasure's correction then rules out the trials near them."""
    run = tmp_path_factory.mktemp("search") / "run"
    res = run_cli("search", "--budget", "0.9", "--profile", quick_profile, "--checkpoint", dense_checkpoint,
                  "--trials", SEARCH_RUN_TRIALS, "--retrain-top", "1", "--out", run, *TINY, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    return run


@pytest.fixture(scope="session")
def postgres_url():
    """A fresh PostgreSQL server on 127.0.0.1 for the session (skipped where it is not installed)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from postgres import find_bin_dir, postgres_server

    bin_dir = find_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed (apt-get install -y postgresql)")
    with postgres_server(bin_dir) as url:
        yield url
