"""Distillation retraining of a compressed config: ATME merges stay on (static grid shapes), CDCP
is dynamic (`compress.DynamicMasks`) until the masks freeze, then the model is materialised.

`Retraining` is one resumable run that can pause at any step and be scored there, which is what
the search's short fine-tunes need; `retrain_compressed` runs one to the end."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from ..compress import CaitViT, DynamicMasks
from ..config import CompressionConfig
from ..data import Splits
from .distributed import init_distributed
from .loop import CONFIG_FILE, STATE_FILE, Checkpoint, Hooks, evaluate, fit, load_batch, run_fingerprint, total_steps
from .outcome import check_classes, finish
from .recipe import Recipe
from ..tasks import CLASSIFICATION, Task

SEED_IMAGES = 512  # calibration images that start the running channel importance


def distillation_loss(recipe: Recipe, teacher: nn.Module, task: Task = CLASSIFICATION):
    """`distill_weight` x KL(teacher || student) at `temperature` (scaled by T^2) plus the rest x
    cross-entropy (for segmentation per pixel, over the class dimension: `task.distill_loss`)."""

    def loss_fn(net, x, y):
        logits = net(x)
        with torch.no_grad():
            target = teacher(x)
        return task.distill_loss(logits, target, y, recipe)

    return loss_fn


class Retraining:
    """Retraining of `config` applied to the dense `teacher`, with distillation from it, in
    `out_dir` (state.pt to resume; at the end model.safetensors, config.json, metrics.json).

    CDCP masks anneal from full width to the config's over `anneal_steps` (default: the recipe's
    `anneal` fraction of the run), re-picked every `recipe.mask_every` steps, then freeze."""

    def __init__(self, teacher: nn.Module, config: CompressionConfig, splits: Splits, recipe: Recipe, out_dir: Path,
                 device: Optional[torch.device] = None, anneal_steps: Optional[int] = None,
                 task: Task = CLASSIFICATION) -> None:
        check_classes(teacher, splits)
        config.validate(getattr(teacher, "spec", teacher))
        self.config, self.splits, self.recipe, self.out_dir, self.task = config, splits, recipe, Path(out_dir), task
        self.ctx = ctx = init_distributed(device)
        self.teacher = teacher.to(ctx.device).eval()
        self.student = task.student(self.teacher, config).to(ctx.device)
        self.masks = DynamicMasks(task.backbone(self.student), recipe.momentum)
        self.total = total_steps(recipe, len(splits.train), ctx.world)
        self.anneal_steps = int(recipe.anneal * self.total) if anneal_steps is None else anneal_steps
        if not (self.out_dir / STATE_FILE).is_file() and len(splits.calib):
            n = min(len(splits.calib), SEED_IMAGES)
            calib = [load_batch(splits.calib, torch.arange(n)[s:s + 256]) for s in range(0, n, 256)]
            self.masks.seed([(x.to(ctx.device), y) for x, y in calib])
        self.stats: dict = {}

    def run(self, until: Optional[int] = None, progress: bool = True) -> dict:
        """Train up to step `until` (default: the end), resuming from the last saved step."""
        ctx, masks, recipe = self.ctx, self.masks, self.recipe
        mean = ctx.mean_over_ranks if ctx.world > 1 else None

        def resume(extra: dict) -> None:
            masks.load_state_dict(extra)
            masks.attach(not masks.frozen)

        masks.attach(True)
        try:
            checkpoint = Checkpoint.open(self.out_dir, run_fingerprint(self._fingerprint(), recipe,
                                                                        len(self.splits.train), ctx.world))
            if until is None and ctx.main:  # rungs continue silently
                checkpoint.announce(self.total)
            hooks = Hooks(on_step=lambda step, total: masks.on_step(step, self.anneal_steps, recipe.mask_every, mean),
                          save_extra=masks.state_dict, load_extra=resume)
            self.stats = fit(self.student, self.splits.train, recipe, distillation_loss(recipe, self.teacher, self.task),
                             ctx, checkpoint, hooks, progress=progress, stop_at=until)
        finally:
            masks.attach(False)
        if self.stats["steps"] >= self.anneal_steps and not masks.frozen:
            masks.on_step(self.anneal_steps, self.anneal_steps, recipe.mask_every, mean)
        return self.stats

    def _fingerprint(self) -> dict:
        recipe = self.recipe
        fingerprint = {"kind": "retrain", "model": self.config.model, "config": self.config.to_dict(),
                       "data": self.splits.name, "anneal": recipe.anneal, "anneal_steps": self.anneal_steps,
                       "mask_every": recipe.mask_every}
        if self.task is not CLASSIFICATION:
            fingerprint["task"] = self.task.name
        return fingerprint

    def score(self, dataset: Dataset) -> float:
        """The task's score (accuracy, mIoU) of the student as it is now (masks at their current widths) on `dataset`."""
        return evaluate(self.student, dataset, batch_size=max(self.recipe.batch_size, 256), ctx=self.ctx,
                        task=self.task)

    def finish(self) -> tuple[CaitViT, dict]:
        """Freeze the masks, materialise, evaluate on val and test, write the files."""
        if not self.masks.frozen:
            self.masks.on_step(self.anneal_steps, self.anneal_steps, self.recipe.mask_every,
                               self.ctx.mean_over_ranks if self.ctx.world > 1 else None)
        final = self.task.materialize(self.student).eval()
        if self.ctx.main:
            self.config.save(self.out_dir / CONFIG_FILE)
        metrics = finish(final, self.splits, self.out_dir, self.stats, self.ctx, self.recipe,
                         {"epochs": self.recipe.epochs, "model": self.config.model,
                          "train_images": len(self.splits.train), "step_seconds": self.stats.get("step_seconds")},
                         task=self.task)
        return final, metrics


def retrain_compressed(teacher: nn.Module, config: CompressionConfig, splits: Splits, recipe: Recipe, out_dir: Path,
                       progress: bool = True, device: Optional[torch.device] = None,
                       task: Task = CLASSIFICATION) -> tuple[nn.Module, dict]:
    """Retrain `config` to the end of `recipe` and return the materialised student (eval mode)
    with {"accuracy": the task's test score, "val_accuracy", "epochs", "seconds", ...}."""
    run = Retraining(teacher, config, splits, recipe, out_dir, device=device, task=task)
    run.run(progress=progress)
    return run.finish()
