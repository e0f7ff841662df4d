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
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from ..console import Progress
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


def fit(
    model: nn.Module,
    train_set: Dataset,
    recipe: Recipe,
    out_dir: Path,
    loss_fn: LossFn,
    ctx: Dist,
    fingerprint: dict,
    on_step: Optional[Callable[[int, int], None]] = None,
    extra_state: Optional[Callable[[], dict]] = None,
    load_extra: Optional[Callable[[dict], None]] = None,
    progress: bool = True,
    stop_at: Optional[int] = None,
) -> dict:
    """Train `model` for `total_steps(recipe, ...)` steps with AdamW and a warmup-cosine schedule,
    resuming from `out_dir/state.pt` if its `fingerprint` (what is trained, on what) matches.
    `on_step(step, total)` runs before each step (mask updates); `extra_state`/`load_extra` add
    caller state to the checkpoint. `stop_at` pauses the run at that step (saved; the next call
    continues it on the same schedule). Returns {"steps" done, "total", "seconds" of training so
    far, "step_seconds" (median of this call's steps), "resumed_from"}."""
    out_dir = Path(out_dir)
    per_rank = max(1, recipe.batch_size // ctx.world)
    global_batch = per_rank * ctx.world
    per_epoch = steps_per_epoch(len(train_set), recipe.batch_size, ctx.world)
    total = total_steps(recipe, len(train_set), ctx.world)
    stop = total if stop_at is None else min(stop_at, total)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
    warmup = max(1, int(recipe.warmup * total))

    def lr_at(step: int) -> float:
        if step < warmup:
            return recipe.lr * (step + 1) / warmup
        return 0.5 * recipe.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    fingerprint = {**fingerprint, "epochs": recipe.epochs, "batch_size": global_batch, "lr": recipe.lr,
                   "seed": recipe.seed, "train_size": len(train_set)}
    if recipe.steps is not None:
        fingerprint["steps"] = recipe.steps
    step, seconds_before = 0, 0.0
    state_path = out_dir / STATE_FILE
    if state_path.is_file():
        state = load_train_state(state_path)
        if state.get("fingerprint") != json.dumps(fingerprint, sort_keys=True):
            raise CaitsearchError(f"{out_dir} holds a run with different settings; pass a new --out or delete {state_path}.")
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if load_extra:
                load_extra(state.get("extra", {}))
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise CaitsearchError(f"{state_path} does not fit this run ({reason(e, 120)}); delete it to start over.") from e
        step, seconds_before = int(state["step"]), float(state["seconds"])
    resumed_from = step

    net = model
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, broadcast_buffers=False)

    def save() -> None:
        if ctx.main:
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                     "seconds": seconds_before + time.perf_counter() - start,
                     "fingerprint": json.dumps(fingerprint, sort_keys=True),
                     "extra": extra_state() if extra_state else {}}
            atomic_write(state_path, lambda tmp: torch.save(state, tmp))
        ctx.barrier()

    start = time.perf_counter()
    step_times: list[float] = []
    model.train()
    with Progress(progress and ctx.main) as bar:
        task = bar.task("train", total=total, completed=step)
        while step < stop:
            began = time.perf_counter()
            epoch, i = divmod(step, per_epoch)
            task.update(description=f"epoch {epoch + 1}/{recipe.epochs}")
            order = epoch_order(len(train_set), recipe.seed, epoch)
            rows = order[i * global_batch:(i + 1) * global_batch][ctx.rank::ctx.world]
            torch.manual_seed(recipe.seed * 1_000_003 + step * 1009 + ctx.rank)  # augmentation, dropout
            x, y = load_batch(train_set, rows)
            if on_step:
                on_step(step, total)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
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
                save()
    model.eval()
    return {"steps": step, "total": total, "seconds": seconds_before + time.perf_counter() - start,
            "step_seconds": statistics.median(step_times) if step_times else None, "resumed_from": resumed_from}


def total_steps(recipe: Recipe, train_size: int, world: int = 1) -> int:
    """Optimizer steps of a run: `recipe.steps` when set (a time-limited or short run), else whole epochs."""
    if recipe.steps is not None:
        return recipe.steps
    return steps_per_epoch(train_size, recipe.batch_size, world) * recipe.epochs
