"""Training: dense on an ImageFolder, dynamic-CDCP retraining, SIGKILL and resume, torchrun DDP, CLI errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from caitsearch.compress import compress, load_materialized
from caitsearch.config import CompressionConfig
from caitsearch.data import load_dataset
from caitsearch.models import DEFAULT_MODEL, ModelSpec, create_model, load_state
from caitsearch.compress import DynamicMasks
from caitsearch.io import save_weights as save_model
from caitsearch.training import Recipe, evaluate, retrain_compressed, train_dense
from conftest import assert_one_line_error, run_cli
from test_data import needs_fmnist, write_image_folder

VENV_BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads mostly wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(model) -> CompressionConfig:
    """Half the widths everywhere, two column merges: a real compressed target."""
    return CompressionConfig.uniform(model, 0.5, 3)


def dense_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "dense.safetensors"
    save_model(create_model(DEFAULT_MODEL), path)
    return path


def test_dense_training_on_an_image_folder_learns_and_saves(tmp_path):
    torch.manual_seed(0)
    root = write_image_folder(tmp_path / "tiny")
    model = create_model(DEFAULT_MODEL, num_classes=2)
    splits = load_dataset(root, ModelSpec.from_model(model), calib_size=2, proxy_size=0, val_size=0)
    metrics = train_dense(model, splits, Recipe(epochs=4, batch_size=8, lr=1e-3), tmp_path / "run", progress=False)
    assert metrics["accuracy"] == 1.0 and metrics["steps"] == 4 * (22 // 8)  # bright vs dark is easy
    reloaded = create_model(DEFAULT_MODEL, num_classes=2, checkpoint=tmp_path / "run" / "model.safetensors")
    assert evaluate(reloaded, splits.test) == 1.0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["accuracy"] == 1.0


def test_dynamic_masks_anneal_and_dropped_channels_keep_their_importance():
    torch.manual_seed(0)
    model = create_model(DEFAULT_MODEL)
    student = compress(model, tiny_config(model))
    masks = DynamicMasks(student)
    qk_full, qk_target = masks.full["qk"], masks.targets[0]["qk"]
    assert [masks.keep(0, "qk", p) for p in (0.0, 1.0)] == [qk_full, qk_target]
    assert qk_target < masks.keep(0, "qk", 0.5) < qk_full
    assert float(student.vit.blocks[0].attn.qk_mask.sum()) == qk_full  # starts at full width
    masks.set_keeps(lambda i, kind: masks.targets[i][kind])
    mask = student.vit.blocks[0].mlp.mask
    assert float(mask.sum()) == masks.targets[0]["mlp"]
    masks.attach(True)
    student(torch.randn(4, 1, 32, 32))
    act = masks.stats[0][1].mean("act")
    assert bool((act[mask == 0] > 0).all())  # measured before masking: a pruned channel can come back


@pytest.mark.slow
@needs_fmnist
def test_retrain_materialises_the_target_widths_and_saved_weights_reload(tmp_path):
    torch.manual_seed(0)
    teacher = create_model(DEFAULT_MODEL)
    cfg = tiny_config(teacher)
    splits = load_dataset("fashion-mnist", ModelSpec.from_model(teacher), calib_size=64, test_limit=64, train_limit=256)
    student, metrics = retrain_compressed(teacher, cfg, splits, Recipe(epochs=1, batch_size=32, mask_every=2),
                                          tmp_path / "rt", progress=False)
    blk = student.vit.blocks[0]
    assert blk.attn.dim_qk == cfg.blocks[0].keep_qk and blk.mlp.fc1.out_features == cfg.blocks[0].keep_mlp
    assert blk.attn.qk_mask is None and metrics["steps"] == 8 and 0 <= metrics["accuracy"] <= 1
    reloaded = load_materialized(teacher, cfg, load_state(tmp_path / "rt" / "model.safetensors")).eval()
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(reloaded(x), student(x))
    assert CompressionConfig.load(tmp_path / "rt" / "config.json") == cfg


@pytest.mark.slow
@needs_fmnist
def test_json_output_stays_clean_while_progress_still_reaches_stderr_unless_silenced(tmp_path):
    """A script that asks for --json still sees long work move (on stderr); --no-progress silences it."""
    args = ["train", "--epochs", "1", "--train-limit", "64", "--batch-size", "32", "--test-limit", "32",
            "--calib-size", "16", "--proxy-size", "16", "--val-size", "16", "--threads", "1", "--json"]
    loud = run_cli(*args, "--out", tmp_path / "loud", env=ENV)
    quiet = run_cli(*args, "--out", tmp_path / "quiet", "--no-progress", env=ENV)
    for run in (loud, quiet):
        assert run.returncode == 0, run.stderr[-2000:]
        assert json.loads(run.stdout)["steps"] == 2  # stdout is the one JSON object, nothing else
    assert "epoch 1/1: 2/2 (" in loud.stderr
    assert "2/2 (" not in quiet.stderr and "dense training: 2 optimizer steps" in quiet.stderr


@pytest.mark.slow
@needs_fmnist
def test_retraining_killed_by_sigkill_resumes_from_its_last_checkpoint(tmp_path):
    ckpt = dense_checkpoint(tmp_path)
    cfg_path = tmp_path / "cfg.json"
    tiny_config(create_model(DEFAULT_MODEL)).save(cfg_path)
    out = tmp_path / "rt"
    args = ["train", "--config", cfg_path, "--checkpoint", ckpt, "--epochs", 2, "--train-limit", 320,
            "--batch-size", 16, "--test-limit", 32, "--calib-size", 64, "--save-every", 4, "--threads", 1,
            "--out", out, "--json"]
    proc = subprocess.Popen([str(VENV_BIN / "caitsearch"), *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = out / "state.pt"
    deadline = time.time() + 120
    while not state.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved = torch.load(state, weights_only=True)["step"]
    assert 4 <= saved < 40 and not (out / "metrics.json").exists()

    done = run_cli(*args, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert metrics["resumed_from_step"] == saved and metrics["steps"] == 40
    assert f"resuming from step {saved} of 40" in done.stderr  # the user sees the run continue, not restart
    assert torch.load(state, weights_only=True)["step"] == 40
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
@needs_fmnist
def test_retraining_under_torchrun_with_two_processes_gives_a_working_checkpoint(tmp_path):
    ckpt = dense_checkpoint(tmp_path)
    teacher = create_model(DEFAULT_MODEL, checkpoint=ckpt)
    cfg = tiny_config(teacher)
    cfg.save(tmp_path / "cfg.json")
    out = tmp_path / "ddp"
    run = subprocess.run(
        [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "caitsearch", "train",
         "--config", str(tmp_path / "cfg.json"), "--checkpoint", str(ckpt), "--epochs", "1", "--train-limit", "128",
         "--batch-size", "32", "--test-limit", "64", "--calib-size", "64", "--threads", "1", "--out", str(out), "--json"],
        capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads(run.stdout)  # rank 0 alone prints
    assert metrics["steps"] == 4 and metrics["test_images"] == 64
    student = load_materialized(teacher, cfg, load_state(out / "model.safetensors")).eval()
    splits = load_dataset("fashion-mnist", ModelSpec.from_model(teacher), calib_size=64, test_limit=64)
    assert evaluate(student, splits.test) == pytest.approx(metrics["accuracy"])


@pytest.mark.slow
def test_cli_missing_dataset_and_foreign_checkpoint_exit_2_with_one_line(tmp_path):
    env = {**ENV, "CAITSEARCH_FASHION_MNIST": str(tmp_path / "empty")}
    missing = run_cli("train", "--epochs", 1, "--out", tmp_path / "a", env=env)
    assert_one_line_error(missing, "apt-get install -y dataset-fashion-mnist")

    foreign = tmp_path / "tiny.safetensors"
    save_model(create_model("deit_tiny_patch16_224", img_size=(32, 32), num_classes=2), foreign)
    root = write_image_folder(tmp_path / "imgs")
    wrong = run_cli("train", "--data", root, "--checkpoint", foreign, "--epochs", 1, "--out", tmp_path / "b", env=ENV)
    assert_one_line_error(wrong, "does not fit model deit_fmnist_patch4_32")


@needs_fmnist
def test_committed_default_weights_load_automatically_and_classify_fashion_mnist():
    from caitsearch.cli.common import load_models
    from caitsearch.models import default_checkpoint

    path = default_checkpoint(DEFAULT_MODEL)
    assert path is not None and path.stat().st_size <= 10 * 2**20
    dense, _, _ = load_models(None)
    torch.testing.assert_close(dense.state_dict(), load_state(path))
    splits = load_dataset("fashion-mnist", ModelSpec.from_model(dense), test_limit=500)
    assert evaluate(dense, splits.test) > 0.7  # README: 75.7% on all 10k; chance is 10%


@pytest.mark.slow
@needs_fmnist
def test_train_strategy_budget_retrains_that_strategys_schedule(tmp_path, quick_profile):
    out = tmp_path / "cdcp"  # the session's profile: without --profile, train would profile into hw_profiles/
    res = run_cli("train", "--strategy", "cdcp", "--budget", "0.6", "--profile", quick_profile, "--epochs", "1",
                  "--train-limit", "256",
                  "--test-limit", "128", "--threads", "1", "--out", out, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    config = CompressionConfig.load(out / "config.json")
    assert all(b.merge_axis == "none" for b in config.blocks)  # cdcp prunes, never merges
    assert any(b.keep_mlp < 512 for b in config.blocks)
    state = load_state(out / "model.safetensors")
    model = load_materialized(create_model(DEFAULT_MODEL), config, state)
    assert model.vit.blocks[0].mlp.fc1.out_features == config.blocks[0].keep_mlp
    assert 0 <= json.loads(res.stdout)["accuracy"] <= 1
