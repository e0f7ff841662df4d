"""Turn runs into documents: one list of blocks rendered as Markdown (PNGs beside it), as HTML
(PNGs embedded as base64, so the file opens offline anywhere) and as CSV/Parquet/JSON tables."""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from ..config import CompressionConfig
from ..errors import CaitsearchError
from ..io import atomic_write, atomic_write_text, check_output_dir
from .load import Run

FORMATS = ("md", "html", "csv", "parquet", "json")

# A document is a list of (kind, payload) blocks: h1/h2/p (text), note (text), img (PNG path),
# table (DataFrame), code (lines).
Block = tuple[str, object]


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise CaitsearchError(f"--format takes a comma-separated list of {', '.join(FORMATS)}, not '{text}'.")
    return formats


def candidates_table(run: Run) -> pd.DataFrame:
    """One row per re-measured candidate: within budget ones (with accuracy) first, then those
    measured over budget, so the table says why they are not deployable."""
    dense = run.dense or {}
    dense_macs = CompressionConfig.dense(run.spec).macs(run.spec)["total"] if run.candidates else None
    rows = []
    for c in run.candidates:
        macs = CompressionConfig.from_dict(c["config"]).macs(run.spec)
        timing = c.get("timing", {})
        rows.append({
            "trial": c["trial"], "recommended": c is run.recommended, "within_budget": True, "family": c.get("family"),
            "retrained": bool(c.get("retrained")), "val_accuracy": c.get("val_accuracy"), "test_accuracy": c["accuracy"],
            "accuracy_vs_dense": c["accuracy"] - dense["accuracy"] if dense else None,
            "latency_p50_ms": c["latency_ms"], "latency_p90_ms": timing.get("p90_ms"),
            "speedup": c["speedup"], "macs": macs["total"], "mac_ratio": macs["total"] / dense_macs,
            "params": run.candidate_params(c), "predicted_ms": c["predicted_latency_ms"],
            "prediction_error": c["predicted_latency_ms"] / c["latency_ms"] - 1, "proxy_agreement": c.get("proxy_agreement"),
        })
    if not run.results.empty and "within_budget" in run.results:
        for _, r in run.results[~run.results["within_budget"].astype(bool)].iterrows():
            rows.append({
                "trial": int(r["trial"]), "recommended": False, "within_budget": False, "retrained": False,
                "test_accuracy": None, "latency_p50_ms": r["latency_ms"], "speedup": r["speedup"], "macs": int(r["macs"]),
                "predicted_ms": r["predicted_latency_ms"], "prediction_error": r["predicted_latency_ms"] / r["latency_ms"] - 1,
                "proxy_agreement": r.get("proxy_agreement"),
            })
    columns = ["trial", "recommended", "within_budget", "family", "retrained", "val_accuracy", "test_accuracy",
               "accuracy_vs_dense",
               "latency_p50_ms", "latency_p90_ms", "speedup", "macs", "mac_ratio", "params", "predicted_ms",
               "prediction_error", "proxy_agreement"]
    return pd.DataFrame(rows, columns=columns)


