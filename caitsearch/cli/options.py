"""Options shared by several commands, so every command spells and explains them the same way.

Like every CLI module it imports nothing heavy at the top: torch and timm load inside the commands."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..defaults import DEFAULT_MODEL
from ..errors import CaitsearchError
from ..io import check_input_file

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help=f"timm model name (default: the config's model, else {DEFAULT_MODEL}).")]
ImgSizeOpt = Annotated[Optional[tuple[int, int]], typer.Option(
    "--img-size", min=1, help="Input height and width, e.g. --img-size 224 160 (default: the config's, else the model's).")]
NumClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", min=1, help="Classifier width (default: the model's).")]
CheckpointOpt = Annotated[Optional[Path], typer.Option(
    "--checkpoint", help="Weights: a dense timm state dict or a compressed caitsearch one (.pth/.safetensors, loaded weights-only).")]
PretrainedOpt = Annotated[bool, typer.Option("--pretrained", help="Start from timm hub weights (needs network access).")]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="Compression config JSON (see `caitsearch inspect --help`).")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print one JSON object on stdout instead of tables (progress still goes to stderr).")]
NoProgressOpt = Annotated[bool, typer.Option(
    "--no-progress", help="Print no progress on stderr (a bar on a terminal, else a line every few minutes).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads (default: all cores).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="fp32, fp16 or bf16.")]
StrategyOpt = Annotated[Optional[str], typer.Option(
    "--strategy", help="What may be compressed: cait (ATME merges + CDCP pruning), atme (merges only), "
                       "cdcp (pruning only) or tome (the ToMe baseline: bipartite token merging).")]
BudgetOpt = Annotated[Optional[float], typer.Option(
    "--budget", help="With --strategy and no --config: use the strategy's uniform schedule predicted closest "
                     "under this fraction of the dense latency (ToMe: the same r in every block).")]
ProfileOpt = Annotated[Optional[Path], typer.Option(
    "--profile", help="Latency profile folder (default: this machine's CPU profile of the model, built if missing).")]
CalibOpt = Annotated[int, typer.Option(
    "--calib-size", min=1, help="Training images held out for CDCP channel importance.")]
ProxySizeOpt = Annotated[int, typer.Option(
    "--proxy-size", min=1, help="Other held-out training images that score every search trial, untrained.")]
ValSizeOpt = Annotated[int, typer.Option(
    "--val-size", min=1, help="Other held-out training images that rank and choose candidates (the validation split).")]
AllowForeignOpt = Annotated[bool, typer.Option(
    "--allow-foreign-profile", help="Use a profile measured on a device whose fingerprint differs from this one "
                                    "(predictions may be off).")]
TaskOpt = Annotated[str, typer.Option(
    "--task", help="classification (one label per image) or segmentation (a label per pixel: backbone + a light "
                   "decoder on the unmerged patch map, scored by mIoU; --data fashion-mnist or a folder "
                   "DIR/{train,val}/{images,masks}/, see README).")]


def check_inputs(config: Optional[Path] = None, checkpoint: Optional[Path] = None,
                 profile: Optional[Path] = None) -> None:
    """The files --config and --checkpoint name, refused before torch loads when missing or a folder;
    the --profile folder, refused when missing (its contents are checked where it is read)."""
    if config is not None:
        check_input_file(config, "config")
    if checkpoint is not None:
        check_input_file(checkpoint, "checkpoint")
    if profile is not None and not profile.is_dir():
        raise CaitsearchError(f"profile {profile} is not a folder; build one with `caitsearch profile`.")
