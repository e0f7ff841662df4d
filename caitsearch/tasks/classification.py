"""Classification: the task every command ran before tasks existed, and still the default. Each
method is the code the training loop, retraining and the search used inline, unchanged."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import torch
import torch.nn.functional as F
from torch import nn

from ..compress import CaitViT, compress, materialize
from ..config import CompressionConfig
from ..data import Splits, load_dataset


@dataclass(frozen=True)
class Classification:
    """One label per image; scored by top-1 accuracy; the model is the timm model itself."""

    name: str = "classification"
    metric: str = "accuracy"  # the key results carry the score under, besides "accuracy"
    metric_label: str = "accuracy"
    per_pixel: bool = False

    def load_splits(self, source: str | Path, spec, **kwargs) -> Splits:
        return load_dataset(source, spec, **kwargs)

    # ------------------------------------------------------------ models

    def student(self, teacher: nn.Module, config: CompressionConfig, calib=None) -> CaitViT:
        """`config` applied to the dense `teacher` (masks set from `calib` where given)."""
        return compress(teacher, config, calib)

    def backbone(self, model: nn.Module) -> CaitViT:
        """The compressed ViT inside a task model, whose CDCP masks retraining anneals."""
        return model

    def materialize(self, model: nn.Module) -> nn.Module:
        return materialize(model)

    # ------------------------------------------------------------ losses and metric

    def dense_loss(self, logits: torch.Tensor, y: torch.Tensor, recipe) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)

    def distill_loss(self, logits: torch.Tensor, target: torch.Tensor, y: torch.Tensor, recipe) -> torch.Tensor:
        """`distill_weight` x KL(teacher || student) at `temperature` (scaled by T^2) plus the rest x cross-entropy."""
        T = recipe.temperature
        kd = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(target / T, -1), log_target=True,
                      reduction="batchmean") * T * T
        return recipe.distill_weight * kd + (1 - recipe.distill_weight) * F.cross_entropy(logits, y)

    def batch_stats(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Float64 sums over one batch that `reduce` turns into the metric: [correct, count]."""
        pred = logits.argmax(-1).cpu()
        return torch.tensor([(pred == y).sum().item(), len(y)], dtype=torch.float64)

    def init_stats(self, model: nn.Module) -> torch.Tensor:
        return torch.zeros(2, dtype=torch.float64)

    def reduce(self, stats: torch.Tensor) -> float:
        return float(stats[0] / max(stats[1], 1))
