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
from ..errors import CaitsearchError
from ..data import FASHION_MNIST, Splits
from ..io import write_json
from ..models import create_model, default_checkpoint, load_checkpoint, load_state
from ..tasks import CLASSIFICATION, Task
from ..tasks.segmentation import is_segmentation_state
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

    @property
    def trained(self) -> bool:
        """Whether the whole model holds trained weights (a segmentation model whose decoder was
        only just initialised on a trained backbone does not)."""
        return self.source not in ("random init", "backbone only")


def load_teacher(name: str, img_size: Optional[Sequence[int]] = None, num_classes: Optional[int] = None,
                 checkpoint: Optional[Path] = None, pretrained: bool = False, data: Optional[str] = None,
                 train: Optional[TrainOnce] = None, committed: bool = True, task: Task = CLASSIFICATION) -> Teacher:
    """The dense model `name` with its weights. `data` names the data it will serve (the committed
    weights are Fashion-MNIST ones; `committed=False` skips them, for training from scratch);
    without any weights and without `train`, a freshly initialised model ("random init": fine for
    timing and as a start for dense training, not as a teacher). For `task` segmentation see
    `load_segmentation_teacher`."""
    if task is not CLASSIFICATION:
        return load_segmentation_teacher(task, name, img_size, num_classes, checkpoint, pretrained, data, train,
                                         committed)
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


def load_segmentation_teacher(task: Task, name: str, img_size: Optional[Sequence[int]], num_classes: Optional[int],
                              checkpoint: Optional[Path], pretrained: bool, data: Optional[str],
                              train: Optional[TrainOnce], committed: bool) -> Teacher:
    """The dense segmentation model (backbone + decoder), from the first source that has one:
    a `--checkpoint` saved from a segmentation model; the committed segmentation weights of an
    embedded model on Fashion-MNIST (`committed`); else a backbone (a classification
    `--checkpoint`, `--pretrained`, or the committed classification weights on Fashion-MNIST)
    with a fresh decoder, trained end to end here once when `train` says where ("trained here"),
    or returned as it is ("backbone only", or "random init" without backbone weights either: a
    start for dense training, not a teacher)."""
    if checkpoint is not None:
        state = load_state(checkpoint)
        if is_segmentation_state(state):
            model = task.from_state(name, img_size, state)
            if num_classes is not None and model.num_classes != num_classes:
                raise CaitsearchError(f"checkpoint {checkpoint} segments {model.num_classes} classes but the data has "
                                      f"{num_classes}.")
            return Teacher(model, "checkpoint", Path(checkpoint))
    default = task.default_checkpoint(name)
    if checkpoint is None and committed and default is not None and data in (None, FASHION_MNIST):
        state = load_state(default)
        model = task.from_state(name, img_size, state) if _fits_state(name, img_size, state) else None
        if model is not None and (num_classes is None or model.num_classes == num_classes):
            return Teacher(model, "default weights", default)
    backbone = load_teacher(name, img_size=img_size, checkpoint=checkpoint, pretrained=pretrained, data=data)
    model = task.wrap(backbone.model, num_classes or 2)
    if train is None:
        return Teacher(model, "backbone only" if backbone.source != "random init" else "random init", backbone.path)
    folder = Path(train.folder)
    if not (folder / DONE_FILE).is_file():
        log(f"no segmentation --checkpoint: training the dense {name} with a decoder on {train.splits.name} "
            f"for {train.recipe.epochs} epoch(s) first (backbone: {backbone.source})")
        train_dense(model, train.splits, train.recipe, folder, progress=train.progress, device=train.device, task=task)
        write_json(folder / DONE_FILE, {"trained": True, "epochs": train.recipe.epochs, "task": task.name})
    model = task.from_state(name, img_size, load_state(folder / MODEL_FILE))
    return Teacher(model.cpu().eval(), "trained here", folder / MODEL_FILE)


def _fits_state(name: str, img_size: Optional[Sequence[int]], state: dict) -> bool:
    """Committed segmentation weights fit only the frame they were trained for."""
    own = create_model(name, img_size=img_size).state_dict()
    return all(state.get("backbone.vit." + k) is not None and state["backbone.vit." + k].shape == v.shape
               for k, v in own.items() if k not in ("head.weight", "head.bias"))


def _fits(model: nn.Module, path: Path) -> bool:
    """The committed weights fit only the shape they were trained for (not a custom size or head)."""
    own, weights = model.state_dict(), load_state(path)
    return all(k in weights and weights[k].shape == v.shape for k, v in own.items())
