"""What the model is asked to do: the task every training, retraining and search step is run for.

A task says how a model is built from a (compressed) backbone, which loss trains it and which
distils into it, how it is scored (top-1 accuracy or mean IoU) and where its data comes from, so
`training/` and `search/` take a task object instead of branching on it:

| method | classification | segmentation |
| --- | --- | --- |
| `load_splits(source, spec, ...)` | `data.load_dataset` | `masks.load_mask_dataset` (Fashion-MNIST masks or a folder) |
| `student(teacher, config, calib)` | `compress(teacher, config)` | compressed backbone + a copy of the decoder |
| `backbone(model)` / `materialize(model)` | the model / `materialize` | its `CaitViT` / materialised backbone + decoder |
| `dense_loss`, `distill_loss` | CE; KL + CE | CE per pixel; KL per pixel over classes + CE |
| `init_stats`, `batch_stats`, `reduce` | [correct, count] -> accuracy | confusion matrix -> mIoU |

Results keep the task's score under `accuracy` / `val_accuracy` (so every reader of a run stays
one code path) and say which it is under `metric`.
"""
from __future__ import annotations

from typing import Union

from ..errors import CaitsearchError
from .classification import Classification
from .segmentation import Segmentation

CLASSIFICATION = Classification()
SEGMENTATION = Segmentation()
TASKS = {t.name: t for t in (CLASSIFICATION, SEGMENTATION)}
Task = Union[Classification, Segmentation]


def get_task(name: Union[str, Task, None]) -> Task:
    """The task named `name` ("classification" or "segmentation"; None: classification)."""
    if name is None:
        return CLASSIFICATION
    if not isinstance(name, str):
        return name
    if name not in TASKS:
        raise CaitsearchError(f"--task must be one of {', '.join(TASKS)}, not {name!r}.")
    return TASKS[name]


__all__ = ["CLASSIFICATION", "Classification", "SEGMENTATION", "Segmentation", "TASKS", "Task", "get_task"]
