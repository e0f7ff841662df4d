"""Check a profile's predictor against end-to-end measurements of random configs.

Random configs of the profile's search space (a different seed from the ones the correction was
fitted on) are materialised, timed end to end on the profile's backend in interleaved groups, and
compared with `LatencyProfile.predict`: MAPE, the share within ±5% and ±10%, and Spearman rank
correlation, plus a predicted-vs-measured scatter plot.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
from ..config import CompressionConfig
from ..console import Progress
from ..errors import CaitsearchError, reason
from ..io import atomic_write, check_output_dir, write_json
from ..models import create_model
from ..space import STRATEGIES, SearchSpace
from .backends import make_backend
from .build import measure_against_dense
from .plan import FULL, QUICK, dense_entry, e2e_entry
from .predictor import LatencyProfile


def spearman(a, b) -> float:
    """Rank correlation (Pearson on average ranks), without SciPy."""
    ra, rb = pd.Series(a).rank().to_numpy(), pd.Series(b).rank().to_numpy()
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def metrics(predicted, measured) -> dict:
    """MAPE, the shares within ±5% and ±10%, the signed mean error (positive: predicted slower
    than measured, i.e. the search overcharges such configs) and Spearman's rank correlation."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    signed = (p - m) / m
    err = np.abs(signed)
    return {"configs": len(m), "mape_pct": float(100 * err.mean()), "within_5pct": float((err <= 0.05).mean()),
            "within_10pct": float((err <= 0.10).mean()), "signed_mean_error_pct": float(100 * signed.mean()),
            "spearman": spearman(p, m), "max_error_pct": float(100 * err.max())}


def scatter_plot(path: Path, predicted, measured, title: str, groups: Optional[Sequence[str]] = None) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.4, 5.4), dpi=120)
    ax = fig.subplots()
    lo, hi = 0.9 * min(min(predicted), min(measured)), 1.1 * max(max(predicted), max(measured))
    line = np.linspace(lo, hi, 2)
    ax.fill_between(line, 0.9 * line, 1.1 * line, color="0.9", label="±10%")
    ax.fill_between(line, 0.95 * line, 1.05 * line, color="0.8", label="±5%")
    ax.plot(line, line, "k-", lw=0.8)
    groups = list(groups) if groups is not None else [""] * len(measured)
    for i, name in enumerate(dict.fromkeys(groups)):
        pick = [g == name for g in groups]
        ax.scatter(np.asarray(measured)[pick], np.asarray(predicted)[pick], s=14, color=f"C{i}", zorder=3,
                   label=name or None)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="measured ms / batch", ylabel="predicted ms / batch", title=title)
    ax.title.set_fontsize(8)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


STRATEGY_SETS = {"all": ("cait", "atme", "cdcp", "tome")}


def measure_passes(entries, passes: int, seed: int, reference_ms: float, model, spec, space, be, batch: int, res,
                   progress: bool) -> list[list[dict]]:
    """Per entry, its rows of `passes` passes, each with `drift_factor` (the profile's dense / dense
    timed beside it) and `drift_corrected_ms` (its timing times that factor). Each pass times every entry once, in groups of `res.e2e_group` in its own
    shuffled order: families drawn one after another would otherwise each be timed in one stretch
    of the machine's drift (0.77-1.03 seen over one validation on a shared 2-core CPU), and a
    config would always share a loop with the same neighbours."""
    timed: list[list[dict]] = [[] for _ in entries]
    with Progress(progress) as bar:
        task = bar.task("validate", total=len(entries) * passes)
        for p in range(passes):
            order = list(range(len(entries)))
            random.Random(f"{seed}-pass-{p}").shuffle(order)
            for i in range(0, len(order), res.e2e_group):
                group = order[i:i + res.e2e_group]
                rows = measure_against_dense([entries[j] for j in group], dense_entry(spec), model, spec, space, be,
                                             batch, res)
                factor = reference_ms / rows[0]["ref_ms"]
                for j, r in zip(group, rows):
                    timed[j].append({**r, "dense_ms": r["ref_ms"], "drift_factor": factor,
                                     "drift_corrected_ms": r["median_ms"] * factor})
                task.advance(len(group))
    return timed


def draw_configs(prof: LatencyProfile, strategy: Optional[str], configs: int,
                 seed: int) -> tuple[SearchSpace, list[tuple[str, CompressionConfig]]]:
    """The profile's own space (what the timed entries are built in) and `configs` random configs
    of each family `strategy` names, as (family, config) pairs."""
    m = prof.manifest
    grid = {k: v for k, v in m["space"].items() if k not in ("merge", "prune")}
    rng = random.Random(seed)
    drawn: list[tuple[str, CompressionConfig]] = []
    try:
        space = SearchSpace(prof.spec, **m["space"])
        for name in STRATEGY_SETS.get(strategy, (strategy,)):
            drawn_from = space if name is None else SearchSpace.for_strategy(prof.spec, name, **grid)
            drawn += [(name or drawn_from.strategy, drawn_from.random_config(rng)) for _ in range(configs)]
    except (TypeError, ValueError) as e:
        raise CaitsearchError(f"profile {prof.path} has unusable space settings ({reason(e, 120)}); build it again.") from e
    return space, drawn


