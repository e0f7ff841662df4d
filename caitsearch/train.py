"""Training: the dense baseline, and distillation retraining of a compressed config.

One resumable loop (`fit`) serves both. Its whole state (weights, optimiser, step, CDCP statistics)
is written atomically to `out_dir/state.pt` every `save_every` steps and at each epoch end; the
data order and augmentation are seeded by (seed, step), so a run killed at any moment (SIGKILL
included) resumes from its last saved step and continues with the batches it would have seen.

Launched by `torchrun`, the loop runs data-parallel (DDP; gloo on CPU, NCCL on GPUs): each rank
takes its share of every global batch, rank 0 writes the files, and evaluation sums correct
counts over ranks.

Retraining (`retrain_compressed`) keeps ATME merges on (static grid shapes) and makes CDCP
dynamic (METHOD.md §3): every `mask_every` steps each block's masks are re-selected from running
importance (an exponential moving average of the per-channel activation statistics, measured
before masking so a dropped channel can come back), while the kept width anneals from full to the
config's target along a cubic schedule over the first `anneal` fraction of training. Then the
masks freeze at the target, training continues, and the model is materialised.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .compress import CaitViT, compress, materialize
from .compress.cdcp import ChannelStats, attention_scores, mlp_scores, top_k_mask
from .compress.vit import collect_channel_stats
from .config import CompressionConfig
from .data import Splits
from .errors import CaitsearchError
from .io import atomic_write, atomic_write_text

STATE_FILE = "state.pt"
MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"


# ---------------------------------------------------------------- distributed helpers


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t


def init_distributed(device: Optional[torch.device] = None) -> Dist:
    """Join the torchrun process group if launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device or torch.device("cpu"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return Dist(rank=rank, world=dist.get_world_size(), device=device or torch.device("cpu"))


# ---------------------------------------------------------------- data and evaluation


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _batch(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256, ctx: Optional[Dist] = None) -> float:
    """Top-1 accuracy of `model` on `dataset`, in [0, 1] (summed over ranks under torchrun)."""
    ctx = ctx or Dist(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64)
    idx = torch.arange(len(dataset))[ctx.rank::ctx.world]
    for start in range(0, len(idx), batch_size):
        x, y = _batch(dataset, idx[start:start + batch_size])
        pred = model(x.to(ctx.device)).argmax(-1).cpu()
        correct += torch.tensor([(pred == y).sum().item(), len(y)], dtype=torch.float64)
    model.train(was_training)
    correct = ctx.all_sum(correct.to(ctx.device)).cpu()
    return float(correct[0] / max(correct[1], 1))


# ---------------------------------------------------------------- the loop


@dataclass
class FitPlan:
    """What a run trains and how; `fingerprint` guards resuming against changed settings."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.05
    seed: int = 0
    save_every: int = 50
    warmup: float = 0.05
    fingerprint: dict = field(default_factory=dict)


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[info]}"), console=Console(stderr=True), disable=not enabled,
                    transient=False)


def fit(
    model: nn.Module,
    train_set: Dataset,
    plan: FitPlan,
    out_dir: Path,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    ctx: Dist,
    on_step: Optional[Callable[[int, int], None]] = None,
    extra_state: Optional[Callable[[], dict]] = None,
    load_extra: Optional[Callable[[dict], None]] = None,
    progress: bool = True,
) -> dict:
    """Train `model` for `plan.epochs` with AdamW and a warmup-cosine schedule, resuming from
    `out_dir/state.pt` if present. `on_step(step, total)` runs before each step (mask updates);
    `extra_state`/`load_extra` add caller state to the checkpoint. Returns {"steps", "seconds", "resumed_from"}."""
    out_dir = Path(out_dir)
    per_rank = max(1, plan.batch_size // ctx.world)
    global_batch = per_rank * ctx.world
    steps_per_epoch = max(1, len(train_set) // global_batch)
    total = steps_per_epoch * plan.epochs
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": plan.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=plan.lr)
    warmup = max(1, int(plan.warmup * total))

    def lr_at(step: int) -> float:
        if step < warmup:
            return plan.lr * (step + 1) / warmup
        return 0.5 * plan.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    fingerprint = {**plan.fingerprint, "epochs": plan.epochs, "batch_size": global_batch, "lr": plan.lr,
                   "seed": plan.seed, "train_size": len(train_set)}
    step, seconds_before = 0, 0.0
    state_path = out_dir / STATE_FILE
    if state_path.is_file():
        state = load_train_state(state_path)
        if state.get("fingerprint") != json.dumps(fingerprint, sort_keys=True):
            raise CaitsearchError(f"{out_dir} holds a run with different settings; pass a new --out or delete {state_path}.")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if load_extra:
            load_extra(state.get("extra", {}))
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
    model.train()
    with _progress(progress and ctx.main) as bar:
        task = bar.add_task("train", total=total, completed=step, info="")
        while step < total:
            epoch, i = divmod(step, steps_per_epoch)
            bar.update(task, description=f"epoch {epoch + 1}/{plan.epochs}")
            order = _epoch_order(len(train_set), plan.seed, epoch)
            rows = order[i * global_batch:(i + 1) * global_batch][ctx.rank::ctx.world]
            torch.manual_seed(plan.seed * 1_000_003 + step * 1009 + ctx.rank)  # augmentation, dropout
            x, y = _batch(train_set, rows)
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
            bar.update(task, advance=1, info=f"loss {loss.item():.3f}")
            if step % plan.save_every == 0 or step % steps_per_epoch == 0 or step == total:
                save()
    model.eval()
    return {"steps": total, "seconds": seconds_before + time.perf_counter() - start, "resumed_from": resumed_from}


def load_train_state(path: Path) -> dict:
    """A resume checkpoint, read weights-only (no code runs from it)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CaitsearchError(f"cannot read training state {path}: {str(e).splitlines()[0][:200]}") from e
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CaitsearchError(f"{path} is not a caitsearch training state.")
    return state


def save_model(model: nn.Module, path: Path) -> None:
    """Weights as safetensors, written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def _check_classes(model: nn.Module, splits: Splits) -> None:
    classes = int(getattr(model, "num_classes", getattr(getattr(model, "spec", None), "num_classes", -1)))
    if classes != splits.num_classes:
        raise CaitsearchError(f"the model predicts {classes} classes but {splits.name} has {splits.num_classes}; "
                              f"pass --num-classes {splits.num_classes}.")


def _limit(dataset: Dataset, limit: Optional[int]) -> Dataset:
    return dataset if limit is None or limit >= len(dataset) else dataset.subset(torch.arange(limit))


def _finish(model: nn.Module, splits: Splits, out_dir: Path, stats: dict, ctx: Dist, batch_size: int,
            extra: dict) -> dict:
    accuracy = evaluate(model, splits.test, batch_size=max(batch_size, 256), ctx=ctx)
    metrics = {"accuracy": accuracy, **extra, "seconds": stats["seconds"], "steps": stats["steps"],
               "resumed_from_step": stats["resumed_from"], "test_images": len(splits.test), "data": splits.name}
    if ctx.main:
        save_model(model, Path(out_dir) / MODEL_FILE)
        atomic_write_text(Path(out_dir) / METRICS_FILE, json.dumps(metrics, indent=1) + "\n")
    ctx.barrier()
    return metrics


# ---------------------------------------------------------------- dense baseline


def train_dense(
    model: nn.Module,
    splits: Splits,
    epochs: int,
    out_dir: Path,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    train_limit: Optional[int] = None,
    label_smoothing: float = 0.1,
    save_every: int = 50,
    progress: bool = True,
    device: Optional[torch.device] = None,
) -> dict:
    """Train (or fine-tune) a dense timm model in place; writes `model.safetensors` and
    `metrics.json` to `out_dir` and returns the metrics ({"accuracy": test accuracy, ...})."""
    if epochs < 1 or batch_size < 1 or lr <= 0 or save_every < 1:
        raise CaitsearchError("epochs, batch size and save_every must be >= 1 and the learning rate > 0.")
    _check_classes(model, splits)
    ctx = init_distributed(device)
    model.to(ctx.device)
    train_set = _limit(splits.train, train_limit)
    plan = FitPlan(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, save_every=save_every,
                   fingerprint={"kind": "dense", "model": _name(model), "data": splits.name})

    def loss_fn(net, x, y):
        return F.cross_entropy(net(x), y, label_smoothing=label_smoothing)

    stats = fit(model, train_set, plan, out_dir, loss_fn, ctx, progress=progress)
    return _finish(model, splits, out_dir, stats, ctx, batch_size, {"epochs": epochs, "model": _name(model)})


def _name(model: nn.Module) -> str:
    from .models import _model_name

    return _model_name(model.vit if isinstance(model, CaitViT) else model)


# ---------------------------------------------------------------- retraining with dynamic CDCP


class DynamicMasks:
    """Dynamic CDCP for a `CaitViT` under retraining: running (EMA) channel importance per block,
    and top-k masks whose keep counts anneal from full width to the config's targets."""

    KINDS = ("qk", "v", "mlp")

    def __init__(self, model: CaitViT, momentum: float = 0.9) -> None:
        spec = model.spec
        self.model = model
        self.blocks = list(model.vit.blocks)
        self.full = {"qk": spec.head_dim, "v": spec.head_dim, "mlp": spec.mlp_hidden}
        self.targets = [{"qk": b.keep_qk, "v": b.keep_v, "mlp": b.keep_mlp} for b in model.config.blocks]
        self.momentum = momentum
        self.frozen = False
        self.stats = [(ChannelStats(momentum), ChannelStats(momentum)) for _ in self.blocks]
        self.set_keeps(lambda i, kind: self.full[kind])  # start at full width, masks present where pruned

    def pruned(self, i: int, kind: str) -> bool:
        return self.targets[i][kind] < self.full[kind]

    def seed(self, calib) -> None:
        """Start the running importance from calibration statistics of the unpruned model."""
        for (attn, mlp), (a0, m0) in zip(self.stats, collect_channel_stats(self.model, calib)):
            for run, first in ((attn, a0), (mlp, m0)):
                run.sums = {k: first.mean(k) for k in first.sums}
                run.batches = {k: 1 for k in first.sums}

    def attach(self, on: bool) -> None:
        for blk, (attn, mlp) in zip(self.blocks, self.stats):
            blk.attn.stats, blk.mlp.stats = (attn, mlp) if on else (None, None)

    def keep(self, i: int, kind: str, progress: float) -> int:
        """Cubic anneal (gradual pruning): fast early, gentle near the target."""
        full, target = self.full[kind], self.targets[i][kind]
        return int(round(target + (full - target) * (1.0 - min(1.0, progress)) ** 3))

    def set_keeps(self, keep: Callable[[int, str], int], ctx: Optional[Dist] = None) -> None:
        """Re-select every mask as the top-`keep(i, kind)` channels by current importance. Under
        torchrun the statistics are averaged over ranks first, so every rank picks the same masks."""
        if ctx is not None and ctx.world > 1:
            for pair in self.stats:
                for s in pair:
                    for k in sorted(s.sums):
                        s.sums[k] = ctx.all_sum((s.sums[k] / s.batches[k]).to(ctx.device)).cpu() / ctx.world
                        s.batches[k] = 1
        for i, (blk, (attn_stats, mlp_stats)) in enumerate(zip(self.blocks, self.stats)):
            a, m = blk.attn, blk.mlp
            qk_s, v_s = attention_scores(a.qkv, a.proj, a.num_heads, a.head_dim, attn_stats if attn_stats.sums else None)
            mask = {"qk": top_k_mask(qk_s, keep(i, "qk")), "v": top_k_mask(v_s, keep(i, "v")),
                    "mlp": top_k_mask(mlp_scores(m.fc1, m.fc2, mlp_stats if mlp_stats.sums else None), keep(i, "mlp"))}
            mask = {k: (v if self.pruned(i, k) else None) for k, v in mask.items()}
            a.set_masks(mask["qk"], mask["v"])
            m.set_mask(mask["mlp"])

    def on_step(self, step: int, anneal_steps: int, every: int, ctx: Dist) -> None:
        if self.frozen:
            return
        if step >= anneal_steps:
            self.set_keeps(lambda i, kind: self.targets[i][kind], ctx)
            self.frozen = True
            self.attach(False)
        elif step % every == 0:
            self.set_keeps(lambda i, kind: self.keep(i, kind, step / anneal_steps), ctx)

    def state_dict(self) -> dict:
        return {"frozen": self.frozen, "stats": {f"{i}.{part}.{k}": s.sums[k] / s.batches[k]
                                                 for i, pair in enumerate(self.stats)
                                                 for part, s in zip(("attn", "mlp"), pair) for k in s.sums}}

    def load_state_dict(self, state: dict) -> None:
        self.frozen = bool(state.get("frozen", False))
        for key, value in state.get("stats", {}).items():
            i, part, k = key.split(".")
            s = self.stats[int(i)][0 if part == "attn" else 1]
            s.sums[k], s.batches[k] = value, 1


def retrain_compressed(
    teacher: nn.Module,
    config: CompressionConfig,
    splits: Splits,
    epochs: int,
    out_dir: Path,
    batch_size: int = 128,
    lr: float = 5e-4,
    seed: int = 0,
    train_limit: Optional[int] = None,
    anneal: float = 0.5,
    mask_every: int = 10,
    momentum: float = 0.9,
    temperature: float = 2.0,
    distill_weight: float = 0.7,
    save_every: int = 50,
    progress: bool = True,
    device: Optional[torch.device] = None,
) -> tuple[CaitViT, dict]:
    """Retrain `config` applied to the dense `teacher` with distillation from it, and return the
    materialised student (eval mode) with {"accuracy": test accuracy, "epochs", "seconds", ...}.

    Loss: `distill_weight` x KL(teacher || student) at `temperature` (scaled by T^2) plus the rest
    x cross-entropy. CDCP masks anneal to the target over the first `anneal` fraction of steps,
    re-selected every `mask_every` steps, then freeze. `out_dir` gets state.pt (resume),
    model.safetensors (materialised; load with `compress.load_materialized`), config.json, metrics.json."""
    if epochs < 1 or batch_size < 1 or lr <= 0 or not 0 <= anneal <= 1 or mask_every < 1 or save_every < 1:
        raise CaitsearchError("epochs, batch size, mask_every and save_every must be >= 1, lr > 0 and anneal in [0, 1].")
    _check_classes(teacher, splits)
    config.validate(teacher)
    ctx = init_distributed(device)
    teacher = teacher.to(ctx.device).eval()
    student = compress(teacher, config).to(ctx.device)
    masks = DynamicMasks(student, momentum)
    train_set = _limit(splits.train, train_limit)
    state_exists = (Path(out_dir) / STATE_FILE).is_file()
    if not state_exists and len(splits.calib):
        calib = [_batch(splits.calib, torch.arange(len(splits.calib))[s:s + 256]) for s in range(0, min(len(splits.calib), 512), 256)]
        masks.seed([(x.to(ctx.device), y) for x, y in calib])
    plan = FitPlan(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, save_every=save_every,
                   fingerprint={"kind": "retrain", "model": config.model, "config": config.to_dict(),
                                "data": splits.name, "anneal": anneal, "mask_every": mask_every})
    steps_total = max(1, len(train_set) // (max(1, batch_size // ctx.world) * ctx.world)) * epochs
    anneal_steps = int(anneal * steps_total)
    T = temperature

    def loss_fn(net, x, y):
        logits = net(x)
        with torch.no_grad():
            target = teacher(x)
        kd = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(target / T, -1), log_target=True,
                      reduction="batchmean") * T * T
        return distill_weight * kd + (1 - distill_weight) * F.cross_entropy(logits, y)

    def resume(extra: dict) -> None:
        masks.load_state_dict(extra)
        masks.attach(not masks.frozen)

    masks.attach(True)
    try:
        stats = fit(student, train_set, plan, out_dir, loss_fn, ctx,
                    on_step=lambda step, total: masks.on_step(step, anneal_steps, mask_every, ctx),
                    extra_state=masks.state_dict, load_extra=resume, progress=progress)
    finally:
        masks.attach(False)
    if not masks.frozen:
        masks.on_step(steps_total, anneal_steps, mask_every, ctx)
    final = materialize(student).eval()
    if ctx.main:
        config.save(Path(out_dir) / CONFIG_FILE)
    metrics = _finish(final, splits, out_dir, stats, ctx, batch_size,
                      {"epochs": epochs, "model": config.model, "train_images": len(train_set)})
    return final, metrics
