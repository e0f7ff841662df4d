"""Dynamic CDCP for retraining: masks re-selected from running channel importance while the kept
widths anneal from full to the config's targets, so a channel dropped early can come back; then
the masks freeze at the targets. This is CDCP's "dynamic" half; `cdcp` holds the static one."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .cdcp import GROUPS, ChannelStats
from .vit import CaitViT, Calibration, collect_channel_stats, full_widths, set_block_masks

MeanOverRanks = Callable[[torch.Tensor], torch.Tensor]


class DynamicMasks:
    """Running (EMA) channel importance per block of a `CaitViT` under retraining, and top-k masks
    whose keep counts anneal from full width to the config's targets along a cubic schedule."""

    def __init__(self, model: CaitViT, momentum: float = 0.9) -> None:
        self.model = model
        self.blocks = list(model.vit.blocks)
        self.full = full_widths(self.blocks[0])
        self.targets = [{"qk": b.keep_qk, "v": b.keep_v, "mlp": b.keep_mlp} for b in model.config.blocks]
        self.frozen = False
        self.stats = [(ChannelStats(momentum), ChannelStats(momentum)) for _ in self.blocks]
        self.set_keeps(lambda i, group: self.full[group])  # start at full width, masks present where pruned

    def pruned(self, i: int, group: str) -> bool:
        return self.targets[i][group] < self.full[group]

    def seed(self, calib: Calibration) -> None:
        """Start the running importance from calibration statistics of the unpruned model."""
        for running, first in zip(self.stats, collect_channel_stats(self.model, calib)):
            for run, measured in zip(running, first):
                run.load_state_dict(measured.state_dict())

    def attach(self, on: bool) -> None:
        """Let the blocks feed their activation statistics into the running importance (or stop)."""
        for blk, (attn, mlp) in zip(self.blocks, self.stats):
            blk.attn.stats, blk.mlp.stats = (attn, mlp) if on else (None, None)

    def keep(self, i: int, group: str, progress: float) -> int:
        """Cubic anneal (gradual pruning): fast early, gentle near the target."""
        full, target = self.full[group], self.targets[i][group]
        return int(round(target + (full - target) * (1.0 - min(1.0, progress)) ** 3))

    def set_keeps(self, keep: Callable[[int, str], int], mean_over_ranks: Optional[MeanOverRanks] = None) -> None:
        """Re-select every mask as the top-`keep(i, group)` channels by current importance. Under
        data parallelism the statistics are first averaged over ranks, so every rank picks the same masks."""
        for i, (blk, block_stats) in enumerate(zip(self.blocks, self.stats)):
            if mean_over_ranks is not None:
                for s in block_stats:
                    s.all_reduce(mean_over_ranks)
            set_block_masks(blk, {g: keep(i, g) for g in GROUPS}, tuple(s if s else None for s in block_stats),
                            masked={g for g in GROUPS if self.pruned(i, g)})

    def on_step(self, step: int, anneal_steps: int, every: int, mean_over_ranks: Optional[MeanOverRanks] = None) -> None:
        if self.frozen:
            return
        if step >= anneal_steps:
            self.set_keeps(lambda i, group: self.targets[i][group], mean_over_ranks)
            self.frozen = True
            self.attach(False)
        elif step % every == 0:
            self.set_keeps(lambda i, group: self.keep(i, group, step / anneal_steps), mean_over_ranks)

    def state_dict(self) -> dict:
        return {"frozen": self.frozen,
                "stats": {f"{i}.{part}.{name}": value for i, pair in enumerate(self.stats)
                          for part, s in zip(("attn", "mlp"), pair) for name, value in s.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.frozen = bool(state.get("frozen", False))
        per_module: dict[tuple[int, int], dict] = {}
        for key, value in state.get("stats", {}).items():
            i, part, name = key.split(".")
            per_module.setdefault((int(i), 0 if part == "attn" else 1), {})[name] = value
        for (i, part), values in per_module.items():
            self.stats[i][part].load_state_dict(values)
