"""The compression config: the one user-facing description of a compressed model.

A config is JSON, one entry per block::

    {"model": "deit_small_patch16_224", "img_size": [224, 224],
     "blocks": [{"merge_axis": "none", "merge_count": 0,
                 "keep_qk": 64, "keep_v": 64, "keep_mlp": 1536}, ...]}

`merge_axis`/`merge_count` say how many grid columns or rows ATME removes after the block's
attention (or, with axis "tokens", how many tokens ToMe's bipartite matching removes: the baseline;
after it the tokens are a set, described as a 1 x n strip, and no grid merge may follow); `keep_qk`/`keep_v` are the per-head widths CDCP keeps (the same in every head), and
`keep_mlp` the MLP hidden width. From it follow the grid at every block, token counts and MACs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Iterable, Union

from torch import nn

from .errors import ConfigError
from .io import atomic_write_text, check_input_file
from .models import ModelSpec



class MergeAxis(StrEnum):
    """What a block's merge step removes. A `StrEnum`, so configs keep plain strings in JSON."""

    NONE = "none"  # no merge
    COLS = "cols"  # ATME: grid columns
    ROWS = "rows"  # ATME: grid rows
    TOKENS = "tokens"  # ToMe: patch tokens by bipartite matching (the baseline)


MERGE_AXES = tuple(MergeAxis)
GRID_AXES = (MergeAxis.COLS, MergeAxis.ROWS)
HEAD_MULTIPLE = 8
MLP_MULTIPLE = 32
_BLOCK_KEYS = ("merge_axis", "merge_count", "keep_qk", "keep_v", "keep_mlp")


@dataclass(frozen=True)
class BlockConfig:
    """What one block keeps: merge (axis, count) after attention, and CDCP widths."""

    keep_qk: int
    keep_v: int
    keep_mlp: int
    merge_axis: MergeAxis = MergeAxis.NONE
    merge_count: int = 0


@dataclass(frozen=True)
class BlockShape:
    """The grid a block sees: attention runs on the input grid, the MLP on the merged one."""

    h_in: int
    w_in: int
    h_out: int
    w_out: int
    tokens_in: int
    tokens_out: int


def lines_along(axis: str, h: int, w: int) -> int:
    """What a merge along `axis` removes from: columns, rows, or (ToMe) patch tokens; none: 0."""
    return {MergeAxis.NONE: 0, MergeAxis.COLS: w, MergeAxis.ROWS: h, MergeAxis.TOKENS: h * w}[axis]


def after_merge(axis: str, count: int, h: int, w: int) -> tuple[int, int]:
    """The grid left by removing `count` lines along `axis` (a ToMe merge leaves a 1 x n strip)."""
    if axis == MergeAxis.COLS:
        return h, w - count
    if axis == MergeAxis.ROWS:
        return h - count, w
    if axis == MergeAxis.TOKENS:
        return 1, h * w - count
    return h, w


def snap(keep: float, full: int, multiple: int) -> int:
    """Round a keep count to a hardware-friendly multiple, staying within [multiple, full]."""
    if keep >= full:
        return full
    m = min(multiple, full)
    return int(min(full, max(m, m * round(keep / m))))



