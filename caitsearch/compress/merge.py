"""What ATME and ToMe share: turning "input token i goes to output token j" into averaging
weights, and the proportional-attention bias of tokens that stand for several patches.

A merge is applied as one batched matmul with a per-image `(B, out, n)` weight matrix: cheaper on
CPU than scatter-add plus normalisation passes, static in shape, and a plain MatMul in ONNX. The
matrix is built by scatters that never write one place twice (each input token owns its column)
and a row sum, never a scatter-add: TensorRT runs ScatterElements without a reduction natively
but hands one with a reduction to a plugin.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def merge_matrix(sizes: torch.Tensor, target: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image `(B, n_out, n)` averaging weights for `target` `(B, n)` (where each input goes)
    and the new sizes `(B, n_out)`. Row `j` holds `size_i / new_size_j` for every input `i` that
    lands on `j`. ATME passes grid lines (within a row, tokens of a column merge weighted by
    their column widths, the row height being a common factor); ToMe passes tokens.

    Sizes are whole numbers of patches, so the row sums are exact in any order: the result is
    bit for bit that of a scatter-add."""
    index = target[:, None, :]
    shape = (sizes.shape[0], n_out, sizes.shape[1])
    new_sizes = sizes.new_zeros(shape).scatter_(1, index, sizes[:, None, :]).sum(-1)
    weights = sizes / new_sizes.gather(1, target)
    return sizes.new_zeros(shape).scatter_(1, index, weights[:, None, :]), new_sizes


def proportional_bias(sizes: torch.Tensor, prefix: int, dtype: torch.dtype) -> torch.Tensor:
    """`log(size)` of every key as a `(B, 1, 1, N)` float `attn_mask` for SDPA (prefix tokens: 0),
    which keeps the fused attention kernel."""
    return F.pad(sizes.log(), (prefix, 0)).to(dtype)[:, None, None, :]
