"""The one resumable training loop (`fit`) behind dense training and retraining, and evaluation.

The loop's whole state (weights, optimiser, step, caller state such as CDCP statistics) is written
atomically to `out_dir/state.pt` every `recipe.save_every` steps and at each epoch end; the data
order and augmentation are seeded by (seed, step), so a run killed at any moment (SIGKILL
included) resumes from its last saved step and continues with the batches it would have seen.
Under torchrun each rank takes its share of every global batch and rank 0 writes the files.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from ..console import Progress, log
from ..errors import CaitsearchError, reason
from ..io import atomic_write
from ..models import read_weights_only
from ..tasks import CLASSIFICATION, Task
from .distributed import Dist
from .recipe import Recipe

STATE_FILE = "state.pt"
MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def load_batch(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `(B, C, H, W)` and labels `(B,)` (label maps `(B, H, W)`) of `dataset` at `indices`."""
    items = [dataset[int(i)] for i in indices]
    if items and isinstance(items[0][1], torch.Tensor):
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, ctx: Optional[Dist] = None,
             task: Task = CLASSIFICATION) -> float:
    """The task's score of `model` on `dataset`, in [0, 1]: top-1 accuracy, or mean IoU for
    segmentation (its statistics summed over ranks under torchrun)."""
    ctx = ctx or Dist(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    stats = task.init_stats(model)
    idx = torch.arange(len(dataset))[ctx.rank::ctx.world]
    for start in range(0, len(idx), batch_size):
        x, y = load_batch(dataset, idx[start:start + batch_size])
        stats += task.batch_stats(model(x.to(ctx.device, dtype)), y)
    model.train(was_training)
    stats = ctx.all_sum(stats.to(ctx.device)).cpu()
    return task.reduce(stats)


def steps_per_epoch(train_size: int, batch_size: int, world: int = 1) -> int:
    return max(1, train_size // (max(1, batch_size // world) * world))


STATE_KEYS = {"model": dict, "optimizer": dict, "step": int, "seconds": (int, float), "fingerprint": str}


def load_train_state(path: Path) -> dict:
    """A resume checkpoint, read weights-only (no code runs from it); one that cannot be used is
    refused with the advice to delete it (the run then starts over)."""
    advice = f"; delete {path} to start the run over"
    state = read_weights_only(path, "training state", advice)
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in STATE_KEYS.items()):
        raise CaitsearchError(f"{path} is not a caitsearch training state{advice}.")
    return state


@dataclass(frozen=True)
class Hooks:
    """Caller code inside the loop: `on_step(step, total)` before each step (CDCP mask updates), and
    caller state (CDCP statistics) saved into the checkpoint by `save_extra` and restored by `load_extra`."""

    on_step: Optional[Callable[[int, int], None]] = None
    save_extra: Optional[Callable[[], dict]] = None
    load_extra: Optional[Callable[[dict], None]] = None


def run_fingerprint(what: dict, recipe: Recipe, train_size: int, world: int = 1) -> dict:
    """What a saved state must match to be resumed: `what` is trained, on what, with which schedule."""
    per_rank = max(1, recipe.batch_size // world)
    fingerprint = {**what, "epochs": recipe.epochs, "batch_size": per_rank * world, "lr": recipe.lr,
                   "seed": recipe.seed, "train_size": train_size}
    if recipe.steps is not None:
        fingerprint["steps"] = recipe.steps
    return fingerprint


@dataclass(frozen=True)
class Checkpoint:
    """A run's `state.pt`: read once when opened (refused in one sentence when it cannot be resumed
    or holds a run with other settings), written atomically by rank 0."""

    path: Path
    fingerprint: str
    state: Optional[dict] = None

    @classmethod
    def open(cls, out_dir: Path, fingerprint: dict) -> "Checkpoint":
        path, key = Path(out_dir) / STATE_FILE, json.dumps(fingerprint, sort_keys=True)
        if not path.is_file():
            return cls(path, key)
        state = load_train_state(path)
        if state["fingerprint"] != key:
            raise CaitsearchError(f"{path.parent} holds a run with different settings; pass a new --out or delete {path}.")
        return cls(path, key, state)

    @property
    def step(self) -> int:
        """The saved step to continue from (0 for a fresh run)."""
        return int(self.state["step"]) if self.state is not None else 0

    def announce(self, total: int) -> None:
        """Tell the user their run continues rather than restarts (nothing for a fresh run)."""
        if self.step:
            log(f"resuming from step {self.step} of {total} ({self.path})")

    def restore(self, model: nn.Module, opt: torch.optim.Optimizer, hooks: Hooks) -> tuple[int, float]:
        """Load the saved weights, optimiser and caller state; the (step, training seconds) to continue from."""
        if self.state is None:
            return 0, 0.0
        try:
            model.load_state_dict(self.state["model"])
            opt.load_state_dict(self.state["optimizer"])
            if hooks.load_extra:
                hooks.load_extra(self.state.get("extra", {}))
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise CaitsearchError(f"{self.path} does not fit this run ({reason(e, 120)}); delete it to start over.") from e
        return self.step, float(self.state["seconds"])

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, step: int, seconds: float, hooks: Hooks) -> None:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "seconds": seconds,
                 "fingerprint": self.fingerprint, "extra": hooks.save_extra() if hooks.save_extra else {}}
        atomic_write(self.path, lambda tmp: torch.save(state, tmp))


