"""Report figures, drawn with matplotlib's object API (no pyplot state, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..config import CompressionConfig
from ..io import atomic_write
from ..models import ModelSpec
from ..segment import IGNORE_INDEX
from .load import Run, pareto_mask

DPI = 110


def save(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
    return Path(path)


def _front(ax, cost: pd.Series, value: pd.Series, **style) -> None:
    """Draw the Pareto front of (cost low, value high) points as a step line."""
    if cost.empty:
        return
    front = pd.DataFrame({"c": cost, "v": value})[pareto_mask(cost, value)].sort_values("c")
    ax.step(front["c"], front["v"], where="post", **style)


def _dense_scale(cands: pd.DataFrame, dense: Optional[dict]) -> pd.Series:
    """Candidates' latencies on the dense marker's scale: re-measurement runs in rounds, each timing
    dense in its own loop, so a candidate is placed at its same-loop ratio (what the budget judged)
    times the dense latency drawn, not at its raw milliseconds from another state of the machine."""
    if not dense or "speedup" not in cands:
        return cands["latency_ms"]
    return (dense["latency_ms"] / cands["speedup"]).where(cands["speedup"].notna(), cands["latency_ms"])


def tradeoff_figure(run: Run) -> Figure:
    """Top: test accuracy vs measured latency (candidates, dense, budget, front, the one to deploy).
    Bottom: every search trial's proxy vs predicted latency (uniform baselines marked)."""
    fig = Figure(figsize=(9, 8.5))
    top, bottom = fig.subplots(2, 1, height_ratios=[1.15, 1])
    budget, dense = run.budget or {}, run.dense
    metric, short = run.metric_label, ("acc" if run.metric_label == "accuracy" else run.metric_label)
    unit = f"ms per batch of {run.environment().get('batch_size', '?')}"

    # -- measured candidates ------------------------------------------------------------------
    cands = pd.DataFrame(run.candidates)
    if not cands.empty:
        cands["x"] = _dense_scale(cands, dense)
    if dense:
        top.scatter([dense["latency_ms"]], [dense["accuracy"]], marker="*", s=260, color="black", zorder=4,
                    label=f"dense ({dense['accuracy']:.1%}, {dense['latency_ms']:.3g} ms)")
        if budget.get("ratio"):
            limit = budget["ratio"] * dense["latency_ms"]
            top.axvline(limit, color="tab:red", ls="--", lw=1.5, label=f"budget {budget['ratio']:.2f}x dense = {limit:.3g} ms")
            top.axvspan(limit, max(limit, dense["latency_ms"]) * 1.08, color="tab:red", alpha=0.06)
    if not cands.empty:
        for retrained, style in ((True, dict(color="tab:green", label="candidate, retrained")),
                                 (False, dict(facecolors="none", edgecolors="tab:green", label="candidate, not retrained"))):
            part = cands[cands["retrained"] == retrained]
            if not part.empty:
                top.scatter(part["x"], part["accuracy"], s=70, zorder=3, **style)
        pts = cands[["x", "accuracy"]]
        if dense:
            pts = pd.concat([pts, pd.DataFrame([{"x": dense["latency_ms"], "accuracy": dense["accuracy"]}])],
                            ignore_index=True)
        _front(top, pts["x"], pts["accuracy"], color="tab:green", alpha=0.5, lw=1, label="Pareto front")
        for _, c in cands.iterrows():
            top.annotate(f"#{c['trial']}", (c["x"], c["accuracy"]), xytext=(4, -12),
                         textcoords="offset points", fontsize=8, color="dimgray")
    rec = run.recommended
    if rec:
        rec_x = float(_dense_scale(pd.DataFrame([rec]), dense).iloc[0])
        top.scatter([rec_x], [rec["accuracy"]], s=380, facecolors="none", edgecolors="tab:blue", lw=2.5,
                    zorder=5)
        top.autoscale_view()
        x, y = top.transAxes.inverted().transform(top.transData.transform((rec_x, rec["accuracy"])))
        chosen = f"best validation {metric}" if run.chosen_on_validation else "best test accuracy (older run)"
        top.annotate(f"DEPLOY trial {rec['trial']}\n{rec['accuracy']:.1%} test {short}, {rec['speedup']:.2f}x faster than dense\n"
                     f"({chosen} within budget)", (rec_x, rec["accuracy"]),
                     xytext=(0.55 if x < 0.5 else 0.04, 0.45 if y > 0.5 else 0.8), textcoords="axes fraction",
                     va="center", fontsize=10, fontweight="bold", color="tab:blue",
                     arrowprops=dict(arrowstyle="->", color="tab:blue", lw=1.5),
                     bbox=dict(boxstyle="round", fc="white", ec="tab:blue"))
    else:
        top.text(0.5, 0.5, "no candidate measured within budget:\nnothing to deploy", transform=top.transAxes,
                 ha="center", va="center", fontsize=13, color="tab:red")
    scale = f", each as its ratio to dense timed in the same loop x dense's {dense['latency_ms']:.3g} ms" if dense else ""
    top.set(xlabel=f"measured latency ({unit}{scale})", ylabel=f"test {metric}",
            title=f"{run.name}: {run.model or 'model ?'} — {metric} vs measured latency")
    top.grid(alpha=0.3)
    top.legend(loc="best", fontsize=8)

    # -- search trials ---------------------------------------------------------------------------
    trials = run.trials[run.trials["state"] == "COMPLETE"].dropna(subset=["agreement", "predicted_ms"]) \
        if not run.trials.empty else run.trials
    if not trials.empty:
        feasible = trials["feasible"].astype(bool)
        warm = trials["warm_start"].astype(bool)
        bottom.scatter(trials[feasible & ~warm]["predicted_ms"], trials[feasible & ~warm]["agreement"], s=22,
                       color="tab:blue", alpha=0.7, label="trial within budget")
        bottom.scatter(trials[~feasible & ~warm]["predicted_ms"], trials[~feasible & ~warm]["agreement"], s=22,
                       marker="x", color="gray", label="trial over budget (not scored)")
        bottom.scatter(trials[warm]["predicted_ms"], trials[warm]["agreement"], s=60, marker="s",
                       facecolors="none", edgecolors="tab:orange", lw=1.5, label="uniform baseline (warm start)")
        _front(bottom, trials[feasible]["predicted_ms"], trials[feasible]["agreement"], color="tab:blue", alpha=0.5,
               lw=1, label="Pareto front (proxy)")
    if dense and dense.get("predicted_latency_ms"):
        bottom.scatter([dense["predicted_latency_ms"]], [1.0], marker="*", s=200, color="black", label="dense")
    if budget.get("ms"):
        bottom.axvline(budget["ms"], color="tab:red", ls="--", lw=1.5, label=f"budget {budget['ms']:.3g} ms")
    if trials.empty:
        bottom.text(0.5, 0.5, "no finished trials", transform=bottom.transAxes, ha="center", va="center")
    agree = "top-1" if run.task == "classification" else "per-pixel"
    bottom.set(xlabel=f"predicted latency from the profile ({unit})", ylabel=f"proxy: {agree} agreement with dense",
               title=f"search: {len(trials)} scored trials (accuracy proxy, no retraining)")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def schedule_figure(spec: ModelSpec, config: CompressionConfig, title: str) -> Figure:
    """Tokens entering each block, and the kept qk/v/MLP widths as fractions of the full widths."""
    shapes = config.shapes(spec)
    blocks = list(range(len(config.blocks)))
    fig = Figure(figsize=(7, 4.6))
    tokens, widths = fig.subplots(2, 1, sharex=True)
    tokens.bar(blocks, [s.tokens_in for s in shapes], color="tab:purple", alpha=0.75, label="tokens in")
    tokens.axhline(spec.num_tokens, color="black", ls=":", lw=1, label=f"dense {spec.num_tokens}")
    for i, s in zip(blocks, shapes):
        tokens.annotate(f"{s.h_in}x{s.w_in}", (i, s.tokens_in), ha="center", va="bottom", fontsize=7)
    tokens.set(ylabel="tokens", title=title)
    tokens.legend(fontsize=7, loc="lower left")
    tokens.set_ylim(0, spec.num_tokens * 1.15)
    # different markers and sizes, so equal widths stay visible on top of each other
    for key, full, color, marker, size in (("keep_qk", spec.head_dim, "tab:blue", "o", 10),
                                           ("keep_v", spec.head_dim, "tab:orange", "s", 7),
                                           ("keep_mlp", spec.mlp_hidden, "tab:green", "^", 5)):
        widths.plot(blocks, [getattr(b, key) / full for b in config.blocks], marker=marker, ms=size, color=color,
                    label=f"{key[5:]} (of {full})")
    widths.set(xlabel="block", ylabel="width kept", ylim=(0, 1.08), xticks=blocks)
    widths.grid(alpha=0.3)
    widths.legend(fontsize=7, loc="lower left", ncols=3)
    fig.tight_layout()
    return fig


