"""One-recipe segmentation fine-tunes of single strategies' uniform schedules, for quick A/B checks
of the decoder (e.g. SegmentationHead's cell embeddings): each strategy's schedule predicted closest
under BUDGET, distilled from the committed dense segmentation model for STEPS steps of batch 128 on
TRAIN_LIMIT training images; mIoU on 500 validation and 1,000 test images.

    .venv/bin/python bench/seg_strategy_finetune.py 312 20000 0.7 atme,tome   # ~3 min a strategy, 2-core AMD EPYC
"""
import sys
import tempfile
import time

import torch

from caitsearch.models import DEFAULT_MODEL, model_spec
from caitsearch.search import strategy_config
from caitsearch.tasks import SEGMENTATION
from caitsearch.training import Recipe, Retraining, load_teacher


def main() -> None:
    steps, train_limit, budget, strategies = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(2)
    spec = model_spec(DEFAULT_MODEL)
    splits = SEGMENTATION.load_splits("fashion-mnist", spec, seed=0, calib_size=256, proxy_size=256, val_size=500,
                                      train_limit=train_limit, test_limit=1000)
    dense = load_teacher(DEFAULT_MODEL, num_classes=splits.num_classes, checkpoint=None, data=splits.name,
                         task=SEGMENTATION).model.eval()
    for strategy in strategies.split(","):
        config = strategy_config(spec, strategy, budget, None, None)
        started = time.time()
        run = Retraining(dense, config, splits, Recipe(steps=steps, seed=0), tempfile.mkdtemp(), task=SEGMENTATION)
        run.run(progress=False)
        print(f"{strategy}@{budget:g}: val mIoU {run.score(splits.val):.4f} test mIoU {run.score(splits.test):.4f} "
              f"({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
