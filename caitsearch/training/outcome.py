"""What every training run ends with: the class-count check before it, and weights plus metrics after."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..data import Splits
from ..errors import CaitsearchError
from ..io import save_weights, write_json
from ..tasks import CLASSIFICATION, Task
from .distributed import Dist
from .loop import METRICS_FILE, MODEL_FILE, evaluate
from .recipe import Recipe


def check_classes(model: nn.Module, splits: Splits) -> None:
    classes = int(getattr(model, "num_classes", getattr(getattr(model, "spec", None), "num_classes", -1)))
    if classes != splits.num_classes:
        raise CaitsearchError(f"the model predicts {classes} classes but {splits.name} has {splits.num_classes}; "
                              f"pass --num-classes {splits.num_classes}.")


def finish(model: nn.Module, splits: Splits, out_dir: Path, stats: dict, ctx: Dist, recipe: Recipe,
           extra: dict, task: Task = CLASSIFICATION) -> dict:
    """Evaluate on the validation and test splits, then write `model.safetensors` and
    `metrics.json` (rank 0). `accuracy` is the test score (the task's metric; mIoU for
    segmentation, also under `miou`): reported, never used to choose."""
    batch = max(recipe.batch_size, 256)
    accuracy = evaluate(model, splits.test, batch_size=batch, ctx=ctx, task=task)
    val = evaluate(model, splits.val, batch_size=batch, ctx=ctx, task=task) if len(splits.val) else None
    metrics = {"accuracy": accuracy, "val_accuracy": val, "val_images": len(splits.val), **extra, "seconds": stats["seconds"], "steps": stats["steps"],
               "resumed_from_step": stats["resumed_from"], "test_images": len(splits.test), "data": splits.name}
    if task is not CLASSIFICATION:
        metrics.update({"task": task.name, "metric": task.metric, task.metric: accuracy, f"val_{task.metric}": val})
    if ctx.main:
        save_weights(model, Path(out_dir) / MODEL_FILE)
        write_json(Path(out_dir) / METRICS_FILE, metrics)
    ctx.barrier()
    return metrics
