"""Write BENCHMARKS.md from measured data only: bench/results/*.json and hw_profiles/*/.

    .venv/bin/python bench/core_bench.py                                  # -> bench/results/core.json
    .venv/bin/caitsearch profile --model M --batch-size 32 --threads 2    # -> hw_profiles/<profile>/
    .venv/bin/caitsearch profile validate hw_profiles/<profile> --configs 50
    .venv/bin/python bench/write_benchmarks.py                            # -> BENCHMARKS.md

Goal checks are computed from the numbers, never typed by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def check(ok: bool) -> str:
    return "met" if ok else "**missed**"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def core_section(core: dict) -> list[str]:
    meta = core["meta"]
    out = ["## Core: the compressed path, merge cost, speedup of half-MAC configs",
           "",
           f"`.venv/bin/python bench/core_bench.py` on {meta['cpu']}, {meta['threads']} threads, torch "
           f"{meta['torch']}, fp32, random weights (latency does not depend on them). Medians of interleaved "
           "repeats; every ratio is against the dense timm model timed in the same loop.", ""]
    over = core.get("overhead", [])
    if over:
        worst = max(r["ratio"] for r in over)
        out += ["**Compressed path with nothing compressed vs stock timm** (own A/B loop; goal: within 3%, "
                f"{check(worst <= 1.03)}: worst {worst:.3f}x)", ""]
        out += md_table(["model", "batch", "stock timm ms", "caitsearch ms", "ratio"],
                        [[r["model"], str(r["batch"]), f"{r['timm_ms']:.2f}", f"{r['caitsearch_ms']:.2f}", f"{r['ratio']:.3f}"]
                         for r in over]) + [""]
    merges = core.get("merge_cost", [])
    if merges:
        worst = max(r["share"] for r in merges)
        out += [f"**One ATME merge step against the block it sits in** (goal: at most 5%, {check(worst <= 0.05)}: "
                f"worst {worst:.1%})", ""]
        out += md_table(["model", "batch", "merge", "block ms", "merge ms", "share"],
                        [[r["model"], str(r["batch"]), r["case"], f"{r['block_ms']:.2f}", f"{r['merge_ms']:.3f}", f"{r['share']:.1%}"]
                         for r in merges]) + [""]
    e2e = core.get("end_to_end", [])
    if e2e:
        s32 = [r for r in e2e if r["model"].startswith("deit_small") and r["batch"] == 32 and r["variant"].startswith("cait")]
        goal = ""
        if s32:
            r = s32[0]
            goal = (f" (goal for DeiT-Small, batch 32, about half the MACs: at least 1.8x and at least 0.9 of the MAC "
                    f"reduction realised, {check(r['speedup'] >= 1.8 and r['realised'] >= 0.9)}: "
                    f"{r['speedup']:.2f}x at {r['mac_ratio']:.3f}x MACs, {r['realised']:.2f} realised)")
        out += [f"**End to end, materialised compressed models vs dense**{goal}. Configs are `CompressionConfig.uniform` "
                "schedules (see `CONFIGS` in the script). 'Realised' is speedup x MAC ratio: 1.0 means the "
                "wall-clock gain equals the MAC reduction.", ""]
        out += md_table(["model", "batch", "variant", "median ms", "MACs vs dense", "speedup", "realised"],
                        [[r["model"], str(r["batch"]), r["variant"], f"{r['median_ms']:.2f}", f"{r['mac_ratio']:.3f}",
                          f"{r['speedup']:.2f}x", f"{r['realised']:.2f}"] for r in e2e]) + [""]
    return out


def profile_section(folders: list[Path]) -> list[str]:
    out = ["## Latency profiles and the predictor",
           "",
           "`caitsearch profile` then `caitsearch profile validate PROFILE --configs 50` (50 random configs of the "
           "search space, each measured end to end against its prediction; a profile validated with `--strategy all` "
           "shows its 160 configs of every family together here, and each family in the table below). Goals on this CPU kind, batch 32: at least "
           "90% within ±10%, at least 70% within ±5%, Spearman at least 0.95; a full DeiT-Small profile within 15 minutes. "
           "Validation times the dense model beside every group of configs; the main columns judge each config's latency "
           "relative to that dense measurement (scaled to the profile's dense latency), which removes the machine's drift "
           "between profiling and validation (the drift column: profile's dense / dense measured during validation). "
           "The absolute columns compare raw milliseconds; the goal check uses the relative ones.",
           "", "| profile | rows | build min | MAPE | within ±5% | within ±10% | Spearman | worst | absolute ±5% / ±10% / Spearman | drift | goals |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    extra: list[str] = []
    for folder in folders:
        manifest = json.loads((folder / "manifest.json").read_text())
        # the search space's own validation, else every family's configs together (`--strategy all`)
        val_path = next((folder / f for f in ("validation.json", "validation-all.json") if (folder / f).exists()), None)
        minutes = manifest.get("build_seconds", float("nan")) / 60
        if val_path is None:
            out.append(f"| {folder.name} | {manifest['rows']} | {minutes:.1f} | not validated | | | | | |")
            continue
        for strategy_val in sorted(folder.glob("validation-*.json")):
            if strategy_val.name == "validation-all.json":
                continue
            w = json.loads(strategy_val.read_text())
            extra.append(f"- `{folder.name}`, {w['configs']} random `{w['strategy']}` configs "
                         f"(`caitsearch profile validate ... --strategy {w['strategy']}`): MAPE {w['mape_pct']:.1f}%, "
                         f"{w['within_5pct']:.0%} within ±5%, {w['within_10pct']:.0%} within ±10%, Spearman {w['spearman']:.3f}.")
        v = json.loads(val_path.read_text())
        a = v["absolute"]
        ok = v["within_10pct"] >= 0.9 and v["within_5pct"] >= 0.7 and v["spearman"] >= 0.95
        verdict = check(ok)
        if manifest["model"].startswith("deit_small") and minutes > 15:  # an earlier issue's build-time goal
            verdict = f"**missed** (build {minutes:.0f} min > 15)" if ok else f"{verdict}, build {minutes:.0f} min > 15"
        out.append(f"| [{folder.name}](hw_profiles/{folder.name}/{val_path.stem}.png) | {manifest['rows']} | {minutes:.1f} | "
                   f"{v['mape_pct']:.1f}% | {v['within_5pct']:.0%} | {v['within_10pct']:.0%} | {v['spearman']:.3f} | "
                   f"{v['max_error_pct']:.1f}% | {a['within_5pct']:.0%} / {a['within_10pct']:.0%} / {a['spearman']:.3f} | "
                   f"{v['drift_factor_range'][0]:.2f}-{v['drift_factor_range'][1]:.2f} | {verdict} |")
    out += family_table(folders)
    cpu = {(lambda fp: fp.get("gpu") or fp.get("cpu", "?"))(json.loads((f / "manifest.json").read_text())["fingerprint"])
           for f in folders}
    if extra:
        out += ["", "The same predictor on configs of other strategies (ToMe's merge is profiled in every table):", ""] + extra
    out += ["", f"Device: {', '.join(sorted(cpu))}. Each profile folder holds its manifest (fingerprint, versions, "
            "threads, batch, dtype, date), the table (Parquet and CSV) and the validation plot.", ""]
    return out


def family_goals(r: dict) -> bool:
    """Issue 12's goals for one family: 90% within ±10%, 70% within ±5%, |signed mean| <= 3%, Spearman >= 0.95, 40+ configs."""
    return (r["within_10pct"] >= 0.9 and r["within_5pct"] >= 0.7 and abs(r["signed_mean_error_pct"]) <= 3
            and r["spearman"] >= 0.95 and r["configs"] >= 40)


