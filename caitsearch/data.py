"""Datasets: Fashion-MNIST from Debian's IDX files, or an ImageFolder tree, shaped for a model.

`load_dataset(source, spec)` returns deterministic, disjoint splits. All but `test` come from the
training images, by one seeded permutation: the first `calib_size` are `calib`, the next
`proxy_size` are `proxy`, the next `val_size` are `val`, the rest are `train`. So every command
with the same seed and sizes holds out the same images, and a teacher trained by `caitsearch
train` has never seen the images a search chooses on.
- `train`: what training and retraining learn from (augmented: random shift, flip);
- `calib`: CDCP channel importance (and the start of dynamic CDCP's running importance);
- `proxy`: the search's untrained accuracy proxy, disjoint from `calib`, so the images that
  chose the channels do not also score the choice;
- `val`: the selection split: short fine-tunes are ranked and the deployed candidate chosen on it;
- `test`: the official test split (Fashion-MNIST t10k, or the ImageFolder's `val/`): reported,
  never used to choose anything.

Images are adapted to the model: channels are averaged / repeated to `spec.in_chans` and the
size is changed to `spec.img_size`. Fashion-MNIST's 28x28 digits are scaled to 7/8 of the frame and
zero-padded (exactly the usual 28 -> 32 padding for the default model), because its background
is black; ImageFolder images are resized to the frame. Every image file of an ImageFolder is checked once,
when the data set is loaded and before any work (`check_image`: its header, PIL's own check of the
file, a JPEG's end marker, at most `MAX_PIXELS`), so a bad file is refused by name up front instead
of ending a long run half-way.
"""
from __future__ import annotations

import functools
import gzip
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .defaults import CALIB_SIZE, PROXY_SIZE, VAL_SIZE
from .errors import CaitsearchError, reason
from .models import ModelSpec

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_PIXELS = 50_000_000  # larger images are refused: decompression bombs, or not what a ViT is trained on


@dataclass
class Splits:
    """Train / calibration / proxy / validation / test datasets of `(image, label)`; images are
    normalised float tensors of shape `(in_chans, H, W)` for the model they were loaded for."""

    name: str
    train: Dataset
    calib: Dataset
    proxy: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    classes: Sequence[str] = field(default_factory=tuple)


class ImageDataset(Dataset):
    """Images produced by `read(i)` as uint8 `(C, h, w)` tensors, adapted to the model frame and
    normalised; `augment` adds a random shift of up to 1/8 of the frame and a horizontal flip."""

    def __init__(self, read: Callable[[int], torch.Tensor], labels: torch.Tensor, indices: torch.Tensor,
                 frame: Callable[[torch.Tensor], torch.Tensor], augment: bool = False) -> None:
        self.read, self.labels, self.indices, self.frame, self.augment = read, labels, indices, frame, augment

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        image = self.frame(self.read(j))
        if self.augment:
            image = random_shift_flip(image)
        return image, int(self.labels[j])

    def subset(self, indices: torch.Tensor, augment: Optional[bool] = None) -> "ImageDataset":
        """The same images restricted to `indices` (positions in this dataset)."""
        return ImageDataset(self.read, self.labels, self.indices[indices], self.frame,
                            self.augment if augment is None else augment)


