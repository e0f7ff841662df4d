"""Re-score a profile's stored validation with predictor variants, without measuring anything.

`caitsearch profile validate P --strategy all` stores every config it timed (drift-corrected
milliseconds) in P/validation-all.json. This script predicts those same configs again with the
shipped predictor, with its attention smoothing switched off, and with one factor per part kind
instead of separate full-token and merged-token factors (`OneFactorPerKind`, the predictor before
the split), and prints the per-family metrics of each. The measurements were taken once, so this
compares predictors on equal data (and, below the table, how the shipped predictor's error varies
with each config's speed);
a variant chosen by looking at these numbers must then be validated on fresh configs
(`profile validate --seed N`) before its figures are claimed.

    .venv/bin/python bench/rescore_validation.py hw_profiles/<profile> [hw_profiles/<profile> ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from caitsearch.config import CompressionConfig
from caitsearch.profile import LatencyProfile
from caitsearch.profile.validate import metrics


def family_metrics(prof: LatencyProfile, details: list[dict]) -> dict:
    families: dict[str, tuple[list, list]] = {}
    for d in details:
        predicted, measured = families.setdefault(d["family"], ([], []))
        predicted.append(prof.predict(CompressionConfig.from_dict(d["config"])))
        measured.append(d["drift_corrected_ms"])
    return {name: metrics(p, m) for name, (p, m) in families.items()}


class OneFactorPerKind(LatencyProfile):
    """The predictor before full-token and merged-token parts were split: one factor each for the
    stem, attention, MLP, merge and head (5 parts instead of `predictor.PARTS`' 7)."""

    def part_sums(self, config: CompressionConfig) -> np.ndarray:
        stem, attn_full, attn_merged, mlp_full, mlp_merged, merge, head = super().part_sums(config)
        return np.array([stem, attn_full + attn_merged, mlp_full + mlp_merged, merge, head])


class RawAttention(LatencyProfile):
    """The predictor before `smooth_attention`: every attention timing as measured."""

    smooth_min_widths = float("inf")


def error_by_speed(prof: LatencyProfile, details: list[dict]) -> list[str]:
    """The shipped predictor's error against each config's speed (measured latency / the profile's
    dense): per family its Pearson correlation and range, and the fit's own whole configs without a
    merge (the pure-pruning rows the factors were fitted on), one line each."""
    dense = prof.measured_e2e(CompressionConfig.dense(prof.spec))
    lines, families = [], {}
    for d in details:
        err, rel = families.setdefault(d["family"], ([], []))
        err.append(prof.predict(CompressionConfig.from_dict(d["config"])) / d["drift_corrected_ms"] - 1)
        rel.append(d["drift_corrected_ms"] / dense)
    for family, (err, rel) in families.items():
        lines.append(f"{family}: error vs speed r = {np.corrcoef(err, rel)[0, 1]:+.2f}; configs {min(rel):.2f}x-"
                     f"{max(rel):.2f}x of dense (relative std {np.std(rel) / np.mean(rel):.1%}); error {min(err):+.1%} to {max(err):+.1%}, mean {np.mean(err):+.1%}")
    e2e = prof.table[prof.table.kind == "e2e"]
    fit = []
    for text, ms in zip(e2e["config"], prof.e2e_ms()):
        cfg = CompressionConfig.from_dict(json.loads(text))
        if not any(b.merge_count for b in cfg.blocks):
            fit.append((ms / dense, prof.predict(cfg) / ms - 1))
    lines.append(f"fit's whole configs without a merge ({len(fit)}): mean error {np.mean([e for _, e in fit]):+.1%}; "
                 + ", ".join(f"{r:.2f}x {e:+.1%}" for r, e in sorted(fit)))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profiles", type=Path, nargs="+")
    args = ap.parse_args()
    print("| profile | seed | predictor | family | MAPE | within ±5% | within ±10% | signed mean | Spearman |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for path in args.profiles:
        stored = json.loads((path / "validation-all.json").read_text())
        variants = (("raw attention", RawAttention.load(path)), ("one factor per kind", OneFactorPerKind.load(path)),
                    ("shipped (full/merged-token factors)", LatencyProfile.load(path)))
        for name, prof in variants:
            for family, r in family_metrics(prof, stored["configs_detail"]).items():
                print(f"| {path.name} | {stored['seed']} | {name} | {family} | {r['mape_pct']:.1f}% | "
                      f"{r['within_5pct']:.0%} | {r['within_10pct']:.0%} | {r['signed_mean_error_pct']:+.1f}% | "
                      f"{r['spearman']:.3f} |")
    for path in args.profiles:
        stored = json.loads((path / "validation-all.json").read_text())
        print(f"\n{path.name}, seed {stored['seed']}, shipped predictor:")
        for line in error_by_speed(LatencyProfile.load(path), stored["configs_detail"]):
            print(f"- {line}")


if __name__ == "__main__":
    main()