def family_table(folders: list[Path]) -> list[str]:
    """`profile validate --strategy all`: the predictor judged per family, since a bias against one
    family silently steers the search (pruning was charged ~20% more than merging before)."""
    rows = []
    for folder in folders:
        path = folder / "validation-all.json"
        if not path.exists():
            continue
        v = json.loads(path.read_text())
        fp = json.loads((folder / "manifest.json").read_text())["fingerprint"]
        cpu = fp.get("gpu") or fp.get("cpu", "?")
        retest = v.get("retest", {})
        for name, r in v.get("families", {}).items():
            floor = f"{retest[name]['within_5pct']:.0%} / {retest[name]['spearman']:.3f}" if name in retest else "-"
            rows.append([f"[{folder.name}](hw_profiles/{folder.name}/validation-all.png)", cpu, f"{v['seed']}",
                         f"{v.get('passes', 1)}", name, str(r["configs"]),
                         f"{r['mape_pct']:.1f}%", f"{r['within_5pct']:.0%}", f"{r['within_10pct']:.0%}",
                         f"{r['signed_mean_error_pct']:+.1f}%", f"{r['spearman']:.3f}", floor, check(family_goals(r))])
    if not rows:
        return []
    return (["", "Per family (`caitsearch profile validate PROFILE --strategy all --configs 40`: 40 random configs of each "
             "strategy's space; goals: at least 90% within ±10%, at least 70% within ±5%, |signed mean error| at most 3%, "
             "Spearman at least 0.95). Each config is measured in `passes` separately shuffled groups and judged by the "
             "geometric mean; the retest column scores the first pass as a prediction of the second (within ±5% / "
             "Spearman): how repeatable one pass's timings are on this machine (the judged value averages the passes, so a "
             "good predictor can score above it). A profile without a row here was "
             "not validated per family.", ""]
            + md_table(["profile", "CPU", "seed", "passes", "family", "configs", "MAPE", "within ±5%", "within ±10%",
                        "signed mean", "Spearman", "retest ±5% / Spearman", "goals"], rows))