def random_shift_flip(image: torch.Tensor) -> torch.Tensor:
    """Translate by up to H/8, W/8 pixels (zero-padded crop) and flip left-right half the time."""
    _, h, w = image.shape
    ph, pw = max(1, h // 8), max(1, w // 8)
    padded = F.pad(image, (pw, pw, ph, ph))
    dy, dx = (int(v) for v in (torch.randint(0, 2 * ph + 1, ()), torch.randint(0, 2 * pw + 1, ())))
    image = padded[:, dy:dy + h, dx:dx + w]
    return image.flip(-1) if torch.rand(()) < 0.5 else image


def random_shift_flip_pair(image: torch.Tensor, labels: torch.Tensor, fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`random_shift_flip` of an image `(C, H, W)` and its label map `(H, W)` with the same draws
    (the label map's border is `fill`)."""
    _, h, w = image.shape
    ph, pw = max(1, h // 8), max(1, w // 8)
    dy, dx = (int(v) for v in (torch.randint(0, 2 * ph + 1, ()), torch.randint(0, 2 * pw + 1, ())))
    image = F.pad(image, (pw, pw, ph, ph))[:, dy:dy + h, dx:dx + w]
    labels = F.pad(labels, (pw, pw, ph, ph), value=fill)[dy:dy + h, dx:dx + w]
    if torch.rand(()) < 0.5:
        image, labels = image.flip(-1), labels.flip(-1)
    return image, labels


def make_frame(spec: ModelSpec, mean: Sequence[float], std: Sequence[float], fill: float) -> Callable:
    """uint8 `(C, h, w)` -> normalised float `(in_chans, H, W)`: channels matched, then the image
    scaled to `fill` of the model frame (keeping nothing else) and centred on a zero border."""
    chans, (height, width) = spec.in_chans, spec.img_size
    mean_t = torch.tensor(_per_channel(mean, chans)).view(-1, 1, 1)
    std_t = torch.tensor(_per_channel(std, chans)).view(-1, 1, 1)
    inner = (max(1, round(height * fill)), max(1, round(width * fill)))

    def frame(image: torch.Tensor) -> torch.Tensor:
        x = image.float().div_(255.0)
        if x.shape[0] != chans:
            x = (x if x.shape[0] == 1 else x.mean(0, keepdim=True)).expand(chans, -1, -1)
        if tuple(x.shape[1:]) != inner:
            x = F.interpolate(x[None], size=inner, mode="bilinear", antialias=True, align_corners=False)[0]
        top, left = (height - inner[0]) // 2, (width - inner[1]) // 2
        if (top, left) != (0, 0) or inner != (height, width):
            x = F.pad(x, (left, width - inner[1] - left, top, height - inner[0] - top))
        return (x - mean_t) / std_t

    return frame


def _per_channel(values: Sequence[float], chans: int) -> list[float]:
    values = list(values)
    return values * chans if len(values) == 1 else (values + values[-1:] * chans)[:chans]


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format): magic, dims, then big-endian uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise CaitsearchError(f"{path} is not a gzipped uint8 IDX file.")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise CaitsearchError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}.")
    return data.reshape(dims)


def fashion_mnist_dir() -> Path:
    """Where the IDX files live: $CAITSEARCH_FASHION_MNIST, else Debian's package directory."""
    return Path(os.environ.get("CAITSEARCH_FASHION_MNIST") or FASHION_MNIST_DIR)


def read_fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images `(N, 1, 28, 28)` and int64 labels of the "train" or "test" split."""
    return _read_fashion_mnist(fashion_mnist_dir(), split)


@functools.lru_cache(maxsize=4)  # decompressing 60k images takes seconds; the arrays are never written to
def _read_fashion_mnist(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    paths = [root / name for name in FASHION_MNIST_FILES[split]]
    if not all(p.is_file() for p in paths):
        raise CaitsearchError(
            f"Fashion-MNIST is not installed in {root}: run `sudo apt-get install -y dataset-fashion-mnist` "
            "(or pass --data PATH to an ImageFolder tree with train/ and val/)."
        )
    images, labels = (_read_idx(p) for p in paths)
    return torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64))


def _image_files(root: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for p in sorted(folder.rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                files.append(p)
                labels.append(label)
    return files, labels


def check_image(path: Path) -> None:
    """Refuse, naming it, an image file that PIL cannot identify, that fails PIL's check of the
    file (PNG checksums, truncation), a JPEG without its end marker (cut short), or one larger
    than `MAX_PIXELS`. Reads headers and checksums only: nothing is decoded."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise CaitsearchError(f"image {path} claims {width}x{height} pixels, more than the "
                                          f"{MAX_PIXELS // 1_000_000} megapixels caitsearch reads.")
                im.verify()
    except CaitsearchError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CaitsearchError(f"image {path} is too large to read ({reason(e, 120)}).") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad files
        raise CaitsearchError(f"image {path} is not a readable image ({reason(e, 120)}); remove or replace it.") from e
    if path.suffix.lower() in (".jpg", ".jpeg") and not _ends_with(path, b"\xff\xd9"):
        raise CaitsearchError(f"image {path} is a JPEG cut short (no end marker); remove or replace it.")


def _ends_with(path: Path, marker: bytes) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64))
        return marker in f.read()  # a few bytes of padding after the marker are common


def _pil_reader(files: Sequence[Path], chans: int) -> Callable[[int], torch.Tensor]:
    from PIL import Image

    mode = "L" if chans == 1 else "RGB"

    def read(i: int) -> torch.Tensor:
        try:
            with Image.open(files[i]) as im:
                array = np.asarray(im.convert(mode), dtype=np.uint8)
        except Exception as e:  # changed since it was checked, or a fault only decoding shows
            raise CaitsearchError(f"cannot read image {files[i]}: {reason(e, 120)}") from e
        return torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)

    return read


