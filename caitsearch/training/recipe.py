"""How a model is (re)trained: every setting that changes the result, in one immutable object."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

from ..errors import CaitsearchError

DENSE_LR = 1e-3  # dense training from scratch or fine-tuning
RETRAIN_LR = 5e-4  # distillation retraining starts from the teacher's weights: a gentler peak


@dataclass(frozen=True)
class Recipe:
    """AdamW with a linear warm-up and cosine decay over `epochs`; for retraining, distillation
    (KL at `temperature` weighted `distill_weight`, cross-entropy for the rest) and dynamic CDCP
    masks re-picked every `mask_every` steps while widths anneal over the first `anneal` of training."""

    epochs: int = 6
    steps: Optional[int] = None  # when set, the run's length in optimizer steps instead of whole epochs
    batch_size: int = 128
    lr: float = RETRAIN_LR
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the steps
    seed: int = 0
    save_every: int = 50  # steps between resume checkpoints
    label_smoothing: float = 0.1  # dense training
    temperature: float = 2.0  # retraining from here on
    distill_weight: float = 0.7
    anneal: float = 0.5
    mask_every: int = 10
    momentum: float = 0.9  # of the running channel importance

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "save_every", "mask_every") + (("steps",) if self.steps is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CaitsearchError(f"{name.replace('_', '-')} must be a whole number of at least 1, not {value!r}.")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise CaitsearchError(f"{name.replace('_', '-')} must be a positive finite number, not {value!r}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise CaitsearchError(f"weight-decay must be a finite number of at least 0, not {self.weight_decay!r}.")
        for name in ("warmup", "label_smoothing", "distill_weight", "anneal", "momentum"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise CaitsearchError(f"{name.replace('_', '-')} must lie in [0, 1], not {value!r}.")

    def with_(self, **changes) -> "Recipe":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)
