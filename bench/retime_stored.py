"""Time a profile's stored whole configs again and compare with the timings stored for them.

A profile's `e2e` rows (the configs its factors were fitted on) and the configs of its stored
validation (`validation-all.json`) were each timed in one session, relative to dense timed beside
them. This script times the same configs again now, the same way (`validate.measure_passes`:
groups beside dense, drift divided out, shuffled order), and prints per family the mean shift of
each config's latency relative to dense, now against then, with its spread. A shift shared by a
family's configs is a change in the machine between sessions, which no predictor fitted in one
session can foresee; the within-session retest of `profile validate` does not see it.

    .venv/bin/python bench/retime_stored.py hw_profiles/<profile> [--passes 1] [--json out.json]

Run it alone on the machine: anything else running changes the timings.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

from caitsearch.config import CompressionConfig, MergeAxis
from caitsearch.models import create_model
from caitsearch.profile import LatencyProfile
from caitsearch.profile.backends import make_backend
from caitsearch.profile.fingerprint import cpu_model
from caitsearch.profile.plan import FULL, QUICK, e2e_entry
from caitsearch.profile.validate import measure_passes
from caitsearch.space import SearchSpace


def fit_family(config: CompressionConfig, spec) -> str:
    """Which fit family a stored e2e config belongs to (dense counts as its own)."""
    merges = [b for b in config.blocks if b.merge_count]
    pruned = any(b.keep_qk < spec.head_dim or b.keep_v < spec.head_dim or b.keep_mlp < spec.mlp_hidden
                 for b in config.blocks)
    if any(b.merge_axis == MergeAxis.TOKENS for b in merges):
        return "fit tome"
    return {(False, False): "fit dense", (True, False): "fit merge", (False, True): "fit prune",
            (True, True): "fit joint"}[(bool(merges), pruned)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1, help="shuffles the timing order")
    ap.add_argument("--json", type=Path, help="also write every config's timings here")
    args = ap.parse_args()

    prof = LatencyProfile.load(args.profile)
    m, spec = prof.manifest, prof.spec
    e2e = prof.table[prof.table.kind == "e2e"]
    stored: list[tuple[str, CompressionConfig, float]] = []
    for text, ms in zip(e2e["config"], prof.e2e_ms()):
        cfg = CompressionConfig.from_dict(json.loads(text))
        stored.append((fit_family(cfg, spec), cfg, float(ms)))
    validation = args.profile / "validation-all.json"
    if validation.is_file():
        for d in json.loads(validation.read_text())["configs_detail"]:
            stored.append((f"validation {d['family']}", CompressionConfig.from_dict(d["config"]),
                           float(d["drift_corrected_ms"])))

    model = create_model(m["model"], img_size=m["img_size"], num_classes=m["num_classes"])
    space = SearchSpace(spec, **m["space"])
    res = QUICK if m.get("quick") else FULL
    be = make_backend(m["backend"], m["dtype"], m.get("threads"), m.get("cuda_graphs", False))
    reference_ms = prof.measured_e2e(CompressionConfig.dense(spec))
    timed = measure_passes([e2e_entry(c) for _, c, _ in stored], args.passes, args.seed, reference_ms, model, spec,
                           space, be, m["batch_size"], res, progress=True)
    now = [float(np.exp(np.mean([np.log(r["drift_corrected_ms"]) for r in by_pass]))) for by_pass in timed]

    print(f"{args.profile.name} on {cpu_model()} ({platform.machine()}), batch {m['batch_size']}, {m['dtype']}, "
          f"{args.passes} pass(es); each config relative to dense timed beside it")
    print("| configs | n | shift now/then (mean) | std | min | max | predictor error then | now |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for family in dict.fromkeys(f for f, _, _ in stored):
        idx = [i for i, (f, _, _) in enumerate(stored) if f == family]
        shift = np.array([now[i] / stored[i][2] - 1 for i in idx])
        pred = np.array([prof.predict(stored[i][1]) for i in idx])
        then_err = np.mean(pred / np.array([stored[i][2] for i in idx]) - 1)
        now_err = np.mean(pred / np.array([now[i] for i in idx]) - 1)
        print(f"| {family} | {len(idx)} | {shift.mean():+.1%} | {shift.std():.1%} | {shift.min():+.1%} | "
              f"{shift.max():+.1%} | {then_err:+.1%} | {now_err:+.1%} |")
        rows.append({"configs": family, "n": len(idx), "shift_mean": float(shift.mean()),
                     "shift_std": float(shift.std()), "error_then": float(then_err), "error_now": float(now_err)})
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "profile": str(args.profile), "families": rows,
                                         "configs": [{"family": f, "config": c.to_dict(), "then_ms": t, "now_ms": n}
                                                     for (f, c, t), n in zip(stored, now)]}, indent=1))


if __name__ == "__main__":
    main()
