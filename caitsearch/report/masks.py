"""Predicted masks for a segmentation run's report: the dense model and the deployed candidate on
a few test images, loaded the way the run loaded them (its checkpoint, data and seed)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..config import CompressionConfig
from ..console import log
from ..errors import CaitsearchError
from ..models import load_state, model_spec
from ..search.run_folder import RunFolder, requested
from ..tasks import SEGMENTATION
from ..training import MODEL_FILE, load_teacher
from .load import Run

SHOWN = 6  # test images in the picture


def predicted_masks(run: Run, count: int = SHOWN) -> Optional[tuple]:
    """(images, true masks, dense predictions, deployed predictions, row titles) for `count` test
    images, or None (said on stderr) when the models or data cannot be loaded here."""
    try:
        return _predicted_masks(run, count)
    except (CaitsearchError, OSError, KeyError, ValueError) as e:
        log(f"report: no predicted-mask picture ({str(e).splitlines()[0][:200]})")
        return None


@torch.no_grad()
def _predicted_masks(run: Run, count: int) -> tuple:
    rec, manifest = run.recommended, run.manifest
    folder = Path(rec.get("path") or RunFolder(run.path).candidate(rec["trial"]))
    config = CompressionConfig.from_dict(json.loads((folder / "config.json").read_text()))
    spec = model_spec(config.model, img_size=tuple(config.img_size))
    splits = SEGMENTATION.load_splits(requested(manifest, "source") or "fashion-mnist", spec,
                                      seed=int(requested(manifest, "seed") or 0), test_limit=count)
    trained_here = RunFolder(run.path).dense / MODEL_FILE
    if trained_here.is_file():
        dense = SEGMENTATION.from_state(config.model, spec.img_size, load_state(trained_here))
    else:
        checkpoint = requested(manifest, "checkpoint")
        teacher = load_teacher(config.model, img_size=spec.img_size, num_classes=splits.num_classes,
                               checkpoint=Path(checkpoint) if checkpoint else None, data=splits.name, task=SEGMENTATION)
        if not teacher.trained:
            raise CaitsearchError("the run's dense segmentation model cannot be found")
        dense = teacher.model
    compressed = SEGMENTATION.load_candidate(dense, config, load_state(folder / MODEL_FILE))
    items = [splits.test[i] for i in range(len(splits.test))]
    images, truth = torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
    titles = (f"dense ({run.dense['accuracy']:.1%} mIoU)" if run.dense else "dense",
              f"trial {rec['trial']} ({rec['accuracy']:.1%} mIoU, {rec['speedup']:.2f}x)")
    return images, truth, dense.eval()(images).argmax(1), compressed.eval()(images).argmax(1), titles
