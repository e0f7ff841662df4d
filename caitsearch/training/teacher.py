"""The dense teacher every command starts from, from exactly one of four sources, in this order:
a `--checkpoint`, timm's `--pretrained` hub weights, the committed weights of an embedded model
(where they fit the requested shape and data), or, for a search on data of its own, weights
trained here once (kept in the run folder and resumed, never trained twice)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..console import log
from ..data import FASHION_MNIST, Splits
from ..io import write_json
from ..models import create_model, default_checkpoint, load_checkpoint, load_state
from .dense import train_dense
from .loop import MODEL_FILE
from .recipe import Recipe

DONE_FILE = "result.json"


@dataclass(frozen=True)
class TrainOnce:
    """Where and how to train the teacher when no weights are given: `folder` keeps the weights
    (and the resumable state) of that one training run."""

    splits: Splits
    recipe: Recipe
    folder: Path
    progress: bool = True
    device: Optional[torch.device] = None  # where it trains (default: the CPU)


@dataclass(frozen=True)
class Teacher:
    model: nn.Module  # eval mode, on the CPU
    source: str  # "checkpoint", "pretrained", "default weights", "trained here" or "random init"
    path: Optional[Path] = None


def load_teacher(name: str, img_size: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
                 checkpoint: Optional[Path] = None, pretrained: bool = False, data: Optional[str] = None,
                 train: Optional[TrainOnce] = None, committed: bool = True) -> Teacher:
    """The dense model `name` with its weights. `data` names the data it will serve (the committed
    weights are Fashion-MNIST ones; `committed=False` skips them, for training from scratch);
    without any weights and without `train`, a freshly initialised model ("random init": fine for
    timing and as a start for dense training, not as a teacher)."""
    if checkpoint is not None:
        if num_classes is None:  # the checkpoint's own classifier width
            head = load_state(checkpoint).get("head.weight")
            num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else None
        model = create_model(name, img_size=img_size, num_classes=num_classes)
        load_checkpoint(model, checkpoint)
        return Teacher(model.eval(), "checkpoint", Path(checkpoint))
    if pretrained:
        return Teacher(create_model(name, img_size=img_size, num_classes=num_classes, pretrained=True), "pretrained")
    model = create_model(name, img_size=img_size, num_classes=num_classes)
    default = default_checkpoint(name)
    if committed and default is not None and data in (None, FASHION_MNIST) and _fits(model, default):
        load_checkpoint(model, default)
        return Teacher(model.eval(), "default weights", default)
    if train is None:
        return Teacher(model.eval(), "random init")
    folder = Path(train.folder)
    if not (folder / DONE_FILE).is_file():
        log(f"no --checkpoint: training the dense {name} on {train.splits.name} for {train.recipe.epochs} epoch(s) first")
        train_dense(model, train.splits, train.recipe, folder, progress=train.progress, device=train.device)
        write_json(folder / DONE_FILE, {"trained": True, "epochs": train.recipe.epochs})
    load_checkpoint(model, folder / MODEL_FILE)
    return Teacher(model.cpu().eval(), "trained here", folder / MODEL_FILE)


def _fits(model: nn.Module, path: Path) -> bool:
    """The committed weights fit only the shape they were trained for (not a custom size or head)."""
    own, weights = model.state_dict(), load_state(path)
    return all(k in weights and weights[k].shape == v.shape for k, v in own.items())