def _fmt(column: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if column in ("test_accuracy", "accuracy", "dense_accuracy", "prediction_error", "accuracy_vs_dense",
                  "proxy_agreement", "val_accuracy", "final_val_accuracy", "final_test_accuracy") or column.startswith("val_at_"):
        return f"{v:+.1%}" if column in ("prediction_error", "accuracy_vs_dense") else f"{v:.1%}"
    if column in ("macs", "params"):
        return f"{v / 1e6:.2f} M"
    if column in ("speedup", "mac_ratio", "budget_ratio"):
        return f"{v:.2f}x"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _cells(frame: pd.DataFrame) -> list[list[str]]:
    return [[_fmt(col, v) for col, v in zip(frame.columns, row)] for row in frame.astype(object).itertuples(index=False)]


def to_markdown(blocks: Iterable[Block], image_link) -> str:
    lines = []
    for kind, payload in blocks:
        if kind in ("h1", "h2"):
            lines += ["#" * int(kind[1]) + " " + str(payload), ""]
        elif kind == "p":
            lines += [str(payload), ""]
        elif kind == "note":
            lines += [f"> **Note:** {payload}", ""]
        elif kind == "img":
            lines += [f"![{Path(payload).stem}]({image_link(payload)})", ""]
        elif kind == "table":
            frame: pd.DataFrame = payload
            lines.append("| " + " | ".join(map(str, frame.columns)) + " |")
            lines.append("|" + "---|" * len(frame.columns))
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in _cells(frame)]
            lines.append("")
        elif kind == "code":
            lines += ["```sh", *payload, "```", ""]
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}tr.rec{background:#dbeafe;font-weight:bold}.note{background:#fff4e5;border-left:4px solid #f59e0b;
padding:.5em 1em}pre{background:#f6f6f6;padding:.8em;overflow-x:auto}img{max-width:100%}"""


def to_html(blocks: Iterable[Block], title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>"]
    for kind, payload in blocks:
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(str(payload))}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(str(payload))}</p>")
        elif kind == "note":
            parts.append(f"<p class='note'><b>Note:</b> {html.escape(str(payload))}</p>")
        elif kind == "img":
            data = base64.b64encode(Path(payload).read_bytes()).decode()
            parts.append(f"<p><img alt='{html.escape(Path(payload).stem)}' src='data:image/png;base64,{data}'></p>")
        elif kind == "table":
            frame: pd.DataFrame = payload
            rec = frame["recommended"].tolist() if "recommended" in frame else [False] * len(frame)
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
            body = "".join(f"<tr{' class=rec' if r is True else ''}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row)
                           + "</tr>" for row, r in zip(_cells(frame), rec))
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "code":
            parts.append(f"<pre>{html.escape(chr(10).join(payload))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _kv_table(data: dict) -> pd.DataFrame:
    return pd.DataFrame({"key": list(data), "value": [str(v) for v in data.values()]})


def report_blocks(run: Run, figures: dict[str, Path], table: pd.DataFrame) -> list[Block]:
    rec, dense, budget = run.recommended, run.dense, run.budget or {}
    blocks: list[Block] = [("h1", f"caitsearch report: {run.name}")]
    if rec and dense:
        chosen = ("the most accurate on the validation split" if run.chosen_on_validation
                  else "the most accurate on the test split (a run from before the validation split)")
        blocks.append(("p", f"Deploy trial {rec['trial']}: {rec['accuracy']:.1%} test {run.metric_label} "
                            f"({100 * (rec['accuracy'] - dense['accuracy']):+.2f} points vs dense {dense['accuracy']:.2%}) at "
                            f"{rec['latency_ms']:.3g} ms, {rec['speedup']:.2f}x faster than dense timed in the same loop: "
                            f"of the candidates "
                            f"measured within the budget of {budget.get('ratio', float('nan')):.2f}x dense, {chosen}. "
                            f"Its folder: {rec.get('path', '')}"))
    blocks += [("note", n) for n in run.notes]
    blocks += [("h2", f"Latency and {run.metric_label}"), ("img", figures["tradeoff"])]
    if "masks" in figures:
        blocks += [("h2", "Predicted masks"),
                   ("p", "A few test images: the true mask, the dense segmentation model's prediction and the deployed "
                         "candidate's (backbone, unmerge and decoder, as timed)."), ("img", figures["masks"])]
    blocks += [("h2", "Candidates"), ("table", table)]
    if table.empty:
        blocks.append(("p", "No candidate was re-measured."))
    ranking = ranking_table(run)
    if not ranking.empty:
        blocks += [("h2", "Ranking: proxy, short fine-tunes, full retraining"),
                   ("p", "The untrained proxy only screens. The finalists were fine-tuned briefly with the search's "
                         "recipe, scored on the validation split, and halved at every rung; the best were then "
                         "retrained fully. Test accuracy is shown for the retrained ones, never used to choose.")]
        if "ranking" in figures:
            blocks.append(("img", figures["ranking"]))
        blocks.append(("table", ranking))
    schedules = [p for k, p in figures.items() if k.startswith("schedule-")]
    if schedules:
        blocks.append(("h2", "Per-block schedules"))
        blocks += [("img", p) for p in schedules]
    blocks += [("h2", "Environment"), ("p", "Latencies hold for this device, batch size and dtype only."),
               ("table", _kv_table(run.environment())), ("h2", "Reproduce"), ("code", run.commands())]
    return blocks


def ranking_table(run: Run) -> pd.DataFrame:
    """One row per finalist: proxy, validation accuracy at each rung, and the final accuracies."""
    ranking = run.ranking
    if ranking.empty:
        return ranking
    final = {c["trial"]: c for c in run.candidates if c.get("retrained")}
    rungs = [c for c in ranking.columns if c.startswith("val_at_")]
    frame = ranking[["rank", "trial", "family", "proxy_kl", *rungs, "survived"]].copy()
    frame["final_val_accuracy"] = [final.get(t, {}).get("val_accuracy") for t in frame["trial"]]
    frame["final_test_accuracy"] = [final.get(t, {}).get("accuracy") for t in frame["trial"]]
    return frame


def report_json(run: Run, table: pd.DataFrame) -> dict:
    return {"run": str(run.path), "recommended": run.recommended, "notes": run.notes, "budget": run.budget,
            "dense": run.dense, "candidates": json.loads(table.to_json(orient="records")),
            "environment": run.environment(), "commands": run.commands(),
            "trials": {"total": len(run.trials), "states": run.trials["state"].value_counts().to_dict()
                       if not run.trials.empty else {}}}


def write_document(blocks: list[Block], out: Path, stem: str, title: str, formats: Sequence[str],
                   tables: dict[str, pd.DataFrame], data: dict) -> dict[str, Path]:
    """Write the document and its tables in the requested formats; returns what was written."""
    written: dict[str, Path] = {}
    if "md" in formats:
        written["md"] = out / f"{stem}.md"
        atomic_write_text(written["md"], to_markdown(blocks, lambda p: Path(p).relative_to(out).as_posix()))
    if "html" in formats:
        written["html"] = out / f"{stem}.html"
        atomic_write_text(written["html"], to_html(blocks, title))
    for name, frame in tables.items():
        if "csv" in formats:
            written[f"{name}.csv"] = out / f"{name}.csv"
            atomic_write(written[f"{name}.csv"], lambda tmp, f=frame: f.to_csv(tmp, index=False))
        if "parquet" in formats:
            written[f"{name}.parquet"] = out / f"{name}.parquet"
            atomic_write(written[f"{name}.parquet"], lambda tmp, f=frame: f.to_parquet(tmp, index=False))
    if "json" in formats:
        written["json"] = out / f"{stem}.json"
        atomic_write_text(written["json"], json.dumps(data, indent=1, default=str) + "\n")
    return written


def write_report(run: Run, out: Path, formats: Sequence[str] = ("md", "html")) -> dict[str, Path]:
    """Figures, the candidates table and the chosen documents for one run, under `out`."""
    from .plots import figures_for

    out = check_output_dir(Path(out))
    figures = figures_for(run, out)
    table = candidates_table(run)
    trials = run.trials.drop(columns=["config"], errors="ignore")
    written = write_document(report_blocks(run, figures, table), out, "report", f"caitsearch report: {run.name}",
                             formats, {"candidates": table, "trials": trials}, report_json(run, table))
    return {**{f"{k}.png": v for k, v in figures.items()}, **written}


def compare_table(runs: Sequence[Run]) -> pd.DataFrame:
    rows = []
    for run in runs:
        env, budget, dense, rec = run.environment(), run.budget or {}, run.dense or {}, run.recommended or {}
        rows.append({
            "run": run.name, "model": run.model, "device": env.get("device"), "cpu_or_gpu": env.get("gpu") or env.get("cpu"),
            "batch_size": env.get("batch_size"), "dtype": env.get("dtype"), "sampler": env.get("sampler"),
            "budget_ratio": budget.get("ratio"), "trials": len(run.trials),
            "feasible": int(run.trials["feasible"].astype(bool).sum()) if not run.trials.empty else 0,
            "candidates": len(run.candidates), "dense_accuracy": dense.get("accuracy"), "dense_ms": dense.get("latency_ms"),
            "recommended": rec.get("trial"), "accuracy": rec.get("accuracy"), "latency_ms": rec.get("latency_ms"),
            "speedup": rec.get("speedup"),
        })
    return pd.DataFrame(rows)


def write_compare(runs: Sequence[Run], out: Path, formats: Sequence[str] = ("md", "html")) -> dict[str, Path]:
    from .plots import compare_figure, save

    out = check_output_dir(Path(out))
    table = compare_table(runs)
    figure = save(compare_figure(runs), out / "compare.png")
    blocks: list[Block] = [("h1", f"caitsearch compare: {', '.join(r.name for r in runs)}"), ("img", figure),
                           ("table", table)]
    for run in runs:
        blocks += [("note", f"{run.name}: {n}") for n in run.notes]
    data = {"runs": json.loads(table.to_json(orient="records"))}
    return {"compare.png": figure,
            **write_document(blocks, out, "compare", "caitsearch compare", formats, {"compare": table}, data)}
