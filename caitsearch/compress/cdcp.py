"""CDCP: consistent channel pruning of attention and MLP widths.

One qk mask of length `head_dim` is shared by every head and by both Q and K (a q.k product only
involves channels present in both); one v mask is shared by every head and matches the input
columns of `proj`; one MLP mask selects `fc1` rows and `fc2` columns. Because the same channels go
in every head, the pruned attention stays dense and uniform, and materialising it is plain slicing.

Importance (no training): qk channel c scores sum_h E|q_hc k_hc|, v channel c scores
sum_h E|v_hc| * ||W_proj[:, hc]||, MLP channel c scores E|act_c| * ||W_fc2[:, c]||, with
expectations over calibration tokens; without calibration data the activations are replaced by the
norms of the weight rows that produce them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn


def top_k_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A {0, 1} float mask keeping the `keep` highest scores (ties broken by index)."""
    mask = torch.zeros_like(scores, dtype=torch.float32)
    if keep >= scores.numel():
        return mask.fill_(1.0)
    mask[scores.topk(keep).indices] = 1.0
    return mask


def kept_indices(mask: Optional[torch.Tensor], width: int) -> torch.Tensor:
    """Sorted kept channel indices of a binary mask (all channels when there is no mask)."""
    if mask is None:
        return torch.arange(width)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("only binary masks can be materialised; freeze the masks first.")
    return mask.nonzero().flatten().cpu()


def head_rows(channels: torch.Tensor, num_heads: int, head_dim: int, offset: int = 0) -> torch.Tensor:
    """Rows of a per-head projection that hold `channels` in every head, head-major."""
    heads = torch.arange(num_heads)[:, None] * head_dim
    return (offset + heads + channels[None, :]).flatten()


def slice_linear(layer: nn.Linear, rows: Optional[torch.Tensor] = None, cols: Optional[torch.Tensor] = None) -> nn.Linear:
    """A plain, smaller `nn.Linear` holding the selected output rows / input columns."""
    w = layer.weight.detach()
    if rows is not None:
        w = w[rows.to(w.device)]
    if cols is not None:
        w = w[:, cols.to(w.device)]
    out = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None, device=w.device, dtype=w.dtype)
    out.weight.data.copy_(w)
    if layer.bias is not None:
        b = layer.bias.detach()
        out.bias.data.copy_(b[rows.to(b.device)] if rows is not None else b)
    return out


GROUPS = ("qk", "v", "mlp")  # the channel groups CDCP prunes in a block, each with one shared mask


class ChannelStats:
    """Per-channel activation statistics of one module (by name: "qk", "v", "act"), averaged over
    calibration batches, or, with a `momentum`, an exponential moving average over training steps
    (running importance for dynamic CDCP). It owns its state: update, cross-rank average, state dict."""

    def __init__(self, momentum: Optional[float] = None) -> None:
        self.momentum = momentum
        self._sums: dict[str, torch.Tensor] = {}
        self._batches: dict[str, int] = {}

    def add(self, name: str, per_channel: torch.Tensor) -> None:
        v = per_channel.detach().float().cpu()
        if self.momentum is not None and name in self._sums:
            self._sums[name] = self.momentum * self.mean(name) + (1 - self.momentum) * v
            self._batches[name] = 1
            return
        self._sums[name] = self._sums[name] + v if name in self._sums else v
        self._batches[name] = self._batches.get(name, 0) + 1

    def mean(self, name: str) -> Optional[torch.Tensor]:
        return self._sums[name] / self._batches[name] if name in self._sums else None

    def __bool__(self) -> bool:
        return bool(self._sums)

    def all_reduce(self, mean_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every statistic by its mean over data-parallel ranks, so all ranks agree."""
        for name in sorted(self._sums):
            self._sums[name], self._batches[name] = mean_over_ranks(self.mean(name)).cpu(), 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: self.mean(name) for name in self._sums}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Start from these means, as if each were one batch."""
        self._sums = {name: value.detach().float().cpu() for name, value in state.items()}
        self._batches = {name: 1 for name in state}


def attention_scores(qkv: nn.Linear, proj: nn.Linear, num_heads: int, head_dim: int,
                     stats: Optional[ChannelStats]) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance of each of the `head_dim` qk and v channels, summed over heads."""
    w = qkv.weight.detach().float().view(3, num_heads, head_dim, -1)
    proj_norm = proj.weight.detach().float().norm(dim=0).view(num_heads, head_dim).cpu()
    qk = stats.mean("qk") if stats else None
    if qk is None:  # weights only: the norms of the rows that produce q_c and k_c
        qk = (w[0].norm(dim=-1) * w[1].norm(dim=-1)).cpu()
    v = stats.mean("v") if stats else None
    if v is None:
        v = w[2].norm(dim=-1).cpu()
    return qk.sum(0), (v * proj_norm).sum(0)


def mlp_scores(fc1: nn.Linear, fc2: nn.Linear, stats: Optional[ChannelStats]) -> torch.Tensor:
    """Importance of each MLP hidden channel."""
    act = stats.mean("act") if stats else None
    if act is None:
        act = fc1.weight.detach().float().norm(dim=1).cpu()
    return act * fc2.weight.detach().float().norm(dim=0).cpu()
