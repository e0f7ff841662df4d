"""What the data allows without learning any features: a linear classifier on the raw pixels.

A teacher near chance is plainly broken, but one at 30% on ten classes of colour photos may look
trained while a least-squares fit on the pixels does better. `pixel_baseline_accuracy` gives the
search a floor that needs no training loop (one ridge-regression solve, about a second), so it can
say when the dense model is far below what its data allows and compressing it is meaningless.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .loop import load_batch

BASELINE_IMAGES = 5000  # training images the baseline is fitted on (a seeded subset)
BASELINE_SIDE = 16  # images are average-pooled to at most this many pixels a side
RIDGE = 0.1  # regularisation, relative to the mean feature variance


def pixel_features(images: torch.Tensor, side: int = BASELINE_SIDE) -> torch.Tensor:
    """`(B, C, H, W)` images -> `(B, C * h * w)` features, pooled to at most `side` x `side`."""
    h, w = images.shape[-2:]
    pooled = F.adaptive_avg_pool2d(images.float(), (min(h, side), min(w, side)))
    return pooled.flatten(1)


def _features(dataset: Dataset, limit: int, seed: int, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    xs, ys = [], []
    for start in range(0, len(order), batch):
        x, y = load_batch(dataset, order[start:start + batch])
        xs.append(pixel_features(x))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares one-vs-rest fit of `(N, D)` features to `(N,)` labels: returns the feature
    mean, scale and weights `(D + 1, num_classes)` (the last row is the bias)."""
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = torch.cat([(x - mean) / scale, torch.ones(len(x), 1)], dim=1).double()
    targets = F.one_hot(y, num_classes).double()
    gram = z.T @ z
    gram += RIDGE * len(x) * torch.eye(len(gram), dtype=gram.dtype)
    return mean, scale, torch.linalg.solve(gram, z.T @ targets).float()


def predict_ridge(fitted: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    mean, scale, weights = fitted
    z = torch.cat([(x - mean) / scale, torch.ones(len(x), 1)], dim=1)
    return (z @ weights).argmax(1)


def pixel_baseline_accuracy(train: Dataset, val: Dataset, num_classes: int, limit: int = BASELINE_IMAGES,
                            seed: int = 0) -> float:
    """Accuracy on `val` of a ridge-regression classifier fitted on up to `limit` images of `train`
    (unaugmented where the dataset can say so: `subset(..., augment=False)`)."""
    if len(train) == 0 or len(val) == 0:
        raise ValueError("the pixel baseline needs training and validation images")
    if hasattr(train, "subset"):
        train = train.subset(torch.arange(len(train)), augment=False)
    fitted = fit_ridge(*_features(train, limit, seed), num_classes)
    x, y = _features(val, len(val), seed)
    return float((predict_ridge(fitted, x) == y).float().mean())
