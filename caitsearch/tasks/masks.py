"""Segmentation data: images with per-pixel class maps, shaped for a model and split like `data.py`.

Two sources:
- `fashion-mnist`: labels made from the images themselves (`segment.pixel_labels`: background,
  or 1 + the item's class where the raw pixel is above 25), 11 classes;
- a folder of the user's own, laid out as

      DIR/train/images/NAME.png   DIR/train/masks/NAME.png
      DIR/val/images/NAME.png     DIR/val/masks/NAME.png
      DIR/classes.txt             (optional: one class name per line, line i names class i)

  Images may be any format PIL reads (`data.IMAGE_SUFFIXES`); every image has exactly one mask
  with the same stem and `.png`, of the same size, single-channel (mode L, P or I), each pixel a
  class index below the number of classes (classes.txt's line count, else the largest index
  found plus one), or 255 for a pixel without a label (left out of the loss and of mIoU; the
  border a training shift brings in is unlabelled too). Everything is checked before any training (`check_mask_folder`), and the
  first problem is refused in one sentence.

Splits are the classification ones (`data.make_splits`): calib, proxy and val are held out of
`train/`, and `val/` (or Fashion-MNIST's t10k) is the test split. Training images get a random
shift and flip, applied identically to the label map.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data import (
    CALIB_SIZE, FASHION_MNIST, FASHION_MNIST_CLASSES, FASHION_MNIST_STATS, IMAGE_SUFFIXES, PROXY_SIZE, VAL_SIZE,
    Splits, _pil_reader, make_frame, make_splits, random_shift_flip_pair, read_fashion_mnist,
)
from ..errors import CaitsearchError
from ..models import ModelSpec
from ..segment import BACKGROUND, FASHION_MNIST_FILL, IGNORE_INDEX, label_framer, pixel_labels

CLASSES_FILE = "classes.txt"
MASK_MODES = ("L", "P", "I", "I;16")  # single-channel PIL modes whose values are class indices


class MaskDataset(Dataset):
    """`(image (in_chans, H, W) float, labels (H, W) int64)` pairs: `read_image(j)` gives a uint8
    `(C, h, w)` image that `frame` fits to the model, `read_labels(j)` its label map already in
    the model frame; `augment` shifts and flips both alike, the label border `label_fill`."""

    def __init__(self, read_image: Callable[[int], torch.Tensor], read_labels: Callable[[int], torch.Tensor],
                 indices: torch.Tensor, frame: Callable[[torch.Tensor], torch.Tensor], augment: bool = False,
                 label_fill: int = BACKGROUND) -> None:
        self.read_image, self.read_labels, self.indices, self.frame, self.augment = (
            read_image, read_labels, indices, frame, augment)
        self.label_fill = label_fill

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = int(self.indices[i])
        image, labels = self.frame(self.read_image(j)), self.read_labels(j)
        if self.augment:
            image, labels = random_shift_flip_pair(image, labels, fill=self.label_fill)
        return image, labels

    def subset(self, indices: torch.Tensor, augment: Optional[bool] = None) -> "MaskDataset":
        return MaskDataset(self.read_image, self.read_labels, self.indices[indices], self.frame,
                           self.augment if augment is None else augment, self.label_fill)


def fashion_mnist_masks(spec: ModelSpec) -> tuple[MaskDataset, MaskDataset, list[str]]:
    """Fashion-MNIST train and test with per-pixel labels, framed as `data.py` frames the images."""
    frame = make_frame(spec, *FASHION_MNIST_STATS, fill=FASHION_MNIST_FILL)
    frame_labels = label_framer(spec, FASHION_MNIST_FILL)
    out = []
    for split in ("train", "test"):
        raw, classes = read_fashion_mnist(split)

        def read_labels(j: int, raw=raw, classes=classes) -> torch.Tensor:
            return frame_labels(pixel_labels(raw[j:j + 1], classes[j:j + 1]))[0]

        out.append(MaskDataset(raw.__getitem__, read_labels, torch.arange(len(raw)), frame))
    return out[0], out[1], ["background"] + list(FASHION_MNIST_CLASSES)


# ---------------------------------------------------------------- a folder of images and masks


@dataclass(frozen=True)
class MaskFolder:
    """A checked folder: per split the image and mask files in the same order, and the class names."""

    root: Path
    files: dict  # split -> (image paths, mask paths)
    classes: tuple[str, ...]


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in MASK_MODES:
                raise CaitsearchError(f"mask {path} has mode {im.mode}; masks must be single-channel "
                                      "class-index PNGs (mode L, P or I).")
            return np.asarray(im, dtype=np.int64)
    except OSError as e:
        raise CaitsearchError(f"cannot read mask {path}: {e}") from e


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except OSError as e:
        raise CaitsearchError(f"cannot read image {path}: {e}") from e


def check_mask_folder(root: Path) -> MaskFolder:
    """Check the layout (module docstring) before anything is trained: every image has its mask
    and every mask its image, sizes match, masks are single-channel and class indices are in range."""
    root = Path(root)
    if not root.is_dir():
        raise CaitsearchError(f"--data {root} is neither 'fashion-mnist' nor a folder.")
    names: Optional[list[str]] = None
    if (root / CLASSES_FILE).is_file():
        names = [line.strip() for line in (root / CLASSES_FILE).read_text().splitlines() if line.strip()]
        if len(names) < 2:
            raise CaitsearchError(f"{root / CLASSES_FILE} names {len(names)} class(es); a segmentation needs at least 2.")
    files, largest = {}, 0
    for split in ("train", "val"):
        images_dir, masks_dir = root / split / "images", root / split / "masks"
        if not images_dir.is_dir() or not masks_dir.is_dir():
            raise CaitsearchError(f"segmentation data {root} needs {split}/images/ and {split}/masks/ "
                                  "(masks: single-channel class-index PNGs named like their images).")
        images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
        masks = {p.stem: p for p in sorted(masks_dir.iterdir()) if p.is_file() and p.suffix.lower() == ".png"}
        if not images:
            raise CaitsearchError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        missing = sorted(set(images) - set(masks))
        if missing:
            raise CaitsearchError(f"{images[missing[0]]} has no mask {masks_dir / (missing[0] + '.png')}"
                                  + (f" ({len(missing)} images have none)." if len(missing) > 1 else "."))
        extra = sorted(set(masks) - set(images))
        if extra:
            raise CaitsearchError(f"mask {masks[extra[0]]} has no image in {images_dir}"
                                  + (f" ({len(extra)} masks have none)." if len(extra) > 1 else "."))
        stems = sorted(images)
        for stem in stems:
            mask = _read_mask(masks[stem])
            width, height = _image_size(images[stem])
            if mask.shape != (height, width):
                raise CaitsearchError(f"mask {masks[stem]} is {mask.shape[1]}x{mask.shape[0]} but its image "
                                      f"{images[stem]} is {width}x{height}.")
            labelled = mask[mask != IGNORE_INDEX]
            top = int(labelled.max()) if labelled.size else 0
            if names is not None and top >= len(names):
                raise CaitsearchError(f"mask {masks[stem]} holds class index {top}, out of range for the "
                                      f"{len(names)} classes in {root / CLASSES_FILE} (0..{len(names) - 1}, or 255 for no label).")
            largest = max(largest, top)
        files[split] = ([images[s] for s in stems], [masks[s] for s in stems])
    classes = tuple(names) if names is not None else tuple(f"class {i}" for i in range(max(2, largest + 1)))
    return MaskFolder(root, files, classes)


def folder_masks(folder: MaskFolder, spec: ModelSpec) -> tuple[MaskDataset, MaskDataset, list[str]]:
    """The checked folder's train and val sets for `spec`: images resized to the model frame like
    an ImageFolder's, masks resized alike with nearest neighbour (no invented classes)."""
    chans = spec.in_chans
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if chans == 3 else ((0.5,), (0.5,))
    frame = make_frame(spec, mean, std, fill=1.0)
    out = []
    for split in ("train", "val"):
        images, masks = folder.files[split]

        def read_labels(j: int, masks=masks) -> torch.Tensor:
            labels = torch.from_numpy(_read_mask(masks[j]))
            if tuple(labels.shape) != tuple(spec.img_size):
                labels = F.interpolate(labels[None, None].float(), size=spec.img_size, mode="nearest")[0, 0].long()
            return labels

        out.append(MaskDataset(_pil_reader(images, chans), read_labels, torch.arange(len(images)), frame,
                               label_fill=IGNORE_INDEX))  # a shift's border is no class of the user's
    return out[0], out[1], list(folder.classes)