def _image_folder(root: Path, spec: ModelSpec, mean, std) -> tuple[ImageDataset, ImageDataset, list[str]]:
    train_dir, val_dir = root / "train", root / "val"
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise CaitsearchError(f"ImageFolder {root} needs train/ and val/ subfolders with one folder per class.")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    unknown = sorted(p.name for p in val_dir.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise CaitsearchError(f"ImageFolder {root}: val/ has classes missing from train/: {', '.join(unknown[:5])}.")
    chans = spec.in_chans
    if mean is None:
        mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if chans == 3 else ((0.5,), (0.5,))
    frame = make_frame(spec, mean, std, fill=1.0)
    out = []
    for folder in (train_dir, val_dir):
        files, labels = _image_files(folder, classes)
        if not files:
            raise CaitsearchError(f"ImageFolder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        if folder == train_dir and len(set(labels)) < 2:
            raise CaitsearchError(f"ImageFolder {train_dir} has images of {len(set(labels))} class; a classifier needs "
                                  "at least 2 class folders with images.")
        for path in files:
            check_image(path)
        out.append(ImageDataset(_pil_reader(files, chans), torch.tensor(labels), torch.arange(len(files)), frame))
    return out[0], out[1], classes


def _fashion_mnist(spec: ModelSpec, mean, std) -> tuple[ImageDataset, ImageDataset, list[str]]:
    if mean is None:
        mean, std = FASHION_MNIST_STATS
    frame = make_frame(spec, mean, std, fill=28 / 32)
    out = []
    for split in ("train", "test"):
        images, labels = read_fashion_mnist(split)
        out.append(ImageDataset(images.__getitem__, labels, torch.arange(len(labels)), frame))
    return out[0], out[1], list(FASHION_MNIST_CLASSES)


def load_dataset(
    source: str | Path,
    spec: ModelSpec,
    seed: int = 0,
    calib_size: int = CALIB_SIZE,
    proxy_size: int = PROXY_SIZE,
    val_size: int = VAL_SIZE,
    train_limit: Optional[int] = None,
    test_limit: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> Splits:
    """Deterministic, disjoint splits of `source` ("fashion-mnist" or an ImageFolder directory)
    shaped for `spec` (see the module docstring). On small data the held-out splits shrink so
    that at least half the training images stay for training; limits keep seeded random subsets."""
    if min(calib_size, proxy_size, val_size) < 0 or (train_limit is not None and train_limit < 1) \
            or (test_limit is not None and test_limit < 1):
        raise CaitsearchError("calib, proxy and val sizes must be >= 0 and train/test limits >= 1.")
    if str(source) == FASHION_MNIST:
        train, test, classes = _fashion_mnist(spec, mean, std)
        name = FASHION_MNIST
    else:
        root = Path(source)
        if not root.is_dir():
            raise CaitsearchError(f"--data {source} is neither 'fashion-mnist' nor an ImageFolder directory.")
        train, test, classes = _image_folder(root, spec, mean, std)
        name = root.name
    return make_splits(name, train, test, classes, seed=seed, calib_size=calib_size, proxy_size=proxy_size,
                       val_size=val_size, train_limit=train_limit, test_limit=test_limit)


def make_splits(name: str, train: Dataset, test: Dataset, classes: Sequence[str], seed: int = 0,
                calib_size: int = CALIB_SIZE, proxy_size: int = PROXY_SIZE, val_size: int = VAL_SIZE,
                train_limit: Optional[int] = None, test_limit: Optional[int] = None) -> Splits:
    """The held-out splits of `load_dataset` (module docstring) from any `train` and `test` datasets
    that have `subset(indices, augment)`: one seeded permutation of the training images, so every
    task holds out the same images of the same data."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=gen)
    n = len(train)
    sizes = [min(calib_size, n // 6), min(proxy_size, n // 6), min(val_size, n // 6)]
    ends = torch.tensor(sizes).cumsum(0).tolist()
    calib_idx, proxy_idx, val_idx = order[:ends[0]], order[ends[0]:ends[1]], order[ends[1]:ends[2]]
    train_idx = order[ends[2]:]
    if train_limit is not None:
        train_idx = train_idx[:train_limit]
    test_idx = torch.randperm(len(test), generator=gen)[:test_limit] if test_limit else torch.arange(len(test))
    return Splits(
        name=name,
        train=train.subset(train_idx, augment=True),
        calib=train.subset(calib_idx, augment=False),
        proxy=train.subset(proxy_idx, augment=False),
        val=train.subset(val_idx, augment=False),
        test=test.subset(test_idx, augment=False),
        num_classes=len(classes),
        classes=tuple(classes),
    )
