"""Dense training: the baseline a search compresses, trained (or fine-tuned) with cross-entropy."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..console import log
from ..data import Splits
from ..models import model_name
from ..tasks import CLASSIFICATION, Task
from .distributed import init_distributed
from .loop import Checkpoint, fit, run_fingerprint, total_steps
from .outcome import check_classes, finish
from .recipe import Recipe

# fewer optimizer steps than this rarely train a ViT from scratch: 100 steps left a 10-class
# ImageFolder of 1,237 images at 20.6% test accuracy (500 steps: 59.4%; issue 13)
FEW_STEPS = 1000


def train_dense(model: nn.Module, splits: Splits, recipe: Recipe, out_dir: Path, progress: bool = True,
                device: Optional[torch.device] = None, task: Task = CLASSIFICATION) -> dict:
    """Train (or fine-tune) a dense model of `task` in place (a timm model; for segmentation,
    backbone and decoder together); writes `model.safetensors` and `metrics.json` to `out_dir`
    and returns the metrics ({"accuracy": the task's test score, ...})."""
    check_classes(model, splits)
    ctx = init_distributed(device)
    model.to(ctx.device)
    name = model_name(getattr(model, "backbone", model))
    total = total_steps(recipe, len(splits.train), ctx.world)
    what = {"kind": "dense", "model": name, "data": splits.name}
    if task is not CLASSIFICATION:
        what["task"] = task.name
    # a state that cannot be resumed is refused before anything is said
    checkpoint = Checkpoint.open(out_dir, run_fingerprint(what, recipe, len(splits.train), ctx.world))
    if ctx.main:
        log(f"dense training: {total} optimizer steps ({recipe.epochs} epoch(s) of {len(splits.train)} images "
            f"at batch {recipe.batch_size})")
        checkpoint.announce(total)
        if total < FEW_STEPS:
            log(f"warning: {total} optimizer steps are few for a ViT; expect a weak model: raise --epochs "
                f"(about {math.ceil(FEW_STEPS / max(1, total // recipe.epochs))} for this data) or start from "
                "--pretrained weights.")

    def loss_fn(net, x, y):
        return task.dense_loss(net(x), y, recipe)

    stats = fit(model, splits.train, recipe, loss_fn, ctx, checkpoint, progress=progress)
    return finish(model, splits, out_dir, stats, ctx, recipe, {"epochs": recipe.epochs, "model": name}, task=task)