def load_mask_dataset(source: str | Path, spec: ModelSpec, seed: int = 0, calib_size: int = CALIB_SIZE,
                      proxy_size: int = PROXY_SIZE, val_size: int = VAL_SIZE, train_limit: Optional[int] = None,
                      test_limit: Optional[int] = None) -> Splits:
    """Segmentation splits of `source` ("fashion-mnist" or a folder laid out as the module docstring says)."""
    if min(calib_size, proxy_size, val_size) < 0 or (train_limit is not None and train_limit < 1) \
            or (test_limit is not None and test_limit < 1):
        raise CaitsearchError("calib, proxy and val sizes must be >= 0 and train/test limits >= 1.")
    if str(source) == FASHION_MNIST:
        train, test, classes = fashion_mnist_masks(spec)
        name = FASHION_MNIST
    else:
        folder = check_mask_folder(Path(source))
        train, test, classes = folder_masks(folder, spec)
        name = folder.root.name
    return make_splits(name, train, test, classes, seed=seed, calib_size=calib_size, proxy_size=proxy_size,
                       val_size=val_size, train_limit=train_limit, test_limit=test_limit)


def stack_labels(dataset: Dataset, limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `(N, C, H, W)` and label maps `(N, H, W)` of a (small) dataset as two tensors."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    items = [dataset[i] for i in range(n)]
    if not items:
        raise CaitsearchError("a held-out split is empty; the search needs images to score configs.")
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
