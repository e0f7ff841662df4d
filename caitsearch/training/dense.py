"""Dense training: the baseline a search compresses, trained (or fine-tuned) with cross-entropy."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Splits
from ..models import model_name
from .distributed import init_distributed
from .loop import fit
from .outcome import check_classes, finish
from .recipe import Recipe


def train_dense(model: nn.Module, splits: Splits, recipe: Recipe, out_dir: Path, progress: bool = True,
                device: Optional[torch.device] = None) -> dict:
    """Train (or fine-tune) a dense timm model in place; writes `model.safetensors` and
    `metrics.json` to `out_dir` and returns the metrics ({"accuracy": test accuracy, ...})."""
    check_classes(model, splits)
    ctx = init_distributed(device)
    model.to(ctx.device)
    name = model_name(model)

    def loss_fn(net, x, y):
        return F.cross_entropy(net(x), y, label_smoothing=recipe.label_smoothing)

    stats = fit(model, splits.train, recipe, out_dir, loss_fn, ctx,
                fingerprint={"kind": "dense", "model": name, "data": splits.name}, progress=progress)
    return finish(model, splits, out_dir, stats, ctx, recipe, {"epochs": recipe.epochs, "model": name})
