"""Semantic segmentation: the backbone's unmerged `(B, C, Hp, Wp)` patch map (`CaitViT.feature_map`)
and a light decoder (`segment.SegmentationHead`) give per-pixel class logits `(B, K, H, W)`.

- The dense model is `SegmentationModel(compress(vit, dense config), head)`: the compressed code
  path with nothing compressed, whose state dict is the timm weights under `backbone.vit.` plus
  the decoder under `head.` (`timm_backbone` gets the timm model back, to compress from).
- A compressed student is the config applied to that timm backbone with a copy of the dense
  decoder; retraining fine-tunes both together (CDCP masks anneal inside the backbone).
- Losses: cross-entropy per pixel for dense training; for retraining, KL(teacher || student) per
  pixel over the class dimension at the recipe's temperature (averaged over pixels, scaled by T^2)
  plus cross-entropy, weighted as for classification.
- Metric: mean IoU over the classes present in labels or predictions, from a confusion matrix
  accumulated over the whole split (`segment.miou_from_confusion`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..compress import CaitViT, compress, load_materialized, materialize
from ..config import CompressionConfig
from ..data import Splits
from ..errors import CaitsearchError
from ..models import WEIGHTS_DIR, create_model
from ..segment import IGNORE_INDEX, SegmentationHead, SegmentationModel, confusion_matrix, miou_from_confusion
from .masks import load_mask_dataset

BACKBONE_PREFIX, HEAD_PREFIX = "backbone.vit.", "head."


def timm_backbone(backbone: CaitViT) -> nn.Module:
    """The plain timm model of a dense (unmasked, unmerged) `CaitViT`, same weights: its state dict
    is the timm one under `vit.`, so compressing it again starts from exactly these weights."""
    state = backbone.state_dict()
    if any(k.endswith("mask") for k in state) or backbone.config != CompressionConfig.dense(backbone.spec):
        raise CaitsearchError("a segmentation teacher's backbone must be dense (no merges, no pruned channels).")
    spec = backbone.spec
    vit = create_model(spec.name, img_size=spec.img_size, num_classes=spec.num_classes, in_chans=spec.in_chans)
    vit.load_state_dict({k[len("vit."):]: v for k, v in state.items()})
    return vit.eval()


def is_segmentation_state(state: dict) -> bool:
    """True for a state dict saved from a `SegmentationModel` (backbone + head)."""
    return bool(state) and any(k.startswith(HEAD_PREFIX) for k in state) \
        and all(k.startswith((BACKBONE_PREFIX, HEAD_PREFIX)) for k in state)


def head_classes(state: dict, patch: int) -> int:
    """The number of classes a saved decoder predicts (its last conv has classes x p x p outputs)."""
    weight = state.get(HEAD_PREFIX + "classify.weight")
    if weight is None or weight.shape[0] % (patch * patch):
        raise CaitsearchError("the checkpoint holds no segmentation decoder for this patch size (head.classify.weight).")
    return int(weight.shape[0]) // (patch * patch)


@dataclass(frozen=True)
class Segmentation:
    """Per-pixel class labels; scored by mean IoU; the model is a backbone plus a light decoder."""

    name: str = "segmentation"
    metric: str = "miou"
    metric_label: str = "mIoU"
    per_pixel: bool = True

    def load_splits(self, source: str | Path, spec, **kwargs) -> Splits:
        return load_mask_dataset(source, spec, **kwargs)

    def default_checkpoint(self, name: str) -> Optional[Path]:
        """The committed dense segmentation weights of an embedded model (caitsearch/weights/README.md)."""
        path = WEIGHTS_DIR / f"{name}_seg.safetensors"
        return path if path.is_file() else None

    # ------------------------------------------------------------ models

    def wrap(self, vit: nn.Module, num_classes: int, seed: int = 0, width: int = 64) -> SegmentationModel:
        """A dense segmentation model: the timm `vit` (its weights copied) and a fresh decoder
        (initialised from `seed`, so the same command builds the same model)."""
        backbone = compress(vit, CompressionConfig.dense(vit))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            head = SegmentationHead.for_spec(backbone.spec, num_classes=num_classes, width=width)
        return SegmentationModel(backbone, head).eval()

    def from_state(self, name: str, img_size: Optional[Sequence[int]], state: dict) -> SegmentationModel:
        """A dense segmentation model of timm `name` filled from a state dict saved from one."""
        vit_state = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
        head = vit_state.get("head.weight")
        vit = create_model(name, img_size=img_size, num_classes=int(head.shape[0]) if head is not None else None)
        classes = head_classes(state, int(vit.patch_embed.patch_size[0]))
        model = self.wrap(vit, classes, width=int(state[HEAD_PREFIX + "local.weight"].shape[0]))
        _load(model, state, name)
        return model.eval()

    def student(self, teacher: SegmentationModel, config: CompressionConfig, calib=None) -> SegmentationModel:
        """`config` applied to the dense teacher's backbone, with a copy of its decoder."""
        return SegmentationModel(compress(timm_backbone(teacher.backbone), config, calib), copy.deepcopy(teacher.head))

    def backbone(self, model: SegmentationModel) -> CaitViT:
        return model.backbone

    def materialize(self, model: SegmentationModel) -> SegmentationModel:
        return SegmentationModel(materialize(model.backbone), copy.deepcopy(model.head)).eval()

    def load_candidate(self, teacher: SegmentationModel, config: CompressionConfig, state: dict) -> SegmentationModel:
        """A retrained, materialised candidate (config.json + model.safetensors) on `teacher`'s shapes."""
        backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        backbone = load_materialized(timm_backbone(teacher.backbone), config, backbone_state)
        model = SegmentationModel(backbone, copy.deepcopy(teacher.head))
        _load(model, state, config.model)
        return model.eval()

    # ------------------------------------------------------------ losses and metric

    def dense_loss(self, logits: torch.Tensor, y: torch.Tensor, recipe) -> torch.Tensor:
        """Cross-entropy per labelled pixel: logits `(B, K, H, W)`, labels `(B, H, W)`."""
        return labelled_cross_entropy(logits, y, recipe.label_smoothing)

    def distill_loss(self, logits: torch.Tensor, target: torch.Tensor, y: torch.Tensor, recipe) -> torch.Tensor:
        """Per pixel: `distill_weight` x KL(teacher || student) over the class dim at `temperature`
        (mean over every pixel, scaled by T^2: the teacher speaks for unlabelled ones too) plus the
        rest x cross-entropy over the labelled pixels."""
        T, K = recipe.temperature, logits.shape[1]
        s, t = (z.permute(0, 2, 3, 1).reshape(-1, K) for z in (logits, target))
        kd = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                      reduction="batchmean") * T * T
        return recipe.distill_weight * kd + (1 - recipe.distill_weight) * labelled_cross_entropy(s, y.reshape(-1))

    def init_stats(self, model: nn.Module) -> torch.Tensor:
        return torch.zeros(model.num_classes ** 2, dtype=torch.float64)

    def batch_stats(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's confusion matrix `(K, K)`, flattened, as float64 (summed over batches and ranks)."""
        return confusion_matrix(logits.argmax(1).cpu(), y, logits.shape[1]).flatten().double()

    def reduce(self, stats: torch.Tensor) -> float:
        k = int(round(stats.numel() ** 0.5))
        value = miou_from_confusion(stats.view(k, k))
        return 0.0 if value != value else value  # no labelled pixel at all: nothing was segmented right


def labelled_cross_entropy(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the pixels whose label is not `IGNORE_INDEX` (zero, with a gradient
    path, for a batch without any: torch's mean over no pixels would be NaN)."""
    if not bool((y != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing, ignore_index=IGNORE_INDEX)


# decoder parts that start at zero (a fresh head adds nothing through them), newer than some checkpoints
ZERO_START_KEYS = tuple(HEAD_PREFIX + name for name in (
    "cell_rows", "cell_cols", "cell_row_gains", "cell_col_gains", "stem.weight", "stem.bias"))


def _load(model: nn.Module, state: dict, name: str) -> None:
    """Load strictly, except that a decoder saved before it had cell embeddings or the stem skip
    gets them at zero: what a fresh one starts from, so the loaded model computes what it did."""
    own = model.state_dict()
    state = {**{k: torch.zeros_like(own[k]) for k in ZERO_START_KEYS if k in own and k not in state}, **state}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CaitsearchError(f"checkpoint does not fit the segmentation model of {name}: "
                              f"{str(e).splitlines()[0][:160]}") from e
