"""Turning the shared options into models: the config, the dense model and its compressed form.

Imported inside the commands (it loads torch and timm)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..compress import CaitViT, compress, is_compressed_state, load_materialized, materialize
from ..config import CompressionConfig
from ..errors import CaitsearchError
from ..models import DEFAULT_MODEL, ModelSpec, load_state
from ..search import strategy_config
from ..training import load_teacher


def load_config(path: Optional[Path]) -> Optional[CompressionConfig]:
    return None if path is None else CompressionConfig.load(path)


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
    allow_foreign: bool = False,
) -> tuple[torch.nn.Module, CompressionConfig, CaitViT]:
    """The dense timm model, the config (dense if none given), and the materialised compressed
    model (without a config: the compressed code path with nothing compressed). A compressed
    checkpoint fills the compressed model; a dense one is the teacher, from which the compressed
    one is derived. `strategy`/`budget`/`profile`: see `search.strategy_config`."""
    config = load_config(config_path)
    name = model or (config.model if config else DEFAULT_MODEL)
    size = img_size or (tuple(config.img_size) if config else None)
    state = load_state(checkpoint) if checkpoint else None
    compressed_state = state is not None and is_compressed_state(state)
    if compressed_state and num_classes is None:
        head = state.get("vit.head.weight")
        num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else None
    dense = load_teacher(name, img_size=size, num_classes=num_classes,
                         checkpoint=None if compressed_state else checkpoint, pretrained=pretrained).model
    if strategy is not None or budget is not None or profile is not None:  # checked against, or picked from, the strategy's space
        config = strategy_config(ModelSpec.from_model(dense), strategy or "cait", budget, config, profile, allow_foreign)
    if config is None:
        if compressed_state:
            raise CaitsearchError(f"checkpoint {checkpoint} holds a compressed model; pass its --config too.")
        config = CompressionConfig.dense(dense)  # the compressed code path with nothing compressed
        return dense, config, compress(dense, config).eval()
    config.validate(dense)
    if compressed_state:
        return dense, config, load_materialized(dense, config, state, source=f"checkpoint {checkpoint}").eval()
    return dense, config, materialize(compress(dense, config)).eval()