def compare_figure(runs: Sequence[Run]) -> Figure:
    """Accuracy vs speedup over each run's own dense model, so runs on different devices compare."""
    fig = Figure(figsize=(8, 5.5))
    ax = fig.subplots()
    colors = [f"C{i}" for i in range(10)]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        env = run.environment()
        budget = run.budget or {}
        label = f"{run.name} ({env.get('device', '?')}, batch {env.get('batch_size', '?')}, " \
                f"budget {budget.get('ratio') or float('nan'):.2f}x, {env.get('sampler', '?')})"
        cands = pd.DataFrame(run.candidates)
        if not cands.empty:
            ax.scatter(cands["speedup"], cands["accuracy"], color=color, s=45, label=label)
        else:
            ax.scatter([], [], color=color, label=label + ": no candidate within budget")
        if run.dense:
            ax.scatter([1.0], [run.dense["accuracy"]], marker="*", s=180, color=color)
        if budget.get("ratio"):
            ax.axvline(1 / budget["ratio"], color=color, ls="--", lw=1)
        if run.recommended:
            r = run.recommended
            ax.scatter([r["speedup"]], [r["accuracy"]], s=260, facecolors="none", edgecolors=color, lw=2)
            ax.annotate(f"trial {r['trial']}: {r['accuracy']:.1%}, {r['speedup']:.2f}x", (r["speedup"], r["accuracy"]),
                        xytext=(6, 6), textcoords="offset points", fontsize=8, color=color)
    metrics = {run.metric_label for run in runs}
    ax.set(xlabel="speedup over the run's dense model (measured; dashed: budget)",
           ylabel="test " + (metrics.pop() if len(metrics) == 1 else "score (accuracy or mIoU)"),
           title="runs compared (star: dense, ring: recommended)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def ranking_figure(run: Run) -> Optional[Figure]:
    """Each finalist's validation accuracy through the fidelities: short fine-tune rungs, then
    (for the retrained ones) the full retraining; a line that stops was halved out there."""
    ranking = run.ranking
    if ranking.empty:
        return None
    rungs = sorted((int(c.removeprefix("val_at_")), c) for c in ranking.columns if c.startswith("val_at_"))
    final = {c["trial"]: c.get("val_accuracy") for c in run.candidates if c.get("retrained")}
    labels = [f"{steps} steps" for steps, _ in rungs] + ["full retraining"]
    fig = Figure(figsize=(8, 4.8))
    ax = fig.subplots()
    markers = {"prune": "^", "merge": "s", "joint": "o"}
    for i, row in ranking.iterrows():
        ys = [row[col] for _, col in rungs] + [final.get(row["trial"])]
        xs = [x for x, y in enumerate(ys) if y is not None and y == y]
        ys = [y for y in ys if y is not None and y == y]
        ax.plot(xs, ys, marker=markers.get(row.get("family"), "o"), color=f"C{i % 10}",
                label=f"trial {row['trial']} ({row.get('family')})")
    ax.set(xticks=range(len(labels)), xticklabels=labels, ylabel=f"validation {run.metric_label}",
           title="finalists through the fidelities (a line stops where halving dropped it)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def figures_for(run: Run, out: Path) -> dict[str, Path]:
    """Write the trade-off plot, the ranking plot and one schedule picture per candidate; returns name -> PNG path."""
    paths = {"tradeoff": save(tradeoff_figure(run), out / "tradeoff.png")}
    ranking = ranking_figure(run)
    if ranking is not None:
        paths["ranking"] = save(ranking, out / "ranking.png")
    spec: Optional[ModelSpec] = run.spec
    for c in run.candidates:
        cfg = CompressionConfig.from_dict(c["config"])
        short = "acc" if run.metric_label == "accuracy" else run.metric_label
        title = f"trial {c['trial']}: {c['accuracy']:.1%} test {short}, {c['latency_ms']:.3g} ms, {c['speedup']:.2f}x"
        paths[f"schedule-trial-{c['trial']}"] = save(schedule_figure(spec, cfg, title), out / f"schedule-trial-{c['trial']}.png")
    if run.task == "segmentation" and run.recommended:
        from .masks import predicted_masks

        shown = predicted_masks(run)
        if shown is not None:
            paths["masks"] = save(masks_figure(*shown), out / "masks.png")
    return paths


def masks_figure(images, truth, dense, compressed, titles: Sequence[str]) -> Figure:
    """Rows: input image, true mask, the dense model's predicted mask, the compressed one's, for
    a few test images `(N, C, H, W)` with label maps `(N, H, W)`; one colour per class."""
    n = len(images)
    fig = Figure(figsize=(1.6 * n + 1.2, 7.2))
    axes = fig.subplots(4, n, squeeze=False)
    truth = np.ma.masked_equal(np.asarray(truth), IGNORE_INDEX)  # unlabelled pixels stay blank
    dense, compressed = np.asarray(dense), np.asarray(compressed)
    top = int(max(truth.max() if truth.count() else 0, dense.max(), compressed.max()))
    rows = [("image", images), ("true mask", truth), (titles[0], dense), (titles[1], compressed)]
    for r, (label, data) in enumerate(rows):
        for i in range(n):
            ax = axes[r][i]
            if r == 0:
                picture = data[i].permute(1, 2, 0).float()
                picture = (picture - picture.min()) / (picture.max() - picture.min() + 1e-8)
                ax.imshow(picture.squeeze(-1).numpy() if picture.shape[-1] == 1 else picture.numpy(), cmap="gray")
            else:
                ax.imshow(data[i], cmap="tab20", vmin=0, vmax=max(top, 19), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle("predicted masks on test images: dense vs the deployed compressed model", fontsize=10)
    fig.tight_layout()
    return fig
