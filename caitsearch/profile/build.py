"""Build a latency profile: measure every planned table entry, resumably.

The table is rewritten atomically after every interleaved group, together with a manifest marked
unfinished; re-running the same command skips the entries already in the table, so a killed run
loses at most the group it was in and never duplicates a row (and a finished profile gains only
the rows a newer plan added). The finished profile is a directory:
`table.parquet` (what the predictor reads), `table.csv` (the same, for people) and `manifest.json`
(settings, device fingerprint, row count and the table's SHA-256).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence, Union

import pandas as pd
import torch
from torch import nn

from ..compress import compress, materialize
from ..config import CompressionConfig
from ..console import Progress
from ..device import DTYPES
from ..errors import CaitsearchError, reason
from ..io import atomic_write, atomic_write_text, check_output_dir, holds_files
from ..models import ModelSpec, create_model
from ..space import SearchSpace
from .backends import BACKENDS, check_backend, make_backend
from .fingerprint import differences, fingerprint
from .plan import (
    FULL, QUICK, AttentionPart, Entry, HeadPart, MergePart, MlpPart, StemPart, dense_entry, merged_grid, one_block_model, plan,
    whole_config_repeats,
)

PROFILE_ROOT = Path("hw_profiles")
MANIFEST, TABLE, CSV = "manifest.json", "table.parquet", "table.csv"
FORMAT = 1
SETTINGS = ("model", "img_size", "num_classes", "backend", "batch_size", "dtype", "threads", "quick",
            "cuda_graphs", "space")


def default_profile_path(model_name: str, img_size: Sequence[int], backend: str = "torch-cpu",
                         batch_size: int = 32, dtype: str = "fp32") -> Path:
    """`hw_profiles/<model>_<H>x<W>_<backend>_b<batch>_<dtype>`: one directory per profile."""
    h, w = img_size
    return PROFILE_ROOT / f"{model_name}_{h}x{w}_{backend}_b{batch_size}_{dtype}"


def own_folder(default: Path, here: dict) -> Path:
    """This machine's folder for the profile whose default folder is `default`: `default` when it is
    free or was measured on this device (`here`, a fingerprint), else `default-<tag>` beside it, named
    by the fingerprint, so a profile measured elsewhere (a committed one) is left alone."""
    tag = hashlib.sha1(json.dumps(here, sort_keys=True).encode()).hexdigest()[:8]
    tagged = default.with_name(f"{default.name}-{tag}")
    if (tagged / MANIFEST).is_file():
        return tagged
    if (default / MANIFEST).is_file() and differences(read_manifest(default).get("fingerprint", {}), here):
        return tagged
    return default


def space_settings(space: SearchSpace) -> dict:
    return {k: getattr(space, k) for k in ("head_multiple", "mlp_multiple", "min_keep", "min_lines", "merge", "prune")}


# what every manifest holds from the first group on (rows and table_sha256 come when it is complete)
MANIFEST_FIELDS = {"model": str, "img_size": list, "num_classes": int, "backend": str, "batch_size": int, "dtype": str,
                   "threads": (int, type(None)), "quick": bool, "space": dict, "spec": dict, "fingerprint": dict}
TABLE_COLUMNS = {"kind": "object", "key": "object", "median_ms": "number", "tokens": "number", "qk": "number",
                 "v": "number", "mlp": "number", "axis": "object", "config": "object"}


def read_manifest(directory: Path) -> dict:
    """A profile's manifest, refused with one sentence unless it has every field, of its type."""
    path = directory / MANIFEST
    if not path.is_file():
        raise CaitsearchError(f"no latency profile at {directory} ({MANIFEST} is missing); build one with `caitsearch profile`.")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, not JSON, absurdly nested
        raise CaitsearchError(f"{path} is not a readable profile manifest ({reason(e, 120)}); "
                              "delete the profile and build it again.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CaitsearchError(f"{path} is not a caitsearch profile manifest of format {FORMAT}; rebuild the profile.")
    bad = [k for k, kind in MANIFEST_FIELDS.items() if not isinstance(manifest.get(k), kind) or isinstance(manifest.get(k), bool) != (kind is bool)]
    size = manifest.get("img_size")
    if not bad and not (len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        bad = ["img_size"]
    if not bad and (manifest["backend"] not in BACKENDS or manifest["dtype"] not in DTYPES or manifest["batch_size"] < 1):
        bad = ["backend, dtype or batch_size"]
    if bad:
        raise CaitsearchError(f"{path} lacks a valid {', '.join(bad[:3])}; delete the profile and build it again.")
    return manifest


def read_table(path: Path) -> pd.DataFrame:
    """A latency table, refused with one sentence when corrupt or missing a column."""
    try:
        table = pd.read_parquet(path)
    except Exception as e:  # truncated or corrupt Parquet: pyarrow raises several types
        raise CaitsearchError(f"latency table {path} is corrupt or truncated ({reason(e, 120)}); "
                              "delete the profile and build it again.") from e
    if len(table):
        wrong = [c for c, kind in TABLE_COLUMNS.items() if c not in table
                 or (kind == "number" and not (pd.api.types.is_numeric_dtype(table[c]) and table[c].notna().all()
                                               and bool((table[c] >= (0 if c != "median_ms" else 1e-12)).all())
                                               and bool((table[c] < float("inf")).all())))]
        if wrong:
            raise CaitsearchError(f"latency table {path} lacks a valid column {', '.join(wrong[:3])}; "
                                  "delete the profile and build it again.")
    return table


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _modules(entry: Entry, model: nn.Module, spec: ModelSpec, space: SearchSpace, be, batch: int, cache: dict):
    """The module and example inputs that time `entry` on backend `be`."""
    c = spec.embed_dim

    def block_model(qk: int, v: int, mlp: int):
        key = (qk, v, mlp)
        if key not in cache:
            cache[key] = one_block_model(model, spec, qk, v, mlp)
        return cache[key]

    if entry.kind == "attn":
        m = block_model(entry.qk, entry.v, spec.mlp_hidden)
        grid = merged_grid(space, entry.tokens, batch, be.dtype, be.device)
        inputs = (be.tensor(batch, entry.tokens, c),) + ((grid.bias,) if grid.bias is not None else ())
        return AttentionPart(m.vit.blocks[0]), inputs
    if entry.kind == "mlp":
        m = block_model(spec.head_dim, spec.head_dim, entry.mlp)
        return MlpPart(m.vit.blocks[0]), (be.tensor(batch, entry.tokens, c),)
    if entry.kind == "merge":
        part = MergePart(spec.num_prefix_tokens, entry.h, entry.w, entry.axis, entry.count)
        return part, (be.tensor(batch, entry.tokens, c), be.tensor(batch, entry.tokens, spec.head_dim))
    if entry.kind == "stem":
        m = block_model(spec.head_dim, spec.head_dim, spec.mlp_hidden)
        return StemPart(m), (be.tensor(batch, spec.in_chans, *spec.img_size),)
    if entry.kind == "head":
        m = block_model(spec.head_dim, spec.head_dim, spec.mlp_hidden)
        grid = merged_grid(space, entry.tokens, batch, be.dtype, be.device)
        return HeadPart(m, grid), (be.tensor(batch, entry.tokens, c),)
    if entry.kind == "e2e":
        cfg = CompressionConfig.from_dict(json.loads(entry.config))
        return materialize(compress(model, cfg)), (be.tensor(batch, spec.in_chans, *spec.img_size),)
    raise ValueError(entry.kind)


def measure_group(entries: Sequence[Entry], model, spec, space, be, batch: int, res, whole: bool = False) -> list[dict]:
    """Time one group of entries in a single interleaved loop; one row per entry. `whole` (whole
    configs, which the fit and validation compare): repeat for the group's full time
    (`plan.whole_config_repeats`) instead of stopping at the spread target."""
    cache: dict = {}
    fns = {}
    for e in entries:
        module, inputs = _modules(e, model, spec, space, be, batch, cache)
        fns[e.key] = be.prepare(module, inputs)
    # one untimed round: the first warm-up, and the cost of a round, which caps the extra repeats
    start = time.perf_counter()
    with torch.inference_mode():
        for fn in fns.values():
            fn()
    if be.device.type == "cuda":
        torch.cuda.synchronize()
    round_s = max(time.perf_counter() - start, 1e-6)
    if whole:
        repeats, max_repeats, target = whole_config_repeats(res, round_s), None, None
    else:
        repeats, max_repeats = res.repeats, max(res.repeats, min(res.max_repeats, int(res.group_seconds / round_s)))
        target = res.target_spread
    timings, tele = be.measure(fns, repeats=repeats, warmup=max(1, res.warmup - 1),
                               warmup_seconds=res.warmup_seconds, max_repeats=max_repeats, target_spread=target)
    base = {"sm_clock_mhz": None, "temp_c": None, "power_w": None, "throttled": False, "throttle": "", "attempts": 1}
    rows = [{**e.row(), **timings[e.key].summary(), **base, **tele} for e in entries]
    del fns, cache
    be.release()
    return rows


def measure_against_dense(entries: Sequence[Entry], dense: Entry, model, spec, space, be, batch: int,
                          res) -> list[dict]:
    """Time whole configs (`e2e` entries) in one interleaved loop with the `dense` entry beside them;
    one row per entry, in order, each with `ref_ms`: dense's latency in that same loop. A shared
    machine drifts by 5-12% over minutes (seen within one DeiT-Tiny build), so whole-config timings
    are compared through their ratio to dense, never across loops in raw milliseconds."""
    others = [e for e in entries if e.key != dense.key]
    rows = measure_group(others + [dense], model, spec, space, be, batch, res, whole=True)
    by_key, ref = {r["key"]: r for r in rows}, rows[-1]["median_ms"]
    return [{**by_key[e.key], "ref_ms": ref} for e in entries]


def _write_table(directory: Path, table: pd.DataFrame, csv: bool) -> None:
    atomic_write(directory / TABLE, lambda tmp: table.to_parquet(tmp, index=False))
    if csv:
        atomic_write(directory / CSV, lambda tmp: table.to_csv(tmp, index=False))


def build_profile(
    model_name_or_module: Union[str, nn.Module],
    img_size: Optional[Sequence[int]] = None,
    backend: str = "torch-cpu",
    batch_size: int = 32,
    dtype: str = "fp32",
    threads: Optional[int] = None,
    out: Optional[Union[str, Path]] = None,
    space: Optional[SearchSpace] = None,
    quick: bool = False,
    progress: bool = True,
    cuda_graphs: bool = False,
) -> Path:
    """Measure a latency profile of a model on this machine (resuming an unfinished one at `out`)
    and return its directory. `quick` samples coarser and repeats less: for tests and smoke runs."""
    check_backend(backend, dtype)
    if batch_size < 1:
        raise CaitsearchError("batch size must be at least 1.")
    if isinstance(model_name_or_module, str):
        model = create_model(model_name_or_module, img_size=img_size)
    else:
        model = model_name_or_module.eval()
    spec = ModelSpec.from_model(model)
    if img_size is not None and tuple(img_size) != tuple(spec.img_size):
        raise CaitsearchError(f"the model takes {list(spec.img_size)} inputs, not {list(img_size)}.")
    space = space or SearchSpace(spec)
    if space.spec != spec:
        raise CaitsearchError(f"the search space is for {space.spec.name} at {list(space.spec.img_size)}, not this model.")
    res = QUICK if quick else FULL
    if out is not None:
        check_output_dir(Path(out))
    be = make_backend(backend, dtype, threads, cuda_graphs)
    settings = {"model": spec.name, "img_size": list(spec.img_size), "num_classes": spec.num_classes,
                "backend": backend, "batch_size": batch_size, "dtype": dtype,
                "threads": be.threads if backend == "torch-cpu" else None, "quick": quick,
                "cuda_graphs": be.cuda_graphs, "space": space_settings(space)}
    fp = fingerprint(backend, settings["threads"])
    directory = Path(out) if out else own_folder(default_profile_path(spec.name, spec.img_size, backend, batch_size, dtype), fp)
    check_output_dir(directory)
    if holds_files(directory) and not (directory / MANIFEST).exists():
        raise CaitsearchError(f"{directory} holds files but no latency profile; pass a new or empty --out.")

    table = pd.DataFrame()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    old: dict = {}
    started_before = (directory / MANIFEST).exists()
    if started_before:
        old = read_manifest(directory)
        changed = [k for k in SETTINGS if old.get(k) != settings[k]]
        if changed:
            raise CaitsearchError(f"{directory} holds a profile with other settings ({', '.join(changed)}); "
                                  "pass another --out or delete it.")
        moved = differences(old.get("fingerprint", {}), fp)
        if moved:
            raise CaitsearchError(f"{directory} was started on another device ({moved[0]}); pass another --out or delete it.")
        started = old.get("started", started)
        if (directory / TABLE).exists():
            table = read_table(directory / TABLE)
    done = set(table["key"]) if len(table) else set()

    # a finished profile is topped up with the rows a newer plan added (e.g. ToMe merges), nothing else
    groups = [[e for e in g if e.key not in done] for g in plan(space, res)]
    groups = [g for g in groups if g]
    if old.get("complete") and not groups:
        return directory
    manifest = {"format": FORMAT, **settings, "spec": asdict(spec), "resolution": asdict(res), "fingerprint": fp,
                "started": started, "complete": False}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")

    clock = time.perf_counter()
    spent = float(old.get("build_seconds", 0.0))
    # modules are built outside inference mode: exporters (TensorRT via ONNX) refuse inference tensors
    with Progress(progress) as bar:
        task = bar.task(f"profile {spec.name}", total=sum(len(g) for g in groups) + len(done), completed=len(done))
        for group in groups:
            task.update(info=group[0].kind)
            if group[0].kind == "e2e":  # every e2e group carries its pass's dense, so the fit can divide drift out
                rows = measure_against_dense(group, dense_entry(spec, group[0].take), model, spec, space, be,
                                             batch_size, res)
            else:
                rows = measure_group(group, model, spec, space, be, batch_size, res)
            table = pd.concat([table, pd.DataFrame(rows)], ignore_index=True) if len(table) else pd.DataFrame(rows)
            _write_table(directory, table, csv=False)
            manifest["build_seconds"] = round(spent + time.perf_counter() - clock, 1)
            atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            task.advance(len(group))

    _write_table(directory, table, csv=True)
    manifest["build_seconds"] = round(spent + time.perf_counter() - clock, 1)
    manifest.update(complete=True, rows=len(table), table_sha256=file_sha256(directory / TABLE),
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    files={"table": TABLE, "csv": CSV})
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return directory
