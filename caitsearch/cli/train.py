"""`train`: the dense baseline, or distillation retraining of a compressed config."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..console import say
from ..defaults import CALIB_SIZE, DEFAULT_MODEL, PROXY_SIZE, VAL_SIZE
from ..io import check_output_dir
from .app import app, emit_json, resumable
from .options import (
    AllowForeignOpt, BatchOpt, BudgetOpt, CalibOpt, CheckpointOpt, ConfigOpt, DeviceOpt, ImgSizeOpt, JsonOpt, ModelOpt,
    NoProgressOpt, NumClassesOpt, PretrainedOpt, ProfileOpt, ProxySizeOpt, StrategyOpt, TaskOpt, ThreadsOpt, ValSizeOpt,
    check_inputs,
)

DataOpt = Annotated[str, typer.Option(
    "--data", "-d", help="'fashion-mnist' (Debian's dataset-fashion-mnist) or an ImageFolder directory with train/ and val/.")]
TrainLimitOpt = Annotated[Optional[int], typer.Option("--train-limit", min=1, help="Train on a seeded subset of this many images.")]
TestLimitOpt = Annotated[Optional[int], typer.Option("--test-limit", min=1, help="Evaluate on a seeded subset of this many test images.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the splits, data order, augmentation and initialisation.")]


@app.command()
def train(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run directory: state.pt (resume), model.safetensors, metrics.json.")],
    model: ModelOpt = None,
    task: TaskOpt = "classification",
    data: DataOpt = "fashion-mnist",
    epochs: Annotated[int, typer.Option("--epochs", "-e", min=1, help="Passes over the training split.")] = 5,
    config: ConfigOpt = None,
    strategy: StrategyOpt = None,
    budget: BudgetOpt = None,
    profile: ProfileOpt = None,
    checkpoint: CheckpointOpt = None,
    pretrained: PretrainedOpt = False,
    img_size: ImgSizeOpt = None,
    num_classes: NumClassesOpt = None,
    batch_size: BatchOpt = 128,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak AdamW learning rate (default 1e-3 dense, 5e-4 retraining).")] = None,
    seed: SeedOpt = 0,
    calib_size: CalibOpt = CALIB_SIZE,
    proxy_size: ProxySizeOpt = PROXY_SIZE,
    val_size: ValSizeOpt = VAL_SIZE,
    train_limit: TrainLimitOpt = None,
    test_limit: TestLimitOpt = None,
    save_every: Annotated[int, typer.Option("--save-every", min=1, help="Steps between resume checkpoints.")] = 50,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    allow_foreign_profile: AllowForeignOpt = False,
    no_progress: NoProgressOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a dense model, or retrain a compressed config with distillation from the dense one.

    Without --config: trains (or fine-tunes, with --checkpoint / --pretrained) the dense model.
    With --config: the dense model (--checkpoint, or the embedded default's weights) is the
    teacher; the compressed student keeps ATME merges on and anneals its CDCP masks from full
    width to the config's widths, then is materialised and evaluated on the test split.

    A killed run resumes from its last saved step when the same command is run again; under
    `torchrun --nproc_per_node N` it trains data-parallel (gloo on CPU, NCCL on GPUs).

    Examples:

      caitsearch train --epochs 5 --out runs/dense

      caitsearch train --config best.json --epochs 2 --train-limit 10000 --out runs/retrain

      caitsearch train --strategy tome --budget 0.6 --epochs 3 --out runs/tome   # ToMe's schedule at 0.6x, retrained alike

      torchrun --nproc_per_node 2 -m caitsearch train --config best.json --out runs/ddp

      caitsearch train --model deit_tiny_patch16_224 --pretrained --img-size 64 64 --data ./flowers --out runs/ft

      caitsearch train --task segmentation --epochs 3 --out runs/seg-dense     # backbone + decoder, end to end

      caitsearch train --task segmentation --strategy atme --budget 0.6 --out runs/seg-atme   # distilled from the dense one
    """
    resumable()
    check_output_dir(out_dir)  # every refusal comes before the first training step, so none costs a run
    check_inputs(config, checkpoint)
    from ..device import resolve_device
    from ..errors import CaitsearchError
    from ..measure import set_threads
    from ..models import model_spec
    from ..search import strategy_config
    from ..tasks import CLASSIFICATION, get_task
    from ..training import DENSE_LR, RETRAIN_LR, Recipe, load_teacher, retrain_compressed, train_dense
    from .common import load_config

    the_task = get_task(task)
    set_threads(threads)
    dev = resolve_device(device)
    cfg = load_config(config)
    name = model or (cfg.model if cfg else DEFAULT_MODEL)
    size = img_size or (tuple(cfg.img_size) if cfg else None)
    spec = model_spec(name, img_size=size, num_classes=num_classes)
    if cfg is not None:
        cfg.validate(spec)  # a config of another model is named as such, before any weights are asked for
    if strategy is not None or budget is not None or profile is not None:  # the config must lie in (or is picked from) the strategy's space
        cfg = strategy_config(spec, strategy or "cait", budget, cfg, profile, allow_foreign_profile)
    recipe = Recipe(epochs=epochs, batch_size=batch_size, seed=seed, save_every=save_every,
                    lr=lr if lr is not None else (DENSE_LR if cfg is None else RETRAIN_LR))
    splits = the_task.load_splits(data, spec, seed=seed, calib_size=calib_size, proxy_size=proxy_size,
                                  val_size=val_size, train_limit=train_limit, test_limit=test_limit)
    teacher = load_teacher(name, img_size=size, num_classes=num_classes or splits.num_classes, checkpoint=checkpoint,
                           pretrained=pretrained, data=splits.name, committed=cfg is not None, task=the_task)
    if cfg is not None and the_task is not CLASSIFICATION and not teacher.trained:
        raise CaitsearchError(f"retraining for {the_task.name} needs the dense {the_task.name} model as teacher: "
                              f"pass --checkpoint with one (caitsearch train --task {the_task.name} --out DIR).")
    if cfg is not None and teacher.source == "random init":
        raise CaitsearchError(f"retraining needs the dense teacher: pass --checkpoint for {name}.")
    if cfg is None:  # dense training starts from whatever weights there are, or from scratch
        metrics = train_dense(teacher.model, splits, recipe, out_dir, progress=not no_progress, device=dev, task=the_task)
    else:
        _, metrics = retrain_compressed(teacher.model, cfg, splits, recipe, out_dir, progress=not no_progress, device=dev,
                                        task=the_task)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        emit_json(metrics)
    else:
        say(f"test {the_task.metric_label} {metrics['accuracy'] * 100:.2f}% on {metrics['test_images']} images; "
            f"weights in {Path(out_dir) / 'model.safetensors'}")
