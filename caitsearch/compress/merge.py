"""What ATME and ToMe share: turning "input token i goes to output token j" into averaging
weights, and the proportional-attention bias of tokens that stand for several patches.

A merge is applied as one batched matmul with a per-image `(B, out, n)` weight matrix: cheaper on
CPU than scatter-add plus normalisation passes, static in shape, and a plain MatMul in ONNX.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def merge_matrix(sizes: torch.Tensor, target: torch.Tensor, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image `(B, n_out, n)` averaging weights for `target` `(B, n)` (where each input goes)
    and the new sizes `(B, n_out)`. Row `j` holds `size_i / new_size_j` for every input `i` that
    lands on `j`. ATME passes grid lines (within a row, tokens of a column merge weighted by
    their column widths, the row height being a common factor); ToMe passes tokens."""
    new_sizes = sizes.new_zeros(sizes.shape[0], n_out).scatter_add_(1, target, sizes)
    weights = sizes / new_sizes.gather(1, target)
    matrix = sizes.new_zeros(sizes.shape[0], n_out, sizes.shape[1])
    return matrix.scatter_(1, target[:, None, :], weights[:, None, :]), new_sizes


def proportional_bias(sizes: torch.Tensor, prefix: int, dtype: torch.dtype) -> torch.Tensor:
    """`log(size)` of every key as a `(B, 1, 1, N)` float `attn_mask` for SDPA (prefix tokens: 0),
    which keeps the fused attention kernel."""
    return F.pad(sizes.log(), (prefix, 0)).to(dtype)[:, None, None, :]