def adamw(model: nn.Module, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms, tokens of one dimension)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in trainable if p.ndim > 1], "weight_decay": recipe.weight_decay},
                              {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}], lr=recipe.lr)


def lr_at(step: int, recipe: Recipe, total: int) -> float:
    """Linear warmup over `recipe.warmup` of the run, then cosine decay to zero."""
    warmup = max(1, int(recipe.warmup * total))
    if step < warmup:
        return recipe.lr * (step + 1) / warmup
    return 0.5 * recipe.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def batch_rows(train_size: int, recipe: Recipe, step: int, ctx: Dist) -> torch.Tensor:
    """This rank's dataset rows for global `step`: a seeded permutation per epoch, cut into global batches."""
    per_epoch = steps_per_epoch(train_size, recipe.batch_size, ctx.world)
    global_batch = max(1, recipe.batch_size // ctx.world) * ctx.world
    epoch, i = divmod(step, per_epoch)
    order = epoch_order(train_size, recipe.seed, epoch)
    return order[i * global_batch:(i + 1) * global_batch][ctx.rank::ctx.world]


def fit(model: nn.Module, train_set: Dataset, recipe: Recipe, loss_fn: LossFn, ctx: Dist, checkpoint: Checkpoint,
        hooks: Hooks = Hooks(), progress: bool = True, stop_at: Optional[int] = None) -> dict:
    """Train `model` for `total_steps(recipe, ...)` steps with `adamw` and `lr_at`, continuing from
    `checkpoint` and saving to it every `recipe.save_every` steps, at each epoch end and at the last
    step. `stop_at` pauses the run at that step (saved; the next call continues it on the same
    schedule). Returns {"steps" done, "total", "seconds" of training so far, "step_seconds" (median
    of this call's steps), "resumed_from"}."""
    per_epoch = steps_per_epoch(len(train_set), recipe.batch_size, ctx.world)
    total = total_steps(recipe, len(train_set), ctx.world)
    stop = total if stop_at is None else min(stop_at, total)
    opt = adamw(model, recipe)
    step, seconds_before = checkpoint.restore(model, opt, hooks)
    resumed_from = step
    net = model
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, broadcast_buffers=False)
    start = time.perf_counter()
    step_times: list[float] = []
    model.train()
    with Progress(progress and ctx.main) as bar:
        task = bar.task("train", total=total, completed=step)
        while step < stop:
            began = time.perf_counter()
            task.update(description=f"epoch {step // per_epoch + 1}/{recipe.epochs}")
            torch.manual_seed(recipe.seed * 1_000_003 + step * 1009 + ctx.rank)  # augmentation, dropout
            x, y = load_batch(train_set, batch_rows(len(train_set), recipe, step, ctx))
            if hooks.on_step:
                hooks.on_step(step, total)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, recipe, total)
            loss = loss_fn(net, x.to(ctx.device), y.to(ctx.device))
            if not torch.isfinite(loss):
                raise CaitsearchError(f"training diverged at step {step} (loss {loss.item()}); lower --lr.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            task.update(advance=1, info=f"loss {loss.item():.3f}")
            step_times.append(time.perf_counter() - began)
            if step % recipe.save_every == 0 or step % per_epoch == 0 or step == stop:
                if ctx.main:
                    checkpoint.save(model, opt, step, seconds_before + time.perf_counter() - start, hooks)
                ctx.barrier()
    model.eval()
    return {"steps": step, "total": total, "seconds": seconds_before + time.perf_counter() - start,
            "step_seconds": statistics.median(step_times) if step_times else None, "resumed_from": resumed_from}


def total_steps(recipe: Recipe, train_size: int, world: int = 1) -> int:
    """Optimizer steps of a run: `recipe.steps` when set (a time-limited or short run), else whole epochs."""
    if recipe.steps is not None:
        return recipe.steps
    return steps_per_epoch(train_size, recipe.batch_size, world) * recipe.epochs
