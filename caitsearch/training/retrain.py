"""Distillation retraining of a compressed config: ATME merges stay on (static grid shapes), CDCP
is dynamic (`compress.DynamicMasks`) until the masks freeze, then the model is materialised."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..compress import CaitViT, DynamicMasks, compress, materialize
from ..config import CompressionConfig
from ..data import Splits
from .distributed import init_distributed
from .loop import CONFIG_FILE, STATE_FILE, fit, load_batch, steps_per_epoch
from .outcome import check_classes, finish
from .recipe import Recipe

SEED_IMAGES = 512  # calibration images that start the running channel importance


def distillation_loss(recipe: Recipe, teacher: nn.Module):
    """`distill_weight` x KL(teacher || student) at `temperature` (scaled by T^2) plus the rest x cross-entropy."""
    T = recipe.temperature

    def loss_fn(net, x, y):
        logits = net(x)
        with torch.no_grad():
            target = teacher(x)
        kd = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(target / T, -1), log_target=True,
                      reduction="batchmean") * T * T
        return recipe.distill_weight * kd + (1 - recipe.distill_weight) * F.cross_entropy(logits, y)

    return loss_fn


def retrain_compressed(teacher: nn.Module, config: CompressionConfig, splits: Splits, recipe: Recipe, out_dir: Path,
                       progress: bool = True, device: Optional[torch.device] = None) -> tuple[CaitViT, dict]:
    """Retrain `config` applied to the dense `teacher` with distillation from it, and return the
    materialised student (eval mode) with {"accuracy": test accuracy, "epochs", "seconds", ...}.
    `out_dir` gets state.pt (resume), model.safetensors (materialised; load with
    `compress.load_materialized`), config.json and metrics.json."""
    check_classes(teacher, splits)
    config.validate(teacher)
    ctx = init_distributed(device)
    teacher = teacher.to(ctx.device).eval()
    student = compress(teacher, config).to(ctx.device)
    masks = DynamicMasks(student, recipe.momentum)
    if not (Path(out_dir) / STATE_FILE).is_file() and len(splits.calib):
        n = min(len(splits.calib), SEED_IMAGES)
        calib = [load_batch(splits.calib, torch.arange(n)[s:s + 256]) for s in range(0, n, 256)]
        masks.seed([(x.to(ctx.device), y) for x, y in calib])
    anneal_steps = int(recipe.anneal * steps_per_epoch(len(splits.train), recipe.batch_size, ctx.world) * recipe.epochs)
    mean = ctx.mean_over_ranks if ctx.world > 1 else None

    def resume(extra: dict) -> None:
        masks.load_state_dict(extra)
        masks.attach(not masks.frozen)

    masks.attach(True)
    try:
        stats = fit(student, splits.train, recipe, out_dir, distillation_loss(recipe, teacher), ctx,
                    fingerprint={"kind": "retrain", "model": config.model, "config": config.to_dict(),
                                 "data": splits.name, "anneal": recipe.anneal, "mask_every": recipe.mask_every},
                    on_step=lambda step, total: masks.on_step(step, anneal_steps, recipe.mask_every, mean),
                    extra_state=masks.state_dict, load_extra=resume, progress=progress)
    finally:
        masks.attach(False)
    if not masks.frozen:
        masks.on_step(anneal_steps, anneal_steps, recipe.mask_every, mean)
    final = materialize(student).eval()
    if ctx.main:
        config.save(Path(out_dir) / CONFIG_FILE)
    metrics = finish(final, splits, out_dir, stats, ctx, recipe,
                     {"epochs": recipe.epochs, "model": config.model, "train_images": len(splits.train)})
    return final, metrics
