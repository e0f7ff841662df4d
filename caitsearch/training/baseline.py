"""What the data allows without learning any features: a linear classifier on the raw pixels.

A teacher near chance is plainly broken, but one at 30% on ten classes of colour photos may look
trained while a least-squares fit on the pixels does better. `pixel_baseline_accuracy` gives the
search a floor that needs no training loop (one ridge-regression solve, about a second), so it can
say when the dense model is far below what its data allows and compressing it is meaningless.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .loop import load_batch

BASELINE_IMAGES = 5000  # training images the baseline is fitted on (a seeded subset)
BASELINE_SIDE = 16  # images are average-pooled to at most this many pixels a side
RIDGE = 0.1  # regularisation per training image (features are standardised to unit variance)


def pixel_features(images: torch.Tensor, side: int = BASELINE_SIDE) -> torch.Tensor:
    """`(B, C, H, W)` images -> `(B, C * h * w)` features, pooled to at most `side` x `side`."""
    h, w = images.shape[-2:]
    pooled = F.adaptive_avg_pool2d(images.float(), (min(h, side), min(w, side)))
    return pooled.flatten(1)


def _features(dataset: Dataset, order: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """`pixel_features` `(N, D)` and labels `(N,)` of `dataset` at the positions `order`."""
    xs, ys = [], []
    for start in range(0, len(order), batch):
        x, y = load_batch(dataset, order[start:start + batch])
        xs.append(pixel_features(x))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


class Ridge(NamedTuple):
    """A fitted one-vs-rest least-squares classifier: feature `mean` and `scale` `(D,)`, and
    `weights` `(D + 1, num_classes)` whose last row is the bias."""

    mean: torch.Tensor
    scale: torch.Tensor
    weights: torch.Tensor


def fit_ridge(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> Ridge:
    """Ridge regression of one-hot `(N,)` labels on standardised `(N, D)` features (the bias is
    not penalised)."""
    mean, scale = x.mean(0), x.std(0, correction=0).clamp_min(1e-6)
    z = torch.cat([(x - mean) / scale, torch.ones(len(x), 1)], dim=1).double()
    targets = F.one_hot(y, num_classes).double()
    penalty = torch.full((z.shape[1],), RIDGE * len(x), dtype=z.dtype)
    penalty[-1] = 0.0
    return Ridge(mean, scale, torch.linalg.solve(z.T @ z + torch.diag(penalty), z.T @ targets).float())


def predict_ridge(fitted: Ridge, x: torch.Tensor) -> torch.Tensor:
    """Class indices `(N,)` for `(N, D)` features."""
    mean, scale, weights = fitted
    z = torch.cat([(x - mean) / scale, torch.ones(len(x), 1)], dim=1)
    return (z @ weights).argmax(1)


def pixel_baseline_accuracy(train: Dataset, val: Dataset, num_classes: int, limit: int = BASELINE_IMAGES,
                            seed: int = 0) -> float:
    """Accuracy on `val` of a ridge-regression classifier fitted on up to `limit` images of `train`
    (unaugmented where the dataset can say so: `subset(..., augment=False)`)."""
    if len(train) == 0 or len(val) == 0:
        raise ValueError("the pixel baseline needs training and validation images")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:limit]
    if hasattr(train, "subset"):
        train, order = train.subset(order, augment=False), torch.arange(len(order))
    fitted = fit_ridge(*_features(train, order), num_classes)
    x, y = _features(val, torch.arange(len(val)))
    return float((predict_ridge(fitted, x) == y).float().mean())