def search_section(summary: dict, folder: str, command: list[str], epochs: int) -> list[str]:
    def pct(value) -> str:
        return "-" if value is None else f"{value:.2%}"

    d = summary["dense"]
    rows = [["dense", "", pct(d.get("val_accuracy")), pct(d["accuracy"]), f"{d['latency_ms']:.1f}", "1.00x", ""]]
    rows += [[("DEPLOY " if i == 0 else "") + f"trial {c['trial']}", c.get("family", ""), pct(c.get("val_accuracy")),
              pct(c["accuracy"]), f"{c['latency_ms']:.1f}", f"{c['speedup']:.2f}x", "yes" if c.get("retrained") else "no"]
             for i, c in enumerate(summary["candidates"])]
    best = summary["candidates"][0] if summary["candidates"] else None
    if best:
        # against the dense model of its own re-measurement round (the summary's dense is the first round's)
        ratio, delta = 1 / best["speedup"], 100 * (best["accuracy"] - d["accuracy"])
        ok = ratio <= summary["budget"]["ratio"] and delta >= -0.5
        head = (f"Deployed (chosen on validation): {delta:+.2f} points of test accuracy against dense at {ratio:.2f}x "
                f"its measured latency (goal: within the budget and within 0.5 points of dense, {check(ok)}).")
    else:
        head = "No candidate within budget."
    for plan in summary.get("final_retraining", []):
        if plan.get("limited_by"):
            head += (f" Trial {plan['trial']} was retrained for {plan['steps']} of {plan['full_steps']} steps to fit "
                     f"{plan['limited_by']} ({plan['step_seconds']:.2f} s per step).")
    if summary.get("wall_seconds"):
        head += f" Wall time {summary['wall_seconds'] / 60:.1f} min."
    shown = [a for a in command[1:] if a not in ("--no-progress", "--json")]  # output flags change no result
    args = " ".join(shown)
    main_job = shown == ["search", "--budget", f"{summary['budget']['ratio']:g}"]
    title = f"budget {summary['budget']['ratio']:g}x dense, {epochs} retraining epochs"
    return [f"## Search on the embedded default: {title}", "",
            ("README's main job, " if main_job else "") + f"`bash scripts/setup.sh && .venv/bin/caitsearch {args}`, "
            f"batch {summary['batch_size']} on {summary['device']}; latency measured against dense in the same loop, "
            f"accuracy on the Fashion-MNIST validation (choice) and test (report) splits. "
            f"Report: [{folder}/report.md]({folder}/report.md). {head}", ""] + md_table(
        ["model", "family", "val accuracy", "test accuracy", "measured ms", "speedup", "retrained"], rows) + [""]