def score(families: Sequence[str], predicted: Sequence[float], corrected: Sequence[float],
          timed: Sequence[Sequence[dict]]) -> dict:
    """The metrics of the predictions against the drift-corrected timings: over all configs, per
    family (when there are several), and, with two passes or more, `retest`: the first pass
    scored as a prediction of the second, per family."""
    result = metrics(predicted, corrected)
    by_family = {name: [i for i, f in enumerate(families) if f == name] for name in dict.fromkeys(families)}
    if len(by_family) > 1:
        result["families"] = {name: metrics([predicted[i] for i in idx], [corrected[i] for i in idx])
                              for name, idx in by_family.items()}
    if min(len(by_pass) for by_pass in timed) > 1:  # the measurement against itself: how repeatable one pass is
        first, second = ([by_pass[k]["drift_corrected_ms"] for by_pass in timed] for k in (0, 1))
        result["retest"] = {name: metrics([second[i] for i in idx], [first[i] for i in idx])
                            for name, idx in {"all": list(range(len(families))), **by_family}.items()}
    return result


def validate_profile(
    path: Union[str, Path],
    configs: int = 50,
    seed: int = 1,
    allow_foreign: bool = False,
    out: Optional[Union[str, Path]] = None,
    progress: bool = True,
    strategy: Optional[str] = None,
    passes: int = 2,
) -> dict:
    """Measure random configs end to end and score the profile's predictions; writes
    `validation[-<strategy>].json` and `.png` into `out` (default: the profile directory).

    Without `strategy` the configs come from the profile's own space; with one (cait, atme, cdcp,
    tome) from that strategy's space; with "all", `configs` from each of the four, reported per
    family as well as together, since a bias against one family silently steers the search.

    Every config is timed in `passes` separate groups and judged by the geometric mean of its
    drift-corrected timings; with two or more, `retest` scores the first pass against the second
    per family: how repeatable one pass's timings are on this machine."""
    if configs < 2:
        raise CaitsearchError("validation needs at least 2 configs.")
    if passes < 1:
        raise CaitsearchError("--passes must be at least 1.")
    if strategy is not None and strategy not in STRATEGY_SETS and strategy not in STRATEGIES:
        raise CaitsearchError(f"--strategy must be one of {', '.join([*STRATEGIES, *STRATEGY_SETS])}, not '{strategy}'.")
    if seed == 0:
        raise CaitsearchError("seed 0 drew the configs the correction was fitted on; pick another --seed.")
    prof = LatencyProfile.load(path, allow_foreign=allow_foreign)
    m = prof.manifest
    target = Path(out) if out else prof.path
    check_output_dir(target)  # before the measurements, which would otherwise be lost
    model = create_model(m["model"], img_size=m["img_size"], num_classes=m["num_classes"])
    prof.check_model(model)
    space, drawn = draw_configs(prof, strategy, configs, seed)
    res = QUICK if m.get("quick") else FULL
    be = make_backend(m["backend"], m["dtype"], m.get("threads"), m.get("cuda_graphs", False))
    entries = [e2e_entry(c) for _, c in drawn]
    # a config is judged by its latency relative to dense measured beside it (the shared machine
    # drifts by several percent over minutes), scaled to the profile's own dense latency
    reference_ms = prof.measured_e2e(CompressionConfig.dense(prof.spec))

    timed = measure_passes(entries, passes, seed, reference_ms, model, prof.spec, space, be, m["batch_size"], res,
                           progress)
    families = [name for name, _ in drawn]
    measured = [float(np.mean([r["median_ms"] for r in by_pass])) for by_pass in timed]
    corrected = [float(np.exp(np.mean([np.log(r["drift_corrected_ms"]) for r in by_pass]))) for by_pass in timed]
    drift = [r["drift_factor"] for by_pass in timed for r in by_pass]
    predicted = [prof.predict(c) for _, c in drawn]
    result = {**score(families, predicted, corrected, timed), "absolute": metrics(predicted, measured),
              "dense_reference_ms": reference_ms, "drift_factor_range": [min(drift), max(drift)],
              "profile": str(prof.path), "model": m["model"], "backend": m["backend"],
              "batch_size": m["batch_size"], "dtype": m["dtype"], "seed": seed, "passes": passes,
              "factors": prof.summary()["factors"]}
    per_config = [{"family": f, "predicted_ms": p, "measured_ms": raw, "drift_corrected_ms": c_ms,
                   "passes": [{"measured_ms": q["median_ms"], "dense_ms": q["dense_ms"], "p90_ms": q["p90_ms"],
                               "spread": q["spread"], "drift_corrected_ms": q["drift_corrected_ms"]}
                              for q in by_pass], "config": c.to_dict()}
                  for f, p, raw, c_ms, by_pass, (_, c) in zip(families, predicted, measured, corrected, timed, drawn)]
    name = "validation" if strategy is None else f"validation-{strategy}"
    result["strategy"] = strategy
    result["plot"] = str(target / f"{name}.png")
    write_json(target / f"{name}.json", {**result, "configs_detail": per_config})
    a = result["absolute"]
    title = (f"{m['model']} {m['backend']} b{m['batch_size']} {m['dtype']}{'' if strategy is None else ' ' + strategy}\n"
             f"vs dense in the same run: MAPE {result['mape_pct']:.1f}%, ±5% {result['within_5pct']:.0%}, "
             f"±10% {result['within_10pct']:.0%}, ρ {result['spearman']:.3f}\n"
             f"absolute ms: MAPE {a['mape_pct']:.1f}%, ±5% {a['within_5pct']:.0%}, ±10% {a['within_10pct']:.0%}")
    scatter_plot(target / f"{name}.png", predicted, corrected, title, families if len(set(families)) > 1 else None)
    return result
