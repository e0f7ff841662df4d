"""The search objective: how closely a compressed model, untrained, follows the dense one.

Retraining every trial is far too slow, so a trial is scored on the proxy split by comparing
`compress(dense, config, calib)` (ATME merges plus importance-based CDCP masks, same weights) with
the dense model's logits, computed once: top-1 agreement, and the mean KL divergence
KL(dense || compressed). KL is the objective (smaller is better): it is continuous where
agreement moves in steps of one image, and it still ranks configs that agree on every image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..compress import compress
from ..config import CompressionConfig
from ..errors import CaitsearchError


def stack_images(data: Union[torch.Tensor, Iterable], limit: Optional[int] = None) -> torch.Tensor:
    """Images of a tensor, a dataset of (image, label) pairs or a loader of batches, as one tensor."""
    if isinstance(data, torch.Tensor):
        return data[:limit]
    images, count = [], 0
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        x = x.unsqueeze(0) if x.dim() == 3 else x
        images.append(x)
        count += x.shape[0]
        if limit is not None and count >= limit:
            break
    if not images:
        raise CaitsearchError("the calibration split is empty; the search needs images to score configs.")
    return torch.cat(images)[:limit]


@dataclass(frozen=True)
class ProxyScore:
    agreement: float  # share of calibration images where the top-1 class matches the dense model
    kl: float  # mean KL(dense || compressed) in nats

    def as_dict(self) -> dict:
        return {"agreement": self.agreement, "kl": self.kl}


class AccuracyProxy:
    """Scores configs against the dense model on fixed images.

    `stats_images` feed CDCP's channel importance and `images` are scored; they should be disjoint
    (the data's `calib` and `proxy` splits), so the images that chose the channels do not also
    judge the choice. Dense logits are computed once, here.
    """

    def __init__(self, dense: nn.Module, images: torch.Tensor, stats_images: torch.Tensor, batch_size: int = 256):
        if images.shape[0] == 0 or stats_images.shape[0] == 0:
            raise CaitsearchError("the calibration or proxy split is empty; the search needs images to score configs.")
        self.dense = dense.eval()
        self.size = int(images.shape[0])
        self.batch_size = batch_size
        self.batches = list(images.split(batch_size))
        self.stats_images = stats_images
        self.dense_log_probs = torch.cat([F.log_softmax(logits, -1) for logits in self._logits(self.dense)])

    @torch.inference_mode()
    def _logits(self, model: nn.Module) -> list[torch.Tensor]:
        """fp32 CPU logits per batch, the images sent to the model's device and dtype."""
        weight = next(model.parameters())
        return [model(x.to(weight.device, weight.dtype)).float().cpu() for x in self.batches]

    @property
    def floor(self) -> ProxyScore:
        """The score of a model that knows nothing (uniform prediction): what over-budget trials get."""
        p = self.dense_log_probs
        uniform = torch.full_like(p, -torch.log(torch.tensor(float(p.shape[-1]))).item())
        return ProxyScore(agreement=0.0, kl=_kl(p, uniform))

    def score(self, config: CompressionConfig) -> ProxyScore:
        model = compress(self.dense, config, self.stats_images).eval()
        log_q = torch.cat([F.log_softmax(logits, -1) for logits in self._logits(model)])
        agreement = (log_q.argmax(-1) == self.dense_log_probs.argmax(-1)).float().mean().item()
        return ProxyScore(agreement=agreement, kl=_kl(self.dense_log_probs, log_q))


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean").clamp_min(0.0).item()


@dataclass(frozen=True)
class PixelScore:
    """A segmentation config's untrained score: per-pixel KL to the dense model (the objective),
    per-pixel argmax agreement with it, and mIoU against the proxy split's labels."""

    agreement: float
    kl: float
    miou: float

    def as_dict(self) -> dict:
        return {"agreement": self.agreement, "kl": self.kl, "miou": self.miou}


class PixelProxy:
    """`AccuracyProxy` for a per-pixel task: the config applied to the dense model's backbone
    with the dense decoder (`task.student`), untrained, scored on the proxy images against the
    dense model's per-pixel class distributions (KL over the class dimension, averaged over
    pixels) and against the labels (mIoU, recorded beside the objective)."""

    def __init__(self, task, dense: nn.Module, images: torch.Tensor, labels: torch.Tensor, stats_images: torch.Tensor,
                 batch_size: int = 256):
        if images.shape[0] == 0 or stats_images.shape[0] == 0:
            raise CaitsearchError("the calibration or proxy split is empty; the search needs images to score configs.")
        self.task, self.dense = task, dense.eval()
        self.size = int(images.shape[0])
        self.batch_size = batch_size
        self.batches = list(images.split(batch_size))
        self.labels = labels
        self.stats_images = stats_images
        self.dense_log_probs = self._log_probs(self.dense)

    @torch.inference_mode()
    def _log_probs(self, model: nn.Module) -> torch.Tensor:
        """Per-pixel log-probabilities `(N * H * W, K)`, fp32 on the CPU."""
        weight = next(model.parameters())
        out = []
        for x in self.batches:
            logits = model(x.to(weight.device, weight.dtype)).float().cpu()
            out.append(F.log_softmax(logits, 1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1]))
        return torch.cat(out)

    @property
    def floor(self) -> PixelScore:
        p = self.dense_log_probs
        uniform = torch.full_like(p, -torch.log(torch.tensor(float(p.shape[-1]))).item())
        return PixelScore(agreement=0.0, kl=_kl(p, uniform), miou=0.0)

    def score(self, config: CompressionConfig) -> PixelScore:
        model = self.task.student(self.dense, config, self.stats_images).eval()
        log_q = self._log_probs(model)
        pred = log_q.argmax(-1)
        agreement = (pred == self.dense_log_probs.argmax(-1)).float().mean().item()
        k = log_q.shape[-1]
        confusion = torch.bincount(self.labels.reshape(-1) * k + pred, minlength=k * k).double()
        return PixelScore(agreement=agreement, kl=_kl(self.dense_log_probs, log_q), miou=self.task.reduce(confusion))


def make_proxy(task, teacher: nn.Module, splits) -> Union[AccuracyProxy, PixelProxy]:
    """The task's screen: `AccuracyProxy` for classification, `PixelProxy` for segmentation; both
    score on the proxy split with CDCP importance from the calibration split."""
    if getattr(task, "per_pixel", False):
        from ..tasks.masks import stack_labels

        images, labels = stack_labels(splits.proxy)
        return PixelProxy(task, teacher, images, labels, stack_images(splits.calib))
    return AccuracyProxy(teacher, stack_images(splits.proxy), stack_images(splits.calib))
