"""Segmentation's parts: per-pixel labels from real data, the decoder on a (compressed)
backbone's patch map, and mIoU. `tasks/segmentation.py` builds the pipeline's task from them.

Labels come from Fashion-MNIST itself, so no extra data set is needed: every pixel is either
background (class 0) or belongs to the image's item (class 1 + item class). A head must therefore
both find the silhouette and recognise the item, from the backbone's `(B, C, Hp, Wp)` map.

The pipeline trains backbone and decoder together (`caitsearch train --task segmentation`, and the
search's retraining with pixel distillation). `train_head` is the cheap probe beside it: the
backbone stays frozen, its maps are computed once and only a fresh head is trained on them, so
a test can check in seconds that any backbone's map still serves a dense head.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from .compress import CaitViT
from .compress.atme import cell_slots
from .data import FASHION_MNIST_STATS, make_frame, read_fashion_mnist
from .models import ModelSpec

# A pixel is foreground when its raw uint8 value exceeds this (~10% of full intensity). Half of
# Fashion-MNIST's pixels are exactly 0; values 1..25 are a further ~4.6%, mostly the faint halo
# left around the silhouette by the data set's downscaling, which is not part of the item. Above
# 25 even the dark fabric inside black items counts as item.
FOREGROUND_THRESHOLD = 25
NUM_SEG_CLASSES = 11  # 0 = background, 1..10 = Fashion-MNIST class + 1
BACKGROUND = 0
CELL_GAIN = 10.0  # SegmentationHead's cell embeddings, as stored, are this much smaller than as added
IGNORE_INDEX = 255  # a mask pixel without a label (VOC and ADE20k's convention): out of the loss and of mIoU
# data.py frames Fashion-MNIST's 28x28 images at 28/32 of the model frame (28 -> 32 for the default model)
FASHION_MNIST_FILL = 28 / 32


# ---------------------------------------------------------------- data


def pixel_labels(images: torch.Tensor, classes: torch.Tensor, threshold: int = FOREGROUND_THRESHOLD) -> torch.Tensor:
    """Raw uint8 images `(N, 1, h, w)` and item classes `(N,)` -> int64 label maps `(N, h, w)`:
    background where the pixel is <= `threshold`, 1 + the item's class elsewhere."""
    foreground = images[:, 0] > threshold
    return torch.where(foreground, classes.view(-1, 1, 1) + 1, BACKGROUND).long()


def _content_box(spec: ModelSpec, fill: float) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the image inside the model frame, read off `make_frame`
    itself (a white image framed with mean 0, std 1), so label framing cannot drift from it."""
    frame = make_frame(spec, mean=(0.0,), std=(1.0,), fill=fill)
    inside = frame(torch.full((1, 28, 28), 255, dtype=torch.uint8))[0] > 0.5
    rows, cols = inside.any(1).nonzero()[:, 0], inside.any(0).nonzero()[:, 0]
    return int(rows[0]), int(cols[0]), len(rows), len(cols)


def frame_labels(labels: torch.Tensor, spec: ModelSpec, fill: float = FASHION_MNIST_FILL) -> torch.Tensor:
    """Label maps `(N, h, w)` put through the images' geometric framing: scaled (nearest
    neighbour, so no invented classes) to the same box and centred on a background border."""
    return label_framer(spec, fill)(labels)


def label_framer(spec: ModelSpec, fill: float = FASHION_MNIST_FILL):
    """`frame_labels` for one spec, with the image box worked out once (for per-item data loading)."""
    top, left, height, width = _content_box(spec, fill)
    full_h, full_w = spec.img_size

    def frame(labels: torch.Tensor) -> torch.Tensor:
        if tuple(labels.shape[1:]) != (height, width):
            labels = F.interpolate(labels[:, None].float(), size=(height, width), mode="nearest")[:, 0].long()
        return F.pad(labels, (left, full_w - width - left, top, full_h - height - top), value=BACKGROUND)

    return frame


def segmentation_split(
    split: Literal["train", "test"], spec: ModelSpec, limit: Optional[int] = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST `split` as float images `(N, C, H, W)`, normalised and framed as data.py does
    for classification, and int64 label maps `(N, H, W)`; `limit` keeps a seeded random subset.
    Plain tensors without augmentation: the whole test split is 40 MB at 32x32."""
    raw, classes = read_fashion_mnist(split)
    if limit is not None and limit < len(raw):
        keep = torch.randperm(len(raw), generator=torch.Generator().manual_seed(seed))[:limit]
        raw, classes = raw[keep], classes[keep]
    frame = make_frame(spec, *FASHION_MNIST_STATS, fill=FASHION_MNIST_FILL)
    images = torch.stack([frame(image) for image in raw])
    return images, frame_labels(pixel_labels(raw, classes), spec)


