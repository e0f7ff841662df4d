"""The config a command runs under `--strategy`: a given one, checked to lie in the strategy's
space, or (with `--budget`) the strategy's uniform schedule predicted closest under the budget."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ..config import CompressionConfig
from ..errors import CaitsearchError
from ..models import ModelSpec
from ..profile import find_profile
from ..space import SearchSpace


def strategy_config(spec: ModelSpec, strategy: str, budget: Optional[float], config: Optional[CompressionConfig],
                    profile: Optional[Path] = None, allow_foreign: bool = False) -> CompressionConfig:
    """`config` checked against the strategy's space; else, with a `budget` (a fraction of the
    dense latency), the strategy's uniform schedule the latency profile predicts closest under it.
    Options that would be ignored are refused: a strategy with neither (it would run the dense
    model), a `profile` without a `budget` (nothing reads it)."""
    if profile is not None and budget is None:
        raise CaitsearchError(f"--profile {profile} is read only with --budget (to pick the strategy's schedule); "
                              "add --budget or drop --profile.")
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
        raise CaitsearchError(f"--strategy {strategy} needs --budget (to pick its schedule) or --config (to check "
                              "one); without either the dense model would run.")
    if not (math.isfinite(budget) and budget > 0):
        raise CaitsearchError(f"--budget must be a positive fraction of the dense latency, not {budget:g}.")
    prof = find_profile(spec, profile, allow_foreign=allow_foreign)
    return space.schedule_for(prof.predict, budget * prof.dense_ms)
