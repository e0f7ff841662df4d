"""What caitsearch needs to know about a timm Vision Transformer, and how to build one.

`ModelSpec` is read off a live timm `VisionTransformer` (DeiT, DeiT-III, distilled DeiT, AugReg ViT,
register-token ViTs); models built from other blocks are refused with one sentence, because the
compressed path re-implements the block forward and must not silently drop a feature it does not know.
"""
from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .defaults import DEFAULT_MODEL  # noqa: F401  (re-exported: the model every command defaults to)
from .errors import CaitsearchError, reason
from .io import check_input_file

POOLS_THAT_AVERAGE = ("avg", "avgmax")


@dataclass(frozen=True)
class ModelSpec:
    """Static shape facts of a ViT: everything the config, MAC count and profiler need."""

    name: str
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    grid: tuple[int, int]
    in_chans: int
    num_prefix_tokens: int
    embed_dim: int
    depth: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_classes: int
    global_pool: str
    attn_pool: bool
    distilled: bool
    qk_norm: bool
    attn_scale_norm: bool
    mlp_scale_norm: bool

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @classmethod
    def of(cls, model: "ModelSpec | nn.Module") -> "ModelSpec":
        """The spec of a model (a spec is its own spec)."""
        return model if isinstance(model, cls) else cls.from_model(model)

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelSpec":
        from timm.layers import Mlp
        from timm.layers.attention import Attention
        from timm.models.vision_transformer import Block, VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise CaitsearchError(
                f"{type(model).__name__} is not a timm VisionTransformer; caitsearch compresses "
                "ViT-family models such as deit_tiny_patch16_224 or vit_small_patch16_224."
            )
        name = model_name(model)
        for i, blk in enumerate(model.blocks):
            if type(blk) is not Block or type(blk.attn) is not Attention or type(blk.mlp) is not Mlp:
                raise CaitsearchError(
                    f"{name}: block {i} is {type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__}; "
                    "only timm's standard Block with Attention and Mlp is supported."
                )
            if getattr(blk.attn, "gate", None) is not None:
                raise CaitsearchError(f"{name}: gated attention is not supported.")
        blk0 = model.blocks[0]
        pe = model.patch_embed
        return cls(
            name=name,
            img_size=tuple(int(s) for s in pe.img_size),
            patch_size=tuple(int(s) for s in pe.patch_size),
            grid=tuple(int(s) for s in pe.grid_size),
            in_chans=int(pe.proj.in_channels),
            num_prefix_tokens=int(model.num_prefix_tokens),
            embed_dim=int(model.embed_dim),
            depth=len(model.blocks),
            num_heads=int(blk0.attn.num_heads),
            head_dim=int(blk0.attn.head_dim),
            mlp_hidden=int(blk0.mlp.fc1.out_features),
            num_classes=int(model.num_classes),
            global_pool=str(model.global_pool),
            attn_pool=model.attn_pool is not None,
            distilled=getattr(model, "dist_token", None) is not None,
            qk_norm=not isinstance(blk0.attn.q_norm, nn.Identity),
            attn_scale_norm=not isinstance(blk0.attn.norm, nn.Identity),
            mlp_scale_norm=not isinstance(blk0.mlp.norm, nn.Identity),
        )