@dataclass
class CompressionConfig:
    """Per-block ATME and CDCP settings for one model at one input size."""

    model: str
    img_size: tuple[int, int]
    blocks: list[BlockConfig] = field(default_factory=list)

    # ----- construction -------------------------------------------------------------------------
    @classmethod
    def dense(cls, model: Union[ModelSpec, nn.Module]) -> "CompressionConfig":
        """The config that compresses nothing."""
        s = ModelSpec.of(model)
        block = BlockConfig(keep_qk=s.head_dim, keep_v=s.head_dim, keep_mlp=s.mlp_hidden)
        return cls(model=s.name, img_size=s.img_size, blocks=[block] * s.depth)

    @classmethod
    def uniform(
        cls,
        model: Union[ModelSpec, nn.Module],
        keep_rate: float = 1.0,
        merge_every: int = 0,
        merge_fraction: float = 0.25,
        merge_start: int = 0,
        head_multiple: int = HEAD_MULTIPLE,
        mlp_multiple: int = MLP_MULTIPLE,
    ) -> "CompressionConfig":
        """A simple schedule: every block keeps `keep_rate` of its widths (snapped), and every
        `merge_every` blocks from `merge_start` on, ATME removes `merge_fraction` of the grid lines,
        alternating columns and rows."""
        s = ModelSpec.of(model)
        kqk = snap(keep_rate * s.head_dim, s.head_dim, head_multiple)
        kmlp = snap(keep_rate * s.mlp_hidden, s.mlp_hidden, mlp_multiple)
        h, w = s.grid
        blocks, next_axis = [], MergeAxis.COLS
        for i in range(s.depth):
            axis, count = MergeAxis.NONE, 0
            if merge_every > 0 and i >= merge_start and (i - merge_start) % merge_every == 0:
                lines = lines_along(next_axis, h, w)
                count = min(lines // 2, max(1, round(merge_fraction * lines))) if lines > 1 else 0
                if count:
                    axis = next_axis
                    h, w = after_merge(axis, count, h, w)
                    next_axis = MergeAxis.ROWS if next_axis == MergeAxis.COLS else MergeAxis.COLS
            blocks.append(BlockConfig(kqk, kqk, kmlp, axis, count))
        return cls(model=s.name, img_size=s.img_size, blocks=blocks)

    # ----- JSON ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "CompressionConfig":
        if not isinstance(data, dict):
            raise ConfigError("a compression config must be a JSON object with model, img_size and blocks.")
        unknown = set(data) - {"model", "img_size", "blocks"}
        if unknown:
            raise ConfigError(f"unknown key(s) in compression config: {', '.join(sorted(unknown))}.")
        for key in ("model", "img_size", "blocks"):
            if key not in data:
                raise ConfigError(f"compression config is missing '{key}'.")
        if not isinstance(data["model"], str) or not data["model"]:
            raise ConfigError(f"'model' must be a timm model name, not {_shown(data['model'])}.")
        size = data["img_size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)):
            raise ConfigError(f"'img_size' must be two positive integers [height, width], not {_shown(size)}.")
        if not isinstance(data["blocks"], list) or not data["blocks"]:
            raise ConfigError(f"'blocks' must be a list with one entry per block, not {_shown(data['blocks'])}.")
        blocks = [_block_from_dict(i, b) for i, b in enumerate(data["blocks"])]
        return cls(model=data["model"], img_size=(int(size[0]), int(size[1])), blocks=blocks)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "img_size": list(self.img_size),
            "blocks": [{k: _plain(getattr(b, k)) for k in _BLOCK_KEYS} for b in self.blocks],
        }

    @classmethod
    def load(cls, path: Union[str, Path]) -> "CompressionConfig":
        """Read a config file; anything but a UTF-8 JSON config is refused with one sentence."""
        path = check_input_file(Path(path), "config")
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}.") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"config {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON.") from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config {path} is not valid JSON (line {e.lineno}: {e.msg}).") from e
        except RecursionError as e:
            raise ConfigError(f"config {path} is nested too deeply to be a compression config.") from e
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"config {path}: {e}") from e

    def save(self, path: Union[str, Path]) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    # ----- checks and derived quantities ---------------------------------------------------------
    def validate(self, model: Union[ModelSpec, nn.Module]) -> ModelSpec:
        """Refuse, with one sentence, a config that does not fit the model; return its spec."""
        s = ModelSpec.of(model)
        if self.model != s.name:
            raise ConfigError(f"config is for model '{self.model}' but the model is '{s.name}'.")
        if tuple(self.img_size) != tuple(s.img_size):
            raise ConfigError(
                f"config is for input size {list(self.img_size)} but the model takes {list(s.img_size)}."
            )
        if len(self.blocks) != s.depth:
            raise ConfigError(f"config has {len(self.blocks)} blocks but {s.name} has {s.depth}.")
        h, w = s.grid
        flat = False
        for i, b in enumerate(self.blocks):
            for key, full in (("keep_qk", s.head_dim), ("keep_v", s.head_dim), ("keep_mlp", s.mlp_hidden)):
                k = getattr(b, key)
                if not 1 <= k <= full:
                    raise ConfigError(f"block {i}: {key} is {k} but must be between 1 and {full}.")
            if b.keep_qk < s.head_dim and s.qk_norm:
                raise ConfigError(f"block {i}: {s.name} normalises q and k per head, so keep_qk must stay {s.head_dim}.")
            if b.keep_v < s.head_dim and s.attn_scale_norm:
                raise ConfigError(f"block {i}: {s.name} normalises the attention output, so keep_v must stay {s.head_dim}.")
            if b.keep_mlp < s.mlp_hidden and s.mlp_scale_norm:
                raise ConfigError(f"block {i}: {s.name} normalises the MLP hidden layer, so keep_mlp must stay {s.mlp_hidden}.")
            if b.merge_axis == MergeAxis.NONE:
                continue
            if s.attn_pool:
                raise ConfigError(f"block {i}: {s.name} pools with attention, which token merging does not support.")
            if flat and b.merge_axis in GRID_AXES:
                raise ConfigError(f"block {i}: a {b.merge_axis} merge cannot follow a ToMe merge: the tokens are no longer on a grid.")
            lines = lines_along(b.merge_axis, h, w)
            if b.merge_count > lines // 2:
                what = {MergeAxis.COLS: "columns", MergeAxis.ROWS: "rows", MergeAxis.TOKENS: "patch tokens"}[b.merge_axis]
                raise ConfigError(
                    f"block {i}: merge_count {b.merge_count} is more than half of the {lines} "
                    f"{what} left at that block (at most {lines // 2})."
                )
            h, w = after_merge(b.merge_axis, b.merge_count, h, w)
            flat = flat or b.merge_axis == MergeAxis.TOKENS
        return s

    def shapes(self, model: Union[ModelSpec, nn.Module]) -> list[BlockShape]:
        """Grid and token count entering and leaving every block."""
        s = self.validate(model)
        h, w = s.grid
        out = []
        for b in self.blocks:
            h2, w2 = after_merge(b.merge_axis, b.merge_count, h, w)
            p = s.num_prefix_tokens
            out.append(BlockShape(h, w, h2, w2, p + h * w, p + h2 * w2))
            h, w = h2, w2
        return out

    def macs(self, model: Union[ModelSpec, nn.Module]) -> dict:
        """Analytic multiply-accumulates of the materialised model: per block, stem, head, total."""
        s = ModelSpec.of(model)
        per_block = [block_macs(s, b, sh) for b, sh in zip(self.blocks, self.shapes(s))]
        stem = s.num_patches * s.embed_dim * s.in_chans * s.patch_size[0] * s.patch_size[1]
        head = s.embed_dim * s.num_classes * (2 if s.distilled else 1)
        return {"blocks": per_block, "stem": stem, "head": head, "total": stem + head + sum(per_block)}

    @classmethod
    def tome(cls, model: Union[ModelSpec, nn.Module], r: int) -> "CompressionConfig":
        """ToMe's published schedule: every block removes `r` tokens (fewer once half is the cap)."""
        s = ModelSpec.of(model)
        n, blocks = s.grid[0] * s.grid[1], []
        for _ in range(s.depth):
            count = min(r, n // 2)
            blocks.append(BlockConfig(s.head_dim, s.head_dim, s.mlp_hidden, MergeAxis.TOKENS if count else MergeAxis.NONE,
                                      count))
            n -= count
        return cls(model=s.name, img_size=s.img_size, blocks=blocks)

    def with_blocks(self, blocks: Iterable[BlockConfig]) -> "CompressionConfig":
        return replace(self, blocks=list(blocks))


def block_macs(s: ModelSpec, b: BlockConfig, shape: BlockShape) -> int:
    """MACs of one materialised block. Attention runs at the wider of the qk and v widths because
    the fused kernel needs equal head dims (the narrower side is zero-padded)."""
    n, n_out, heads, c = shape.tokens_in, shape.tokens_out, s.num_heads, s.embed_dim
    qkv = n * c * heads * (2 * b.keep_qk + b.keep_v)
    attn = n * n * heads * 2 * max(b.keep_qk, b.keep_v)
    proj = n * heads * b.keep_v * c
    mlp = n_out * c * b.keep_mlp * 2
    return qkv + attn + proj + mlp


def _plain(v):
    return str(v) if isinstance(v, MergeAxis) else v


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shown(value, limit: int = 60) -> str:
    """A value from a config file as it can be quoted in a message: short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _block_from_dict(i: int, b: dict) -> BlockConfig:
    if not isinstance(b, dict):
        raise ConfigError(f"block {i} must be an object with {', '.join(_BLOCK_KEYS)}.")
    unknown = set(b) - set(_BLOCK_KEYS)
    if unknown:
        raise ConfigError(f"block {i}: unknown key(s) {', '.join(sorted(unknown))}.")
    missing = [k for k in ("keep_qk", "keep_v", "keep_mlp") if k not in b]
    if missing:
        raise ConfigError(f"block {i}: missing {', '.join(missing)}.")
    axis = b.get("merge_axis", MergeAxis.NONE)
    count = b.get("merge_count", 0)
    if not isinstance(axis, str) or axis not in MERGE_AXES:
        raise ConfigError(f"block {i}: merge_axis is {_shown(axis)} but must be one of {', '.join(MERGE_AXES)}.")
    axis = MergeAxis(axis)
    for key in ("merge_count", "keep_qk", "keep_v", "keep_mlp"):
        v = b.get(key, 0)
        if not _is_int(v):
            raise ConfigError(f"block {i}: {key} must be an integer, not {_shown(v)}.")
    if count < 0:
        raise ConfigError(f"block {i}: merge_count must not be negative.")
    if axis == MergeAxis.NONE and count:
        raise ConfigError(f"block {i}: merge_count is {count} but merge_axis is 'none'.")
    if axis != MergeAxis.NONE and count == 0:
        axis = MergeAxis.NONE
    return BlockConfig(b["keep_qk"], b["keep_v"], b["keep_mlp"], axis, count)


__all__ = ["BlockConfig", "BlockShape", "CompressionConfig", "GRID_AXES", "MERGE_AXES", "MergeAxis", "after_merge", "block_macs",
           "lines_along", "snap"]
