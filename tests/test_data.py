"""Data: Fashion-MNIST from Debian's IDX files, ImageFolder trees, deterministic disjoint splits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from caitsearch.data import fashion_mnist_dir, load_dataset
from caitsearch.errors import CaitsearchError
from caitsearch.models import DEFAULT_MODEL, ModelSpec, create_model

needs_fmnist = pytest.mark.skipif(
    not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
    reason="needs Debian's dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)",
)


def spec_of(name=DEFAULT_MODEL, **kw) -> ModelSpec:
    return ModelSpec.from_model(create_model(name, **kw))


def write_image_folder(root, classes=("dark", "bright"), per_class=(12, 4), size=(20, 24)):
    """A tiny RGB ImageFolder: 'dark' images are near black, 'bright' ones near white."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                base = 30 if c == 0 else 220
                pixels = np.clip(base + rng.integers(-25, 25, (*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@needs_fmnist
def test_fashion_mnist_splits_are_deterministic_and_calib_is_held_out_of_train():
    spec = spec_of()
    a = load_dataset("fashion-mnist", spec, seed=0, calib_size=500, train_limit=2000, test_limit=300)
    b = load_dataset("fashion-mnist", spec, seed=0, calib_size=500, train_limit=2000, test_limit=300)
    c = load_dataset("fashion-mnist", spec, seed=1, calib_size=500)
    assert (len(a.train), len(a.calib), len(a.test), a.num_classes) == (2000, 500, 300, 10)
    assert torch.equal(a.calib.indices, b.calib.indices) and torch.equal(a.test.indices, b.test.indices)
    assert not torch.equal(a.calib.indices, c.calib.indices)
    assert not set(c.calib.indices.tolist()) & set(c.train.indices.tolist())  # calib never trained on
    # training, calibration, proxy and validation images are disjoint and together the whole training set
    parts = [set(split.indices.tolist()) for split in (c.train, c.calib, c.proxy, c.val)]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 60000 and len(c.test) == 10000
    assert (len(c.calib), len(c.proxy), len(c.val)) == (500, 512, 5000)
    # the default held-out images are the same for every command with the same seed, and a limited
    # training set is drawn from what is left, never from them
    d = load_dataset("fashion-mnist", spec, seed=1, calib_size=500, train_limit=100)
    assert torch.equal(d.val.indices, c.val.indices) and set(d.train.indices.tolist()) <= parts[0]
    x, y = a.calib[0]
    assert x.shape == (1, 32, 32) and 0 <= y < 10
    # 28x28 content centred on a 2-pixel zero border, normalised with the Fashion-MNIST statistics
    border = (0 - 0.2860) / 0.3530
    assert torch.allclose(x[:, :2], torch.full_like(x[:, :2], border)) and x[:, 2:30, 2:30].std() > 0.3
    assert torch.equal(a.calib[0][0], b.calib[0][0])  # no augmentation on calibration images


@needs_fmnist
def test_fashion_mnist_adapts_to_a_three_channel_model_of_another_size():
    splits = load_dataset("fashion-mnist", spec_of("deit_tiny_patch16_224", img_size=(64, 64)), test_limit=4)
    x, _ = splits.test[0]
    assert x.shape == (3, 64, 64) and torch.equal(x[0], x[1])


def test_missing_fashion_mnist_names_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CAITSEARCH_FASHION_MNIST", str(tmp_path))
    with pytest.raises(CaitsearchError, match="apt-get install -y dataset-fashion-mnist"):
        load_dataset("fashion-mnist", spec_of())


def test_image_folder_is_resized_to_the_model_and_split(tmp_path):
    root = write_image_folder(tmp_path / "tiny")
    splits = load_dataset(root, spec_of(), calib_size=4, proxy_size=0, val_size=0, seed=3)
    assert splits.classes == ("bright", "dark") and splits.num_classes == 2
    assert (len(splits.train), len(splits.calib), len(splits.test)) == (20, 4, 8)
    x, y = splits.test[0]
    assert x.shape == (1, 32, 32)  # RGB 20x24 -> grey 32x32 for the 1-channel default model
    means = {label: [] for label in (0, 1)}
    for img, label in (splits.test[i] for i in range(len(splits.test))):
        means[label].append(img.mean().item())
    assert min(means[0]) > max(means[1])  # "bright" (label 0) stays brighter than "dark"


def test_image_folder_errors_are_one_sentence(tmp_path):
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(CaitsearchError, match="needs train/ and val/"):
        load_dataset(tmp_path / "only_train", spec_of())
    with pytest.raises(CaitsearchError, match="neither 'fashion-mnist' nor an ImageFolder"):
        load_dataset(tmp_path / "nope", spec_of())
    (tmp_path / "only_train" / "val" / "a").mkdir(parents=True)
    with pytest.raises(CaitsearchError, match="holds no images"):
        load_dataset(tmp_path / "only_train", spec_of())