def strategies_section(result: dict) -> list[str]:
    """Strategy comparison: accuracy at equal measured latency, and latency on DeiT-T/S/B."""
    out = ["## Strategies side by side: cait vs atme, cdcp and ToMe", ""]
    acc = [r for r in result.get("accuracy", []) if r["accuracy"] is not None]
    failed = [r for r in result.get("accuracy", []) if r["accuracy"] is None]
    meta = result.get("meta", {})
    if acc or failed:
        m = meta.get("accuracy", meta)
        # rows accumulate over invocations (one budget or strategy at a time fits a sitting): name the last one
        out += ["`.venv/bin/python bench/strategies_bench.py --only accuracy [--budgets B ...] [--strategies S ...]` "
                f"(the last invocation: `{m['command']}`) on {m.get('cpu', 'an unrecorded CPU')}, {m['threads']} threads: "
                f"`caitsearch search --strategy S --budget B {' '.join(m['recipe'])}` on the embedded default model. One "
                "recipe for every strategy: the search's defaults (trials sized to each space, 8 finalists ranked by short "
                "fine-tunes on the validation split), the candidate chosen on validation retrained in full (no --minutes "
                "cut). Test accuracy on the full Fashion-MNIST test split, reported, never used to choose; latency "
                "re-measured against dense in the same loop, batch 32. Plot: "
                "[bench/results/strategies.png](bench/results/strategies.png).", ""]
        by = {(r["strategy"], r["budget"]): r for r in acc}
        budgets = sorted({r["budget"] for r in acc + failed}, reverse=True)
        rows = []
        for b in budgets:
            for s in ("cait", "atme", "cdcp", "tome"):
                r = by.get((s, b))
                if r:
                    val = f"{r['val_accuracy']:.2%}" if r.get("val_accuracy") is not None else ""
                    searched = ", ".join(f"{f} {n['within_budget']}/{n['trials']}"
                                         for f, n in sorted(r.get("trials_by_family", {}).items()))
                    rows.append([f"{b:g}", s, r.get("family") or "", val, f"{r['accuracy']:.2%}", f"{r['delta_points']:+.2f}",
                                 f"{r['latency_ratio']:.2f}x", f"{r['speedup']:.2f}x", f"{r.get('wall_minutes', float('nan')):.1f}",
                                 searched])
            rows += [[f"{r['budget']:g}", r["strategy"], "", "", "none", "", "", "", "", r.get("error", "")]
                     for r in failed if r["budget"] == b]
        out += md_table(["budget", "strategy", "deployed family", "val accuracy", "test accuracy", "vs dense (points)",
                         "latency vs dense", "speedup", "wall min", "trials within budget / run, per family"], rows)
        if acc:
            out += ["", f"Dense: {acc[0]['dense_accuracy']:.2%} test.", ""]
        goals = []
        for b in budgets:
            c = by.get(("cait", b))
            others = [by[(s, b)] for s in ("atme", "cdcp", "tome") if (s, b) in by]
            if c and others:
                best = max(others, key=lambda r: r["accuracy"])
                ok = c["accuracy"] >= best["accuracy"] and c["latency_ratio"] <= best["latency_ratio"]
                goals.append(f"- budget {b:g}: cait {c['accuracy']:.2%} at {c['latency_ratio']:.2f}x vs the best other, "
                             f"{best['strategy']} {best['accuracy']:.2%} at {best['latency_ratio']:.2f}x (goal: at least as "
                             f"accurate at equal or lower latency): {check(ok)}")
        c = by.get(("cait", 0.5))
        if c:
            goals.append(f"- budget 0.5: cait {c['speedup']:.2f}x measured (goal >= 2.0x, {check(c['speedup'] >= 2.0)}), "
                         f"{c['delta_points']:+.2f} points vs dense (goal within 0.5, {check(c['delta_points'] >= -0.5)}; "
                         f"stretch: >= 2.5x within 1.0, {check(c['speedup'] >= 2.5 and c['delta_points'] >= -1.0)})")
        missing = [f"{s}@{b:g}" for b in (0.7, 0.6, 0.5) for s in ("cait", "atme", "cdcp", "tome")
                   if (s, b) not in by and not any(r["strategy"] == s and r["budget"] == b for r in failed)]
        if missing:
            goals.append(f"- not run yet: {', '.join(missing)}")
        out += ["Goals:", ""] + goals + [""]
    rank = result.get("ranking")
    if rank:
        how = (f"`search --budget {rank['budget']:g} --retrain-top {len(rank['rows'])}` retrains every finalist in full "
               f"({rank['wall_minutes']:.0f} min)") if not rank.get("retrained_by") else (
               f"`{rank['retrained_by']}` ranks the finalists of `search --budget {rank['budget']:g}` and retrains every one "
               f"in full with `caitsearch train --config`, the same recipe, on {rank.get('machine') or 'a GPU'} "
               f"([{rank['run']}]({rank['run']}))")
        out += [f"**Does the ranking predict?** {how}. Spearman against final test accuracy: "
                f"validation after the first short fine-tune ({rank['first_rung_steps']} steps) "
                f"{rank['spearman_tune_vs_test']:.2f} (goal >= 0.8, {check(rank['spearman_tune_vs_test'] >= 0.8)}), "
                f"the untrained proxy {rank['spearman_proxy_vs_test']:.2f}, final validation "
                f"{rank['spearman_final_val_vs_test']:.2f}.", ""]
        out += md_table(["trial", "family", "proxy KL", "short-tune val", "kept to the last rung", "final val", "final test",
                         "latency vs dense"],
                        [[str(r["trial"]), r["family"] or "", f"{r['proxy_kl']:.3f}", f"{r['tune_val']:.2%}",
                          {True: "yes", False: "no"}.get(r.get("last_rung"), ""),
                          f"{r['final_val']:.2%}", f"{r['final_test']:.2%}", f"{r['latency_ratio']:.2f}x"]
                         for r in rank["rows"]]) + [""]
    lat = result.get("latency", [])
    if lat:
        out += ["**DeiT at 224, random weights: the schedule each strategy's predictor picks at each budget, timed "
                "against dense** (`--only latency`; one interleaved loop per model and batch; 'realised' = speedup x "
                "MAC ratio, 1.0 meaning the wall-clock gain equals the MAC reduction; tome is ToMe's constant-r "
                "schedule with the same predicted latency).", ""]
        out += md_table(["model", "batch", "budget", "strategy", "predicted", "MACs vs dense", "speedup", "realised"],
                        [[r["model"].replace("_patch16_224", ""), str(r["batch"]), f"{r['budget']:g}", r["strategy"],
                          f"{r['predicted_ratio']:.2f}x", f"{r['mac_ratio']:.3f}", f"{r['speedup']:.2f}x", f"{r['realised']:.2f}"]
                         for r in lat]) + [""]
        s = [r for r in lat if r["model"].startswith("deit_small") and r["batch"] == 32 and r["strategy"] == "cait"
             and r["budget"] == 0.5]
        if s:
            r = s[0]
            out += [f"Goal, DeiT-Small at 224, budget 0.5, batch 32: at least 1.9x measured and at least 0.9 of the MAC "
                    f"reduction realised: {r['speedup']:.2f}x, {r['realised']:.2f} realised, "
                    f"{check(r['speedup'] >= 1.9 and r['realised'] >= 0.9)}.", ""]
    return out