# ---------------------------------------------------------------- model


class SegmentationHead(nn.Module):
    """A light decoder on the patch map: BatchNorm; a 1x1 conv of each patch plus a projection of
    the map's mean (global context) plus a 1x1 conv of the stem's map (the skip below); GELU; a 1x1
    conv that predicts every pixel of its patch (`classes * p * p` outputs, rearranged by pixel shuffle).

    Why these two parts (a one-off comparison on the dense default model, 5k training images,
    10 epochs, 1k test images): the classifier pools its class token, so single patch tokens
    recognise the item poorly and the mean of the map lifts mIoU by ~6 points; and a patch token
    is embedded from its own pixels, so it can draw an edge inside its patch, which a bilinear
    upsample of per-patch logits cannot (at patch 4 on 28x28 items most patches touch an edge):
    foreground accuracy 97.9% against 94.9%. Still ~1.5% of the default backbone's MACs, so the backbone dominates latency.

    Cell embeddings: where ATME merged, a token is repeated over the rectangle of patches its grid
    cell covers, and a head that sees only the token paints every patch of it alike. A learned
    vector per (line size, offset) of the row and of the column (`atme.cell_slot`) is added to
    each patch's features, and one more scales them channel by channel, so the head can tell a
    cell's patches apart, each patch can read its own channels of the merged token, and the
    fine-tune can teach that token to carry what differs between them. Only a grid gives patches
    such a place (ToMe's merged patches are scattered), so a ToMe or dense map gets none. Zero at
    the start, so a student begins as the plain repeated map; `CELL_GAIN` scales them because the
    fine-tune's AdamW steps (~lr each) would take thousands of steps to lift them from zero to the
    features' unit scale. Measured with `bench/seg_strategy_finetune.py 312 20000 0.7 atme` (the
    schedule ATME picks under 0.7, 312 steps on 20,000 images, 1,000 test images, 2-core AMD EPYC,
    the 78.76% dense model as teacher): 66.1% test mIoU with shifts and scales, 61.0% with the
    shifts alone (the commit before the scales).

    Stem skip: the stem's patch tokens (`CaitViT.feature_levels`), normalised over channels
    without parameters and put through a 1x1 conv, join the sum before GELU. They come before any
    block, so no merge has touched them: every patch keeps its own edges, as a U-Net's skip keeps
    the encoder's early detail, and the merged tokens need only carry what the item is. One more
    1x1 conv on a map the backbone computes anyway (64 patches x 128 x 64 = 0.52 M MACs, 0.6% of the
    default backbone's 83.3 M that `caitsearch inspect` counts). Zero at
    the start, so a head saved before it computes what it did. Same command as above with the same
    teacher: 74.24% test mIoU with the skip against 66.1% without; and the dense model retrained
    with it (the committed weights) reaches 79.68% test mIoU against 78.76%."""

    def __init__(self, embed_dim: int, patch_size: tuple[int, int], img_size: tuple[int, int],
                 num_classes: int = NUM_SEG_CLASSES, width: int = 64, grid: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        if patch_size[0] != patch_size[1]:
            raise ValueError(f"pixel shuffle needs square patches, got {tuple(patch_size)}.")
        self.patch, self.img_size, self.num_classes = patch_size[0], tuple(img_size), num_classes
        grid_h, grid_w = grid or (side // self.patch for side in self.img_size)
        self.cell_rows = nn.Parameter(torch.zeros(cell_slots(grid_h), embed_dim))
        self.cell_cols = nn.Parameter(torch.zeros(cell_slots(grid_w), embed_dim))
        self.cell_row_gains = nn.Parameter(torch.zeros(cell_slots(grid_h), embed_dim))
        self.cell_col_gains = nn.Parameter(torch.zeros(cell_slots(grid_w), embed_dim))
        self.norm = nn.BatchNorm2d(embed_dim)
        self.local = nn.Conv2d(embed_dim, width, kernel_size=1)
        self.context = nn.Conv2d(embed_dim, width, kernel_size=1, bias=False)
        self.act = nn.GELU()
        self.classify = nn.Conv2d(width, num_classes * self.patch ** 2, kernel_size=1)
        self.stem_norm = LayerNorm2d(embed_dim, affine=False)  # no parameters: nothing new to save
        self.stem = nn.Conv2d(embed_dim, width, kernel_size=1)
        nn.init.zeros_(self.stem.weight)
        nn.init.zeros_(self.stem.bias)

    def forward(self, features: torch.Tensor, cells: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                stem: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`(B, C, Hp, Wp)`, the grid's cell positions and the stem's map `(B, C, Hp, Wp)`
        (`CaitViT.feature_levels`) -> logits `(B, classes, H, W)`."""
        if cells is not None:
            shift = self._cell_map(self.cell_rows, self.cell_cols, cells)
            gain = self._cell_map(self.cell_row_gains, self.cell_col_gains, cells)
            features = features * (1 + gain) + shift
        x = self.norm(features)
        # the unmerged map repeats a merged token over the patches it covers: its mean weights by coverage
        x = self.local(x) + self.context(x.mean(dim=(2, 3), keepdim=True))
        if stem is not None:
            x = x + self.stem(self.stem_norm(stem))
        x = self.act(x)
        logits = F.pixel_shuffle(self.classify(x), self.patch)
        if tuple(logits.shape[-2:]) != self.img_size:  # a frame that the patches do not tile exactly
            logits = F.interpolate(logits, size=self.img_size, mode="bilinear", align_corners=False)
        return logits

    @staticmethod
    def _cell_map(rows: torch.Tensor, cols: torch.Tensor, cells: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Tables `(slots, C)` of rows and columns and slots `(B, H)`, `(B, W)` -> `(B, C, H, W)`."""
        row, col = (CELL_GAIN * table[slots] for table, slots in zip((rows, cols), cells))
        return row.transpose(1, 2)[..., None] + col.transpose(1, 2)[:, :, None, :]

    @classmethod
    def for_spec(cls, spec: ModelSpec, **kwargs) -> "SegmentationHead":
        return cls(spec.embed_dim, spec.patch_size, spec.img_size, grid=tuple(spec.grid), **kwargs)


class SegmentationModel(nn.Module):
    """A (compressed) backbone and a head: only `CaitViT.feature_levels` is used (the unmerged map,
    ATME's cell positions, the stem's map), so any variant whose tokens can be put back on the
    patch grid works."""

    def __init__(self, backbone: CaitViT, head: SegmentationHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(*self.backbone.feature_levels(x))

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def spec(self) -> ModelSpec:
        return self.backbone.spec


# ---------------------------------------------------------------- training and evaluation


@torch.inference_mode()
def _fill_features(backbone: CaitViT, images: torch.Tensor, out: torch.Tensor, batch_size: int) -> None:
    for start in range(0, len(images), batch_size):
        out[start:start + batch_size] = backbone.feature_map(images[start:start + batch_size])


def backbone_features(backbone: CaitViT, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The frozen backbone's feature maps of `images`, computed once, as an ordinary tensor (so a
    head can be trained on it; tensors created under inference mode cannot)."""
    backbone.eval()
    with torch.no_grad():
        first = backbone.feature_map(images[:1])
    out = torch.empty(len(images), *first.shape[1:], dtype=first.dtype)
    _fill_features(backbone, images, out, batch_size)
    return out


def train_head(
    backbone: CaitViT,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    epochs: int = 5,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
) -> SegmentationModel:
    """Train a fresh head on the frozen `backbone` (cross-entropy, AdamW, cosine decay) and return
    backbone + head in eval mode. The same seed gives the same initialisation and batch order to
    every backbone."""
    features = backbone_features(backbone, train_images)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head = SegmentationHead.for_spec(backbone.spec)
    steps_per_epoch = max(1, math.ceil(len(features) / batch_size))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps_per_epoch * epochs)
    order_gen = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=order_gen)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            loss = F.cross_entropy(head(features[rows]), train_labels[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return SegmentationModel(backbone, head).eval()


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`(num_classes, num_classes)` counts, rows = true class, columns = predicted class; pixels
    labelled `IGNORE_INDEX` are left out."""
    target, pred = target.reshape(-1), pred.reshape(-1)
    labelled = target != IGNORE_INDEX
    index = target[labelled] * num_classes + pred[labelled]
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def miou_from_confusion(confusion: torch.Tensor) -> float:
    """Mean IoU over the classes that occur in the labels or the predictions (a class absent from
    both has no IoU to average, rather than a free 1.0 or a spurious 0.0)."""
    confusion = confusion.double()
    hits = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - hits
    present = union > 0
    return float((hits[present] / union[present]).mean()) if present.any() else float("nan")


@torch.inference_mode()
def miou(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int = NUM_SEG_CLASSES,
         batch_size: int = 256) -> float:
    """Mean IoU of `model`'s per-pixel argmax on `images` against `labels`, in [0, 1]; the
    confusion matrix is accumulated batch by batch."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for start in range(0, len(images), batch_size):
        pred = model(images[start:start + batch_size]).argmax(1)
        confusion += confusion_matrix(pred, labels[start:start + batch_size], num_classes)
    return miou_from_confusion(confusion)
