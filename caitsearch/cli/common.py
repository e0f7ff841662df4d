"""Options and model loading shared by the commands, so every command spells them the same way."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from ..compress import CaitViT, compress, is_compressed_state, load_materialized, materialize
from ..config import CompressionConfig
from ..errors import CaitsearchError
from ..models import DEFAULT_MODEL, create_model, load_state

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help=f"timm model name (default: the config's model, else {DEFAULT_MODEL}).")]
ImgSizeOpt = Annotated[Optional[tuple[int, int]], typer.Option(
    "--img-size", help="Input height and width, e.g. --img-size 224 160 (default: the config's, else the model's).")]
NumClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", help="Classifier width (default: the model's).")]
CheckpointOpt = Annotated[Optional[Path], typer.Option(
    "--checkpoint", help="Weights: a dense timm state dict or a compressed caitsearch one (.pth/.safetensors, loaded weights-only).")]
PretrainedOpt = Annotated[bool, typer.Option("--pretrained", help="Start from timm hub weights (needs network access).")]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="Compression config JSON (see `caitsearch inspect --help`).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]
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

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CaitsearchError(f"--dtype must be one of {', '.join(DTYPES)}, not '{name}'.")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise CaitsearchError(f"--device must be cpu or cuda, not '{name}'.")
    if name == "cuda" and not torch.cuda.is_available():
        raise CaitsearchError("--device cuda needs an NVIDIA GPU with a CUDA build of torch; none is visible here.")
    return torch.device(name)


def load_config(path: Optional[Path]) -> Optional[CompressionConfig]:
    if path is None:
        return None
    if not path.is_file():
        raise CaitsearchError(f"config {path} does not exist.")
    return CompressionConfig.load(path)


def strategy_config(dense: torch.nn.Module, strategy: str, budget: Optional[float], config: Optional[CompressionConfig],
                    profile: Optional[Path] = None) -> Optional[CompressionConfig]:
    """The config a command runs under `--strategy`: the given one, checked to lie in the
    strategy's space, or (with --budget) the strategy's uniform schedule predicted closest under
    the budget by the latency profile."""
    from ..models import ModelSpec
    from ..space import SearchSpace

    spec = ModelSpec.from_model(dense)
    space = SearchSpace.for_strategy(spec, strategy)
    if config is not None:
        if budget is not None:
            raise CaitsearchError("give --config or --budget, not both: --budget picks a config itself.")
        config.validate(spec)
        problem = space.refuses(config)
        if problem:
            raise CaitsearchError(f"the config is not a {strategy} config: {problem}.")
        return config
    if budget is None:
        return None
    if not budget > 0:
        raise CaitsearchError(f"--budget must be a positive fraction of the dense latency, not {budget:g}.")
    from ..search.pipeline import find_profile

    prof = find_profile(spec, profile)
    return space.schedule_for(prof.predict, budget * prof.dense_ms)


def load_models(
    model: Optional[str],
    img_size: Optional[tuple[int, int]] = None,
    config_path: Optional[Path] = None,
    checkpoint: Optional[Path] = None,
    pretrained: bool = False,
    num_classes: Optional[int] = None,
    strategy: Optional[str] = None,
    budget: Optional[float] = None,
    profile: Optional[Path] = None,
) -> tuple[torch.nn.Module, CompressionConfig, CaitViT]:
    """The dense timm model, the config (dense if none given), and the materialised compressed
    model (without a config: the compressed code path with nothing compressed). A compressed
    checkpoint fills the compressed model; a dense one fills the dense model, from which the
    compressed one is derived. `strategy`/`budget`: see `strategy_config`."""
    config = load_config(config_path)
    name = model or (config.model if config else DEFAULT_MODEL)
    size = img_size or (tuple(config.img_size) if config else None)
    state = load_state(checkpoint) if checkpoint else None
    compressed_state = state is not None and is_compressed_state(state)
    if num_classes is None and state is not None:
        head = state.get("vit.head.weight" if compressed_state else "head.weight")
        num_classes = int(head.shape[0]) if head is not None else None
    dense = create_model(name, img_size=size, num_classes=num_classes, pretrained=pretrained)
    if state is not None and not compressed_state:
        from ..models import load_checkpoint

        load_checkpoint(dense, checkpoint)
    elif state is None and not pretrained:
        _load_default_weights(dense, name)
    if strategy is not None or budget is not None:  # checked against, or picked from, the strategy's space
        config = strategy_config(dense, strategy or "cait", budget, config, profile)
    if config is None:
        if compressed_state:
            raise CaitsearchError(f"checkpoint {checkpoint} holds a compressed model; pass its --config too.")
        config = CompressionConfig.dense(dense)  # the compressed code path with nothing compressed
        return dense, config, compress(dense, config).eval()
    config.validate(dense)
    if compressed_state:
        return dense, config, load_materialized(dense, config, state).eval()
    return dense, config, materialize(compress(dense, config)).eval()


def _load_default_weights(dense: torch.nn.Module, name: str) -> None:
    """The embedded default model gets its committed weights when it has the shape they fit
    (a custom --img-size or --num-classes keeps the fresh initialisation)."""
    from ..models import default_checkpoint, load_checkpoint

    path = default_checkpoint(name)
    if path is None:
        return
    own = dense.state_dict()
    weights = load_state(path)
    if all(k in weights and weights[k].shape == v.shape for k, v in own.items()):
        load_checkpoint(dense, path)