def segmentation_section(seg: dict) -> list[str]:
    """The end-to-end segmentation bench (issue 14): one retraining recipe for every strategy."""
    st, recipe = seg["settings"], seg["recipe"]
    length = f"{recipe['steps']} steps" if recipe.get("steps") else f"{recipe['epochs']} epochs"
    out = ["## Segmentation, fine-tuned end to end", "",
           f"`{seg['command'].replace(str(ROOT) + '/', '')}` on {seg['meta']['cpu']}, {seg['meta']['threads']} thread(s). "
           "Per-pixel labels from Fashion-MNIST (background, else 1 + the item's class: 11 classes). The dense "
           f"segmentation model ({seg['teacher']['source']}) is the teacher; every compressed model (backbone + "
           "decoder) is retrained with the same recipe: distillation per pixel (KL over the classes at T=2, plus CE), "
           f"CDCP masks annealed, {length} of batch {recipe['batch_size']} on {seg['train_images']} training images. "
           "atme, cdcp and tome use their uniform schedule predicted closest under the budget; cait is the first "
           f"of the ranking of `search --task segmentation` ({st['trials']} trials, short tunes scored by validation "
           "mIoU), and cait+merge (where that one merges nothing) the first of it that merges. Where ATME merged, the "
           "decoder shifts and scales each patch's features by its place in the grid cell (`SegmentationHead`'s cell "
           "embeddings); every decoder also adds the stem's patch tokens, which no merge has touched (its stem "
           f"skip). mIoU on {seg['test_images']} test images; backbone + unmerge + decoder timed at batch "
           f"{st['batch']}, all models in one interleaved loop. This invocation's searches and retrainings took "
           f"{sum(r.get('seconds', 0) for r in seg['rows']) / 60:.0f} min (a variant whose retraining had finished in "
           "`--work` is re-evaluated, not retrained).", ""]
    if recipe.get("steps") or (st.get("train_limit") or 10**9) < 20000:
        out += ["**A reduced run** (far shorter retraining than the protocol's default): its merging variants "
                "have not recovered; read it as a smoke test of the protocol, not as the method's result.", ""]
    out += md_table(["variant", "merges", "MACs vs dense", "median ms", "speedup", "mIoU", "vs dense (points)"],
                    [[r["label"], str(r["merges"]), f"{r['mac_ratio']:.3f}", f"{r['latency_ms']:.1f}", f"{r['speedup']:.2f}x",
                      f"{100 * r['miou']:.2f}%", f"{r['miou_delta_points']:+.2f}"] for r in seg["rows"]])
    out += ["", "Goals: (1) cait with at least one merge >= 1.3x measured at <= 1.0 mIoU point below dense; (2) at "
                "equal latency atme >= tome + 3 points; (3) cait >= the best single strategy at every budget.", ""]
    out += md_table(["goal", "met", "figures"],
                    [[name, check(g["met"]), ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                      for k, v in g.items() if k != "met")]
                     for name, g in seg["goals"].items()])
    return out + [""]


