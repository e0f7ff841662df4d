"""Segmentation transfer: per-pixel Fashion-MNIST labels, the head on a (compressed) backbone's
patch map, mIoU, and the bench script end to end."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from caitsearch import CompressionConfig, compress
from caitsearch.data import FASHION_MNIST_STATS, make_frame, read_fashion_mnist
from caitsearch.models import DEFAULT_MODEL, ModelSpec, create_model, default_checkpoint
from caitsearch.segment import (
    FASHION_MNIST_FILL,
    FOREGROUND_THRESHOLD,
    NUM_SEG_CLASSES,
    confusion_matrix,
    frame_labels,
    miou,
    miou_from_confusion,
    pixel_labels,
    segmentation_split,
    train_head,
)

BENCH = Path(__file__).resolve().parent.parent / "bench" / "segmentation_bench.py"


def default_spec(**kwargs) -> ModelSpec:
    return ModelSpec.from_model(create_model(DEFAULT_MODEL, **kwargs))


def test_labels_are_background_at_or_below_the_threshold_and_class_plus_one_above():
    raw = torch.tensor([[0, FOREGROUND_THRESHOLD], [FOREGROUND_THRESHOLD + 1, 255]], dtype=torch.uint8)
    labels = pixel_labels(torch.stack([raw, raw])[:, None], torch.tensor([0, 9]))
    assert labels.dtype == torch.int64
    assert labels[0].tolist() == [[0, 0], [1, 1]] and labels[1].tolist() == [[0, 0], [10, 10]]


def test_label_framing_scales_with_nearest_neighbour_into_the_image_box():
    spec = default_spec(img_size=(64, 64))  # 28 -> 56 inside a 64x64 frame, 4-pixel border
    labels = torch.arange(28 * 28).view(1, 28, 28) % 7 + 1
    framed = frame_labels(labels, spec)
    assert framed.shape == (1, 64, 64)
    assert (framed[:, :4] == 0).all() and (framed[:, :, -4:] == 0).all()
    assert torch.equal(framed[0, 4:60, 4:60], labels[0].repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_split_frames_labels_exactly_as_its_images(fashion_mnist):
    spec = default_spec()
    images, labels = segmentation_split("test", spec)
    raw, classes = read_fashion_mnist("test")
    assert images.shape == (10000, 1, 32, 32) and labels.shape == (10000, 32, 32) and labels.dtype == torch.int64
    # 28 -> 28 inside a 32x32 frame: a 2-pixel background border, then the raw pixels' labels
    assert (labels[:, :2] == 0).all() and (labels[:, 30:] == 0).all() and (labels[:, :, :2] == 0).all()
    expected = torch.where(raw[:, 0] > FOREGROUND_THRESHOLD, classes.view(-1, 1, 1) + 1, 0)
    assert torch.equal(labels[:, 2:30, 2:30], expected)
    # foreground is exactly where the framed image is above the framed threshold
    frame = make_frame(spec, *FASHION_MNIST_STATS, fill=FASHION_MNIST_FILL)
    threshold = frame(torch.full((1, 28, 28), FOREGROUND_THRESHOLD, dtype=torch.uint8))[0, 16, 16]
    assert torch.equal(labels > 0, images[:, 0] > threshold)
    # a seeded subset is reproducible and keeps images with their own labels
    subset_images, subset_labels = segmentation_split("test", spec, limit=16, seed=3)
    again_images, again_labels = segmentation_split("test", spec, limit=16, seed=3)
    assert torch.equal(subset_images, again_images) and torch.equal(subset_labels, again_labels)
    flat = images.flatten(1)
    for image, label in zip(subset_images, subset_labels):
        row = int(torch.nonzero((flat == image.flatten()).all(1))[0, 0])
        assert torch.equal(labels[row], label)


def test_miou_of_a_perfect_prediction_is_one_and_of_a_known_confusion_is_hand_computed():
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    assert miou_from_confusion(confusion_matrix(target, target, NUM_SEG_CLASSES)) == 1.0
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 2, 0])
    # class 0: hits 3, union 4 + 4 - 3 = 5; class 1: hits 2, union 2 + 3 - 2 = 3; class 2: hits 1, union 2 + 1 - 1 = 2
    expected = (3 / 5 + 2 / 3 + 1 / 2) / 3
    assert miou_from_confusion(confusion_matrix(pred, target, NUM_SEG_CLASSES)) == pytest.approx(expected)
    # a class only predicted counts (IoU 0); classes in neither are left out
    assert miou_from_confusion(confusion_matrix(torch.tensor([5, 0]), torch.tensor([0, 0]), NUM_SEG_CLASSES)) == 0.25


def test_miou_accumulates_over_batches_of_a_model():
    labels = torch.randint(0, NUM_SEG_CLASSES, (5, 4, 4))
    one_hot = torch.nn.functional.one_hot(labels, NUM_SEG_CLASSES).permute(0, 3, 1, 2).float()
    wrong_on_last = labels.clone()
    wrong_on_last[-1] = (wrong_on_last[-1] + 1) % NUM_SEG_CLASSES
    assert miou(torch.nn.Identity(), one_hot, labels, batch_size=2) == 1.0
    whole = miou_from_confusion(confusion_matrix(wrong_on_last, labels, NUM_SEG_CLASSES))
    assert miou(torch.nn.Identity(), one_hot, wrong_on_last, batch_size=2) == pytest.approx(whole)
    assert whole < 1.0


def test_head_on_a_compressed_backbone_beats_the_all_background_baseline(fashion_mnist):
    dense = create_model(DEFAULT_MODEL, checkpoint=default_checkpoint(DEFAULT_MODEL))
    spec = ModelSpec.from_model(dense)
    backbone = compress(dense, CompressionConfig.uniform(spec, keep_rate=0.75, merge_every=2)).eval()
    images, labels = segmentation_split("train", spec, limit=512)
    test_images, test_labels = segmentation_split("test", spec, limit=128)
    model = train_head(backbone, images, labels, epochs=4, batch_size=64)
    assert model(test_images[:3]).shape == (3, NUM_SEG_CLASSES, 32, 32)
    assert not any(p.requires_grad and p.grad is not None for p in backbone.parameters())  # frozen
    all_background = miou_from_confusion(confusion_matrix(torch.zeros_like(test_labels), test_labels, NUM_SEG_CLASSES))
    present = len(test_labels.unique())  # background IoU = its pixel share, every item class 0
    assert all_background == pytest.approx((test_labels == 0).double().mean().item() / present)
    score = miou(model, test_images, test_labels)
    assert score > all_background + 0.2


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_bench_runs_end_to_end_and_writes_rows(fashion_mnist, tmp_path, quick_profile):
    """A reduced end-to-end bench: a briefly trained dense segmentation model, atme and tome at one
    budget and a given cait config, each retrained for two steps, timed against dense."""
    dense = tmp_path / "dense"
    proc = subprocess.run([sys.executable, "-m", "caitsearch", "train", "--task", "segmentation", "--epochs", "1",
                           "--train-limit", "128", "--test-limit", "32", "--calib-size", "32", "--proxy-size", "32",
                           "--val-size", "32", "--threads", "1", "--out", str(dense)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    config = tmp_path / "cait.json"
    CompressionConfig.uniform(default_spec(), keep_rate=0.75, merge_every=2, merge_start=1).save(config)
    out = tmp_path / "seg.json"
    proc = run_bench("--checkpoint", str(dense / "model.safetensors"), "--profile", str(quick_profile), "--budgets", "0.7",
                     "--strategies", "cait", "atme", "tome", "--cait-config", f"0.7={config}", "--steps", "2",
                     "--train-limit", "128", "--test-limit", "32", "--calib", "32", "--proxy", "32", "--val", "32",
                     "--repeats", "3", "--threads", "1", "--work", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    rows = {r["label"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "cait@0.7", "atme@0.7", "tome@0.7"]
    assert rows["dense"]["speedup"] == 1.0 and rows["dense"]["miou_delta_points"] == 0.0
    assert rows["cait@0.7"]["merges"] == 3 and rows["tome@0.7"]["merges"] >= 1 and rows["atme@0.7"]["steps"] == 2
    assert all(0 <= r["miou"] <= 1 and r["latency_ms"] > 0 for r in rows.values())
    assert {"cait_merge_fast_and_close", "atme_over_tome@0.7", "cait_over_best_single@0.7"} <= set(result["goals"])
    assert out.with_suffix(".png").is_file() and "| atme@0.7 |" in proc.stdout


def load_bench_module():
    spec = importlib.util.spec_from_file_location("segmentation_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_goals_are_judged_from_the_rows():
    bench = load_bench_module()
    row = lambda label, strategy, miou, speedup, merges=1: {  # noqa: E731
        "label": label, "strategy": strategy, "miou": miou, "speedup": speedup, "merges": merges,
        "latency_ms": 10 / speedup, "miou_delta_points": 100 * (miou - 0.80)}
    rows = [row("dense", "dense", 0.80, 1.0, 0), row("cait@0.7", "cait", 0.795, 1.4), row("atme@0.7", "atme", 0.79, 1.4),
            row("cdcp@0.7", "cdcp", 0.78, 1.4, 0), row("tome@0.7", "tome", 0.75, 1.4)]
    goals = bench.goals(rows, [0.7])
    assert goals["cait_merge_fast_and_close"]["met"] and goals["cait_merge_fast_and_close"]["best"] == "cait@0.7"
    assert goals["atme_over_tome@0.7"]["met"] and goals["atme_over_tome@0.7"]["points"] == pytest.approx(4.0)
    assert goals["cait_over_best_single@0.7"]["met"] and goals["cait_over_best_single@0.7"]["best_single"] == "atme@0.7"
    rows[1] = row("cait@0.7", "cait", 0.785, 1.4)  # 1.5 points below dense, below atme
    goals = bench.goals(rows, [0.7])
    assert not goals["cait_merge_fast_and_close"]["met"] and not goals["cait_over_best_single@0.7"]["met"]
    # a deployed cait model that merges nothing cannot meet goal 1; its best-ranked merging one can
    rows[1] = row("cait@0.7", "cait", 0.799, 1.4, 0)
    goals = bench.goals(rows + [row("cait+merge@0.7", "cait+merge", 0.792, 1.35)], [0.7])
    assert goals["cait_merge_fast_and_close"]["met"] and goals["cait_merge_fast_and_close"]["best"] == "cait+merge@0.7"
    assert goals["cait_over_best_single@0.7"]["met"]
    assert not bench.goals(rows, [0.7])["cait_merge_fast_and_close"]["met"]


@pytest.mark.slow
def test_bench_script_refuses_a_teacher_that_is_not_a_segmentation_model(tmp_path, dense_checkpoint):
    proc = run_bench("--checkpoint", str(dense_checkpoint), "--out", str(tmp_path / "x.json"), "--threads", "1")
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0 and "needs the dense segmentation model" in lines[-1], proc.stderr
    assert not (tmp_path / "x.json").exists()