def model_name(model: nn.Module) -> str:
    """The timm name of a model (of the timm model inside a compressed one)."""
    model = getattr(model, "vit", model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def model_spec(name: str, img_size: Optional[Sequence[int]] = None, num_classes: Optional[int] = None) -> ModelSpec:
    """The spec of a timm model, built on the meta device (no memory, no initialisation), for
    deciding shapes, data framing and profiles before the real model is needed."""
    with torch.device("meta"):
        return ModelSpec.from_model(create_model(name, img_size=img_size, num_classes=num_classes))


def create_model(
    name: str,
    img_size: Optional[Sequence[int]] = None,
    num_classes: Optional[int] = None,
    in_chans: Optional[int] = None,
    pretrained: bool = False,
    checkpoint: Optional[Path] = None,
    **kwargs,
) -> nn.Module:
    """Build a timm model in eval mode; a checkpoint is loaded weights-only (no code runs from it)."""
    import timm

    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        raise CaitsearchError(f"unknown timm model '{name}'; try `timm.list_models('*deit*')`.")
    if img_size is not None:
        if len(img_size) != 2 or not all(int(s) > 0 for s in img_size):
            raise CaitsearchError(f"--img-size must be a positive height and width, not {' '.join(map(str, img_size))}.")
        kwargs["img_size"] = tuple(int(s) for s in img_size)
    if num_classes is not None and int(num_classes) < 1:
        raise CaitsearchError(f"--num-classes must be at least 1, not {num_classes}.")
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if in_chans is not None:
        kwargs["in_chans"] = int(in_chans)
    try:
        model = _pretrained(name, **kwargs) if pretrained else timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:  # ViT-only arguments given to another family: say what it is instead
        if not kwargs:
            raise CaitsearchError(f"cannot build '{name}': {reason(e)}") from e
        ModelSpec.from_model(timm.create_model(name, pretrained=False))
        raise CaitsearchError(f"cannot build '{name}': {reason(e)}") from e
    except (ValueError, AssertionError, RuntimeError) as e:
        raise CaitsearchError(f"cannot build '{name}': {reason(e)}") from e
    _check_patch_grid(model, name)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


def _check_patch_grid(model: nn.Module, name: str) -> None:
    """Refuse an input size the patch size does not divide: the patch embedding would silently
    drop the edge pixels."""
    pe = getattr(model, "patch_embed", None)
    size, patch = getattr(pe, "img_size", None), getattr(pe, "patch_size", None)
    if size is None or patch is None:
        return
    if any(int(s) % int(p) for s, p in zip(size, patch)):
        fits = " ".join(str(max(int(p), int(s) // int(p) * int(p))) for s, p in zip(size, patch))
        raise CaitsearchError(f"{name} cuts {int(patch[0])}x{int(patch[1])} patches, which do not tile "
                              f"--img-size {' '.join(str(int(s)) for s in size)} (the edge pixels would be dropped); "
                              f"try --img-size {fits}.")


def _pretrained(name: str, **kwargs) -> nn.Module:
    """timm's hub weights, failing in seconds with one sentence where the hub is out of reach (hub
    downloads otherwise retry for about a minute): offline, only cached weights are used."""
    import timm
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    try:
        constants.HF_HUB_OFFLINE = offline or not _reachable(constants.ENDPOINT)
        return timm.create_model(name, pretrained=True, **kwargs)
    except OSError as e:  # no network and no cached copy, a failed download (hub and HTTP errors are OSErrors)
        where = "the hub is out of reach and they are not cached" if constants.HF_HUB_OFFLINE else reason(e)
        raise CaitsearchError(f"could not fetch the pretrained weights of {name} ({where}); "
                              "--checkpoint FILE works offline.") from e
    finally:
        constants.HF_HUB_OFFLINE = offline


def _reachable(url: str, timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
        return True
    except (OSError, ValueError, TypeError):
        return False


def read_weights_only(path: Path, what: str = "checkpoint", advice: str = "") -> object:
    """Whatever a safetensors or weights-only torch file holds; a file that would run code, or is
    corrupt, truncated or empty, is refused with one sentence (and `advice`, e.g. to delete it)."""
    path = check_input_file(Path(path), what)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text goes on to suggest weights_only=False: never quote it
        raise CaitsearchError(f"cannot read {what} {path}: it is not a plain weights file (loading it would run "
                              f"code, which caitsearch never does){advice}.") from e
    except Exception as e:  # corrupt or truncated file, wrong format
        raise CaitsearchError(f"cannot read {what} {path}: it is corrupt, truncated or not a weights file "
                              f"({reason(e, 120)}){advice}.") from e


def load_state(path: Path) -> dict:
    """Read a state dict (names to tensors) from a safetensors or weights-only torch file."""
    state = read_weights_only(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not state:
        raise CaitsearchError(f"checkpoint {path} holds no state dict.")
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CaitsearchError(f"checkpoint {path} is not a state dict of tensors ({bad!r} holds a "
                              f"{type(state[bad]).__name__}).")
    return state


def mismatch(own: dict, state: dict) -> Optional[str]:
    """How a state dict fails to fit a model's own one (None when it fits), in a few words."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or wrong):
        return None
    example = (wrong or missing or unexpected)[0]
    if example in wrong:
        example += f": {list(state[example].shape)} in the file, {list(own[example].shape)} in the model"
    return f"{len(missing)} missing, {len(unexpected)} unexpected and {len(wrong)} mis-shaped tensors (e.g. {example})"


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load weights into `model`, refusing a checkpoint made for a different architecture."""
    state = load_state(path)
    what = mismatch(model.state_dict(), state)
    if what:
        raise CaitsearchError(f"checkpoint {path} does not fit model {model_name(model)}: {what}.")
    model.load_state_dict(state)


def _register_embedded_models() -> None:
    """Register the embedded default model with timm's registry, so its name works everywhere."""
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    def deit_fmnist_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
        """DeiT-shaped ViT for 32x32 single-channel images (Fashion-MNIST padded from 28x28): 8x8
        patch grid, width 128, 2 heads of 64, 6 blocks, MLP 512 (1.2 M parameters). Sized so that
        dense training reaches ~90% in minutes and profile, search and retraining together fit
        the default pipeline's time goal on a 2-core CPU (width 192 trains ~2.2x slower)."""
        if pretrained:
            raise CaitsearchError("deit_fmnist_patch4_32 has no hub weights; pass --checkpoint.")
        args = dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6,
                    num_heads=2, mlp_ratio=4.0, qkv_bias=True)
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        model = VisionTransformer(**{**args, **kwargs})
        model.pretrained_cfg = {"architecture": "deit_fmnist_patch4_32", "num_classes": model.num_classes,
                                "input_size": (model.patch_embed.proj.in_channels, *model.patch_embed.img_size),
                                "mean": (0.2860,), "std": (0.3530,)}
        return model

    register_model(deit_fmnist_patch4_32)


WEIGHTS_DIR = Path(__file__).parent / "weights"


def default_checkpoint(name: str) -> Optional[Path]:
    """The committed dense weights of an embedded model (see caitsearch/weights/README.md), if any."""
    path = WEIGHTS_DIR / f"{name}.safetensors"
    return path if path.is_file() else None

_register_embedded_models()