def gpu_section(folders: list[Path]) -> list[str]:
    gpu = [f for f in folders if json.loads((f / "manifest.json").read_text())["backend"] != "torch-cpu"]
    out = ["## GPU", ""]
    if not gpu:
        return out + ["No GPU profile has been measured yet; `bench/gpu_profile_check.sh` is the one-command check.", ""]
    out += ["Every GPU profile, how it was built, and its validation (all families together; per family in the table "
            "above). `bench/gpu_profile_check.sh` builds, validates and benches one in a single call.", ""]
    for f in gpu:
        m = json.loads((f / "manifest.json").read_text())
        path = next((f / n for n in ("validation-all.json", "validation.json") if (f / n).exists()), None)
        v = json.loads(path.read_text()) if path else None
        fp = m["fingerprint"]
        line = (f"- `{f.name}`: {fp.get('gpu')} (driver {fp.get('driver')}, CUDA {fp.get('cuda')}, torch {fp.get('torch')}), "
                f"{m['dtype']}, batch {m['batch_size']}, CUDA graphs {'on' if m.get('cuda_graphs') else 'off'}"
                f"{', `--quick` resolution' if m.get('quick') else ''}; {m['rows']} rows in "
                f"{m.get('build_seconds', float('nan')) / 60:.1f} min")
        if v:
            line += (f"; validated on {v['configs']} random configs: MAPE {v['mape_pct']:.1f}%, {v['within_5pct']:.0%} within ±5%, "
                     f"{v['within_10pct']:.0%} within ±10%, Spearman {v['spearman']:.2f} (relative to dense; dense measured "
                     f"during validation {v['dense_reference_ms']:.2f} ms; drift factor {v['drift_factor_range'][0]:.2f}-"
                     f"{v['drift_factor_range'][1]:.2f} between profiling and validation)")
        out.append(line + ".")
    for path in sorted((ROOT / "bench" / "results" / "gpu").glob("bench_*.json")):
        b = json.loads(path.read_text())
        first = next(iter(b["runs"].values()))
        out += ["", f"`{b['command']}` ([{path.name}](bench/results/gpu/{path.name})): each strategy's uniform schedule "
                f"predicted closest under budget {first.get('budget', 0.5)} (the fastest where none fits) by `{Path(b['profile']).name}`, timed against dense "
                f"in the profile's own runtime ({first['backend']}, {first['dtype']}, batch {first['batch_size']}, "
                f"CUDA graphs {'on' if first.get('cuda_graphs') else 'off'}), medians of interleaved rounds.", ""]
        rows = [[name, f"{r['dense']['median_ms']:.3f}", f"{r['compressed']['median_ms']:.3f}",
                 f"{r['predicted_ratio']:.2f}x" if "predicted_ratio" in r else "-",
                 f"{r['compressed']['median_ms'] / r['dense']['median_ms']:.2f}x", f"{r['mac_ratio']:.3f}",
                 f"{r['speedup']:.2f}x", f"{r['realised']:.2f}"] for name, r in b["runs"].items()]
        out += md_table(["strategy", "dense ms", "compressed ms", "predicted vs dense", "measured vs dense", "MACs vs dense",
                         "speedup", "realised"], rows)
        cait = b["runs"].get("cait")
        if cait:
            out += ["", f"Goal (an earlier issue), cait at budget 0.5 at least 1.8x faster than dense in the same runtime: "
                    f"{cait['speedup']:.2f}x, {check(cait['speedup'] >= 1.8)}."]
    for path in sorted((ROOT / "bench" / "results" / "gpu").glob("strategies_*.json")):
        rows = json.loads(path.read_text())["latency"]
        dense = {r["batch"]: r["dense_ms"] for r in rows}
        macs = sorted({round(r["mac_ratio"], 3) for r in rows})
        out.append(f"- Earlier, eager (no CUDA graphs) on an H100, `bench/strategies_bench.py --only latency --device cuda "
                   f"--dtype fp16` on {rows[0]['model']} ([{path.name}](bench/results/gpu/{path.name})): dense "
                   + ", ".join(f"{v:.2f} ms at batch {b}" for b, v in sorted(dense.items()))
                   + f"; measured speedups of the picks {min(r['speedup'] for r in rows):.2f}x-{max(r['speedup'] for r in rows):.2f}x"
                   + (" (every pick was the dense config)." if macs == [1.0] else f" (picks down to {macs[0]:.3f}x MACs)."))
    return out + ["", GPU_READING, ""]


