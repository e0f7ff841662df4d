"""What one `caitsearch search` run is asked to do, grouped the way the pipeline uses it: the
budget, the data, the study, the timing and the retraining recipe (and the device it runs on)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..defaults import CALIB_SIZE, DEFAULT_MINUTES, PROXY_SIZE, VAL_SIZE
from ..device import resolve_device
from ..errors import CaitsearchError
from ..training import Recipe


# README's main job must finish within 20 minutes on any 2-core machine: the final retraining is cut
# to whole steps that fit what is left of this (stated in the output, summary and report)


@dataclass(frozen=True)
class Budget:
    """A latency budget, as a fraction of dense and in ms per batch at the profile's batch size."""

    ratio: float
    ms: float

    def admits(self, latency_ms: float, dense_ms: float) -> bool:
        """Within budget, judged against a dense latency from the same measurement."""
        return latency_ms <= self.ratio * dense_ms


@dataclass(frozen=True)
class BudgetRequest:
    """`--budget R` (R x the dense latency) or `--budget-ms MS` (absolute): exactly one."""

    ratio: Optional[float] = None
    ms: Optional[float] = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.ms is None):
            raise CaitsearchError("give exactly one of --budget (a fraction of dense latency) or --budget-ms.")
        if self.ratio is not None and not (math.isfinite(self.ratio) and self.ratio > 0):
            raise CaitsearchError(f"--budget must be a positive fraction of the dense latency, not {self.ratio:g}.")
        if self.ms is not None and not (math.isfinite(self.ms) and self.ms > 0):
            raise CaitsearchError(f"--budget-ms must be a positive number of milliseconds, not {self.ms:g}.")

    def resolve(self, dense_ms: float) -> Budget:
        if self.ratio is not None:
            return Budget(ratio=self.ratio, ms=self.ratio * dense_ms)
        return Budget(ratio=self.ms / dense_ms, ms=self.ms)

    @property
    def label(self) -> str:
        """`b0.6` or `ms12.5`: names the default run folder."""
        return f"b{self.ratio:g}" if self.ratio is not None else f"ms{self.ms:g}"

    def identity(self) -> dict:
        return {"ratio": self.ratio} if self.ratio is not None else {"ms": self.ms}


@dataclass(frozen=True)
class DataRequest:
    """The data and its held-out splits (`data.load_dataset`)."""

    source: str = "fashion-mnist"  # or an ImageFolder directory
    calib_size: int = CALIB_SIZE  # training images held out for CDCP channel importance
    proxy_size: int = PROXY_SIZE  # other held-out images every trial is scored on, untrained
    val_size: int = VAL_SIZE  # other held-out images the candidates are ranked and chosen on
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None


@dataclass(frozen=True)
class StudyRequest:
    trials: Optional[int] = None  # total for the study, across resumes and workers (default: sized to the space)
    minutes: Optional[float] = None  # stop sampling after this long, even below `trials`
    sampler: str = "tpe"
    storage: Optional[str] = None  # default: sqlite in the run folder
    name: str = "search"

    def __post_init__(self) -> None:
        if self.trials is not None and self.trials < 1:
            raise CaitsearchError(f"--trials must be at least 1, not {self.trials}.")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise CaitsearchError(f"--search-minutes must be a positive number of minutes, not {self.minutes:g}.")


@dataclass(frozen=True)
class RankRequest:
    """The multi-fidelity stage (`search.rank`): how many finalists get a short fine-tune, and how long."""

    finalists: int = 8
    tune_steps: int = 25  # optimizer steps of the first rung; each later rung doubles the total
    eta: int = 2  # successive halving keeps 1/eta per rung

    def __post_init__(self) -> None:
        if self.finalists < 0 or self.tune_steps < 1 or self.eta < 2:
            raise CaitsearchError("--finalists must be >= 0, --tune-steps >= 1 (and the halving factor >= 2).")


@dataclass(frozen=True)
class MeasureRequest:
    profile: Optional[Path] = None  # default: this machine's CPU profile of the model
    remeasure: int = 4  # best feasible trials re-measured end to end per round
    repeats: int = 15  # interleaved timing rounds
    threads: Optional[int] = None
    allow_foreign_profile: bool = False


@dataclass(frozen=True)
class SearchRequest:
    """Everything one `caitsearch search` run needs; the CLI fills it from its options."""

    out: Path
    budget: BudgetRequest
    strategy: str = "cait"  # cait, atme, cdcp or tome (space.STRATEGIES)
    task: str = "classification"  # or "segmentation" (tasks.TASKS): the model, loss, metric and data
    model: Optional[str] = None
    img_size: Optional[tuple[int, int]] = None
    checkpoint: Optional[Path] = None
    seed: int = 0  # of the sampler, the data splits and (through the recipe) retraining
    data: DataRequest = field(default_factory=DataRequest)
    study: StudyRequest = field(default_factory=StudyRequest)
    measure: MeasureRequest = field(default_factory=MeasureRequest)
    # 6 epochs: with the earlier 90.12% teacher, 3 left the 0.6 main job 0.89 points below it, 6 within 0.34
    recipe: Recipe = field(default_factory=lambda: Recipe(epochs=6))
    rank: RankRequest = field(default_factory=RankRequest)
    retrain_top: int = 1
    minutes: float = DEFAULT_MINUTES  # wall-time budget of the run; the final retraining gets what is left (0: none)
    device: Optional[str] = None  # cpu or cuda: teacher, proxy, retraining, evaluation (default: the profile's)
    progress: bool = True  # progress on stderr
    echo: bool = True  # the space and budget lines on stdout (off for --json)

    def __post_init__(self) -> None:
        if self.retrain_top < 0:
            raise CaitsearchError(f"--retrain-top must be 0 or more, not {self.retrain_top}.")
        if not (math.isfinite(self.minutes) and self.minutes >= 0):
            raise CaitsearchError(f"--minutes must be 0 (no limit) or a positive number, not {self.minutes:g}.")
        if self.device is not None:
            resolve_device(self.device)  # refuses an unknown device, or cuda where no GPU is visible

    def as_dict(self) -> dict:
        """For the run manifest: plain JSON values, and no storage URL (it may hold a password)."""
        data = asdict(self)
        data["study"].pop("storage")
        return _plain(data)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value