# what the GPU measurements above say, in words (rewrite when they are measured again)
GPU_READING = (
    "Reading: eager PyTorch on the H100 was launch-bound (DeiT-Small fp16 took as long at batch 32 as at batch 1, "
    "8.4 ms), so per-part sums counted kernel launches. Replayed as CUDA graphs on an H200, the same model at batch 32 "
    "runs in about 1.6 ms (about 180 TFLOP/s from its 4.6 GMACs per image, a fifth of the chip's dense fp16 rate), and "
    "a quick profile (59 rows, 18 s) predicts 80 random configs of every family within ±5% (MAPE 2.0%). cdcp's ranking "
    "is the weak spot (Spearman 0.83 at MAPE 1.7%): its 20 random configs span only 0.89-1.00x dense. The predictor "
    "was also right about the budget-0.5 picks (cait and cdcp: 0.75x predicted, 0.73x measured; atme 0.87x and 0.89x; "
    "tome 0.91x and 0.90x): nothing in the space reaches 0.5x on this runtime. The fastest config, every width cut to a "
    "quarter (0.26x the MACs), runs at 0.73x, because narrow matrices at this size leave the GPU idle; merging "
    "configs of the validation ran at up to 1.29x dense (their merge steps cost more than the tokens they save). So "
    "the goal of 1.8x at budget 0.5 is missed, and is out of this space's reach at batch 32; batch 256 (a busier "
    "GPU) and a full-resolution profile were not run in this session's 15 GPU minutes. Not run on a GPU: TensorRT "
    "(not installable there), NVML telemetry under load.")


def onnx_ops_section(result: dict) -> list[str]:
    meta = result["meta"]
    out = ["## What TensorRT would be handed: ONNX ops per compression family", "",
           f"`.venv/bin/python bench/onnx_ops_bench.py`: each family's materialised model exported with "
           f"{meta['exporter']} at opset {meta['opset']} (torch {meta['torch']}, onnx {meta['onnx']}) and read by "
           "`caitsearch.export.tensorrt_audit`: scatters with a reduction (TensorRT hands them to a plugin), ops with "
           "data-dependent output shapes or control flow, TopK without a constant K below 3840, values without a "
           f"static shape. TensorRT itself: {meta['tensorrt']}. {meta['note']}.", ""]
    rows = []
    for m in result["models"]:
        for family, r in m["families"].items():
            notable = ", ".join(f"{op} {n}" for op, n in r["notable"].items()) or "-"
            ks = sorted(set(r["topk_k"]))
            rows.append([m["model"], family, str(r["nodes"]), notable, ", ".join(map(str, ks)) or "-",
                         "none" if not r["concerns"] else "; ".join(r["concerns"])])
    out += md_table(["model", "family", "nodes", "ops beyond tensor algebra", "TopK K", "concerns"], rows) + [""]
    return out


def train_step_section(result: dict) -> list[str]:
    """bench/train_step_bench.py: where a retraining step's time goes, and what the usual levers buy."""
    out = ["## Where a retraining step's time goes",
           "",
           f"`.venv/bin/python bench/train_step_bench.py --steps {result['steps']}` on {result['cpu']} (bf16 instructions: "
           f"{', '.join(result.get('cpu_bf16') or []) or 'none'}), torch {result['torch']}: the default model's distillation "
           f"step at batch {result['batch_size']}, a cait config near {result['config_budget']:g}x dense, every variant "
           "timed in one interleaved loop (medians). torch.compile: "
           + (result["compile_seconds"] if isinstance(result["compile_seconds"], str)
              else f"{result['compile_seconds']:.0f} s to compile") + ".", ""]
    out += md_table(["part / variant", "threads", "median s", "vs whole step (2 threads)"],
                    [[name, str(r["threads"]), f"{r['median_s']:.3f}", f"{r['vs_whole_step']:.2f}x"]
                     for name, r in result["variants"].items()]) + [""]
    return out


def main() -> None:
    lines = ["# Benchmarks", "",
             "Generated by `.venv/bin/python bench/write_benchmarks.py` from measured files; do not edit by hand. "
             "Timings come from a shared 2-core CPU machine: read the ratios (against the dense model measured in "
             "the same run), not the absolute milliseconds. Every timing process fixes its thread count and glibc's "
             "allocator thresholds (`caitsearch.measure.steady_allocator`), so results do not depend on what the "
             "process ran before.", ""]
    core = ROOT / "bench" / "results" / "core.json"
    if core.exists():
        lines += core_section(json.loads(core.read_text()))
    examples = [p for p in (ROOT / "results").glob("example*/summary.json")]
    for example in sorted(examples, key=lambda p: -json.loads(p.read_text())["budget"]["ratio"]):
        manifest = json.loads((example.parent / "manifest.json").read_text())
        lines += search_section(json.loads(example.read_text()), f"results/{example.parent.name}",
                                manifest["command"], manifest["request"].get("recipe", manifest["request"]).get("epochs"))
    strategies = ROOT / "bench" / "results" / "strategies.json"
    if strategies.exists():
        lines += strategies_section(json.loads(strategies.read_text()))
    train_step = ROOT / "bench" / "results" / "train_step.json"
    if train_step.exists():
        lines += train_step_section(json.loads(train_step.read_text()))
    onnx_ops = ROOT / "bench" / "results" / "onnx_ops.json"
    if onnx_ops.exists():
        lines += onnx_ops_section(json.loads(onnx_ops.read_text()))
    segmentation = ROOT / "bench" / "results" / "segmentation.json"
    if segmentation.exists():
        lines += segmentation_section(json.loads(segmentation.read_text()))
    folders = sorted(p for p in (ROOT / "hw_profiles").iterdir() if (p / "manifest.json").exists())
    if folders:
        lines += profile_section(folders)
    lines += gpu_section(folders)
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
