"""Predict the latency of a compressed model from a profile: table lookups plus fitted per-part factors.

A config's parts are the stem, the sum over blocks of attention parts (at the block's input
tokens and widths), of MLP parts (at the output tokens) and of merge steps, and the head at the
final tokens, each looked up (interpolated multilinearly between measured points) in the table;
attention timings are first smoothed over widths per token count (`smooth_attention`).
Parts timed alone miss what a whole model does differently (caches warm across blocks, the
allocator, overlap and fusion on GPUs), and not by the same amount for every part, so `predict`
is a weighted sum `sum_k factor_k * part_k`, one non-negative factor per part, fitted to the
profile's end-to-end measurements by least squares on relative errors. Those measurements are
spread over every family (pure pruning, pure merging, joint, ToMe; `plan.FIT_FAMILIES`): with one
correction fitted mostly on merge-heavy configs, pruning was charged 14-18% too much. Attention
and MLP parts at the full token count get factors apart from those at merged counts: with one
factor each, a DeiT-Tiny profile over-predicted pure pruning (all full-token) by 2.5-4.3% while
it under-predicted merging by 2.5-3%. A sum of positive parts with positive factors stays
positive and monotone outside the fitted range.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
from torch import nn

from ..config import CompressionConfig, MergeAxis
from ..errors import CaitsearchError, reason
from ..models import ModelSpec
from .build import MANIFEST, TABLE, file_sha256, read_manifest, read_table
from .fingerprint import differences, fingerprint


# attention and MLP parts split by whether the block runs on the full token count or a merged one
PARTS = ("stem", "attention_full", "attention_merged", "mlp_full", "mlp_merged", "merge", "head")


PRIOR = 0.05  # weight of the pull of every factor towards 1 (the plain sum of the parts)


def fit_factors(parts: np.ndarray, measured: np.ndarray, prior: float = PRIOR) -> np.ndarray:
    """Non-negative factors `f` minimising sum(((parts @ f) - measured) / measured)^2 + prior *
    sum((f - 1)^2).

    `parts` is (configs, len(PARTS)). The prior keeps parts the data cannot tell apart near the
    plain sum: the stem is the same in every config, so alone it would act as a free intercept,
    and noisy timings would buy any factor; where the data is clear it decides. Solved exactly:
    least squares over every subset of the parts (2^7 small solves), the best non-negative one. A
    part that is zero in every config (no merges in the table) keeps factor 1 from the prior."""
    parts, measured = np.asarray(parts, dtype=float), np.asarray(measured, dtype=float)
    k = parts.shape[1]
    X = np.vstack([parts / measured[:, None], np.sqrt(prior) * np.eye(k)])
    y = np.concatenate([np.ones(len(measured)), np.sqrt(prior) * np.ones(k)])
    best, best_err = np.zeros(k), np.inf
    for size in range(1, k + 1):
        for subset in itertools.combinations(range(k), size):
            cols = list(subset)
            coef, *_ = np.linalg.lstsq(X[:, cols], y, rcond=None)
            if (coef < 0).any():
                continue
            factors = np.zeros(k)
            factors[cols] = coef
            err = float(((X @ factors - y) ** 2).sum())
            if err < best_err:
                best, best_err = factors, err
    return best


SMOOTH_MIN_WIDTHS = 8  # token counts with fewer measured (qk, v) pairs (quick profiles) keep their raw timings


def smooth_attention(rows: pd.DataFrame, min_widths: float = SMOOTH_MIN_WIDTHS) -> pd.DataFrame:
    """Attention rows with each token count's timings replaced by their least-squares fit
    `a + b*qk + c*v + d*max(qk, v)`: the qk and v projections scale with their own widths, fused
    attention with the larger one. One width's timing carried up to 7% noise in a DeiT-Tiny
    profile (2.3% rms around the fit), enough to misorder pruning configs whose latencies lie
    within 30% of each other; the fit over a token count's widths averages it out. A fit that is
    not positive everywhere leaves that token count as measured."""
    rows = rows.copy()
    for _, group in rows.groupby("tokens"):
        if len(group) < min_widths:
            continue
        qk, v = group["qk"].to_numpy(float), group["v"].to_numpy(float)
        X = np.c_[np.ones(len(group)), qk, v, np.maximum(qk, v)]
        coef, *_ = np.linalg.lstsq(X, group["median_ms"].to_numpy(float), rcond=None)
        fitted = X @ coef
        if (fitted > 0).all():
            rows.loc[group.index, "median_ms"] = fitted
    return rows


class Grid:
    """Values measured on the product of sorted axes, interpolated multilinearly (clamped at the ends)."""

    def __init__(self, rows: pd.DataFrame, dims: Sequence[str], where: str) -> None:
        if rows.empty:
            raise CaitsearchError(f"the latency table has no {where} entries; delete the profile and build it again.")
        self.axes = [np.array(sorted(rows[d].unique()), dtype=float) for d in dims]
        self.values = np.full([len(a) for a in self.axes], np.nan)
        for point, ms in zip(rows[list(dims)].itertuples(index=False), rows["median_ms"]):
            self.values[tuple(int(np.searchsorted(a, p)) for a, p in zip(self.axes, point))] = ms
        if np.isnan(self.values).any():
            raise CaitsearchError(f"the latency table misses {where} entries; delete the profile and build it again.")

    def __call__(self, *point: float) -> float:
        corners = []
        for axis, p in zip(self.axes, point):
            if len(axis) == 1 or p <= axis[0]:
                corners.append(((0, 1.0),))
            elif p >= axis[-1]:
                corners.append(((len(axis) - 1, 1.0),))
            else:
                i = int(np.searchsorted(axis, p)) - 1
                t = (p - axis[i]) / (axis[i + 1] - axis[i])
                corners.append(((i, 1.0 - t), (i + 1, t)))
        total = 0.0
        for combo in itertools.product(*corners):
            weight = float(np.prod([w for _, w in combo]))
            if weight:
                total += weight * self.values[tuple(i for i, _ in combo)]
        return float(total)



class LatencyProfile:
    """A measured latency table of one model on one device, backend, batch size and dtype."""

    smooth_min_widths: float = SMOOTH_MIN_WIDTHS  # see `smooth_attention`; infinity keeps the raw timings

    def __init__(self, manifest: dict, table: pd.DataFrame, path: Path) -> None:
        self.manifest, self.table, self.path = manifest, table, path
        s = dict(manifest["spec"])
        for k in ("img_size", "patch_size", "grid"):
            s[k] = tuple(s[k])
        self.spec = ModelSpec(**s)
        full = self.spec.num_tokens
        t = table
        attn = smooth_attention(t[t.kind == "attn"], self.smooth_min_widths)
        self._attn_full = Grid(attn[attn.tokens == full], ["qk", "v"], "full-grid attention")
        merged = attn[attn.tokens < full]
        self._attn_merged = Grid(merged, ["tokens", "qk", "v"], "merged attention") if len(merged) else None
        self._mlp = Grid(t[t.kind == "mlp"], ["tokens", "mlp"], "MLP")
        self._merge = {a: Grid(g, ["tokens"], f"{a} merge") for a, g in t[t.kind == "merge"].groupby("axis")}
        self._head = Grid(t[t.kind == "head"], ["tokens"], "head")
        stem = t[t.kind == "stem"]["median_ms"]
        if len(stem) != 1:
            raise CaitsearchError("the latency table has no stem entry; delete the profile and build it again.")
        self._stem = float(stem.iloc[0])
        self._cache: dict = {}
        self.factors = self._fit()

    # ----- loading ------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Union[str, Path], allow_foreign: bool = False) -> "LatencyProfile":
        """Read a finished profile, refusing one that is unfinished, corrupt, or from another device."""
        directory = Path(path)
        if directory.name == MANIFEST:
            directory = directory.parent
        manifest = read_manifest(directory)
        if not manifest.get("complete"):
            raise CaitsearchError(f"profile {directory} is unfinished; re-run the same `caitsearch profile` command to resume it.")
        table_path = directory / TABLE
        if not table_path.is_file():
            raise CaitsearchError(f"profile {directory} has no {TABLE}; delete it and build it again.")
        if file_sha256(table_path) != manifest.get("table_sha256"):
            raise CaitsearchError(f"latency table {table_path} does not match its manifest (corrupt, truncated or edited); "
                                  "delete the profile and build it again.")
        table = read_table(table_path)
        if len(table) != manifest.get("rows"):
            raise CaitsearchError(f"latency table {table_path} has {len(table)} rows but its manifest says {manifest.get('rows')}.")
        try:
            here = fingerprint(manifest["backend"], manifest.get("threads"))
        except Exception:  # e.g. a GPU profile read where there is no GPU
            here = {"backend": manifest["backend"], "device": "unavailable here"}
        moved = differences(manifest.get("fingerprint", {}), here)
        if moved and not allow_foreign:
            raise CaitsearchError(f"profile {directory} was measured on another device ({'; '.join(moved[:3])}); "
                                  "pass --allow-foreign-profile to use it anyway.")
        try:
            return cls(manifest, table, directory)
        except CaitsearchError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError) as e:  # edited by hand
            raise CaitsearchError(f"profile {directory} does not hold a usable latency table ({reason(e, 120)}); "
                                  "delete it and build it again.") from e

    def check_model(self, model: Union[ModelSpec, nn.Module]) -> None:
        """Refuse a model other than the one profiled (name, input size, widths or depth)."""
        s = ModelSpec.of(model)
        p = self.spec
        if s.name != p.name or tuple(s.img_size) != tuple(p.img_size):
            raise CaitsearchError(f"profile {self.path} is for {p.name} at {list(p.img_size)}, "
                                  f"not {s.name} at {list(s.img_size)}.")
        shape = ("depth", "embed_dim", "num_heads", "head_dim", "mlp_hidden", "num_prefix_tokens")
        if any(getattr(s, k) != getattr(p, k) for k in shape):
            raise CaitsearchError(f"profile {self.path} is for a {p.name} of another shape; profile this model.")

    def refuses(self, space) -> Optional[str]:
        """Why this profile cannot predict `space` (a `SearchSpace`) without extrapolating, or None:
        a width outside the measured range, token counts below it, or a merge it never timed."""
        t = self.table
        for dim, choices in (("qk", space.qk_choices), ("v", space.v_choices), ("mlp", space.mlp_choices)):
            measured = t[t.kind == ("mlp" if dim == "mlp" else "attn")][dim]
            if min(choices) < measured.min() or max(choices) > measured.max():
                return (f"profile {self.path} measured {dim} widths {int(measured.min())}-{int(measured.max())}, "
                        f"but the {space.strategy} space offers {min(choices)}-{max(choices)}")
        from .plan import reachable_tokens

        tokens = t[t.kind == "attn"]["tokens"]
        if space.merge and min(reachable_tokens(space)) < tokens.min():
            return (f"profile {self.path} measured {int(tokens.min())} tokens or more, but the {space.strategy} "
                    f"space reaches {min(reachable_tokens(space))}")
        missing = sorted({str(a) for a in space.axes if a != MergeAxis.NONE} - set(map(str, self._merge)))
        if missing:
            return f"profile {self.path} has no {', '.join(missing)} merge rows, which the {space.strategy} space needs"
        return None

    # ----- prediction ---------------------------------------------------------------------------
    def _attention(self, tokens: int, qk: int, v: int) -> float:
        if tokens >= self.spec.num_tokens or self._attn_merged is None:
            return self._attn_full(qk, v)
        return self._attn_merged(tokens, qk, v)

    def _merge_ms(self, axis: str, tokens: int) -> float:
        grid = self._merge.get(axis)
        if grid is None and axis == MergeAxis.TOKENS and self._merge:
            raise CaitsearchError(f"profile {self.path} predates ToMe merge rows; run the command that built it again "
                                  "to add them (only the missing rows are measured).")
        grid = grid or next(iter(self._merge.values()), None)
        if grid is None:
            raise CaitsearchError(f"profile {self.path} was built without merges but the config merges tokens.")
        return grid(tokens)

    def part_sums(self, config: CompressionConfig) -> np.ndarray:
        """The config's parts summed by kind, in `PARTS` order (ms, before the factors)."""
        shapes, full = config.shapes(self.spec), self.spec.num_tokens
        sums = np.zeros(len(PARTS))
        sums[0], sums[6] = self._stem, self._head(shapes[-1].tokens_out)
        for b, sh in zip(config.blocks, shapes):
            key = (b, sh.tokens_in, sh.tokens_out)
            if key not in self._cache:
                merged = self._merge_ms(b.merge_axis, sh.tokens_in) if b.merge_count else 0.0
                self._cache[key] = (self._attention(sh.tokens_in, b.keep_qk, b.keep_v),
                                    self._mlp(sh.tokens_out, b.keep_mlp), merged)
            a, m, g = self._cache[key]
            sums[1 if sh.tokens_in >= full else 2] += a
            sums[3 if sh.tokens_out >= full else 4] += m
            sums[5] += g
        return sums

    def parts(self, config: CompressionConfig) -> dict:
        """Raw per-part estimate in ms: stem, each block, head (no factors)."""
        shapes = config.shapes(self.spec)
        blocks = []
        for b, sh in zip(config.blocks, shapes):
            ms = self._attention(sh.tokens_in, b.keep_qk, b.keep_v) + self._mlp(sh.tokens_out, b.keep_mlp)
            if b.merge_count:
                ms += self._merge_ms(b.merge_axis, sh.tokens_in)
            blocks.append(ms)
        return {"stem": self._stem, "blocks": blocks, "head": self._head(shapes[-1].tokens_out)}

    def raw(self, config: CompressionConfig) -> float:
        """The plain sum of the config's table lookups (every factor 1)."""
        return float(self.part_sums(config).sum())

    def predict(self, config: CompressionConfig) -> float:
        """Predicted ms per batch of the whole materialised model under `config`."""
        return float(self.part_sums(config) @ self.factors)

    def measured_e2e(self, config: CompressionConfig) -> float:
        """The profile's own end-to-end measurement of `config`, drift divided out (see `e2e_ms`):
        the geometric mean of the build's passes; its prediction if never measured."""
        e2e = self.table[self.table.kind == "e2e"]
        wanted = config.to_dict()
        found = [ms for text, ms in zip(e2e["config"], self.e2e_ms()) if json.loads(text) == wanted]
        return float(np.exp(np.mean(np.log(found)))) if found else self.predict(config)

    def e2e_ms(self) -> np.ndarray:
        """The whole-config timings of the table, on one scale: each row's ratio to dense measured in
        its own loop (`ref_ms`), times the median of those dense timings. A shared CPU drifted 5-12%
        within one build's whole-config phase; fitted raw, that drift biased the factors by +5%.
        Rows of profiles built before `ref_ms` existed are taken as they are."""
        e2e = self.table[self.table.kind == "e2e"]
        ms = e2e["median_ms"].to_numpy(dtype=float)
        if "ref_ms" not in e2e or e2e["ref_ms"].isna().any():
            return ms
        ref = e2e["ref_ms"].to_numpy(dtype=float)
        return ms * float(np.median(ref)) / ref

    @property
    def dense_ms(self) -> float:
        return self.predict(CompressionConfig.dense(self.spec))

    def _fit(self) -> np.ndarray:
        """Per-part factors minimising the squared relative error over the end-to-end rows."""
        e2e = self.table[self.table.kind == "e2e"]
        if e2e.empty:
            return np.ones(len(PARTS))
        parts = np.array([self.part_sums(CompressionConfig.from_dict(json.loads(c))) for c in e2e["config"]])
        return fit_factors(parts, self.e2e_ms())

    def summary(self) -> dict:
        m = self.manifest
        return {"path": str(self.path), "model": m["model"], "img_size": m["img_size"], "backend": m["backend"],
                "batch_size": m["batch_size"], "dtype": m["dtype"], "threads": m.get("threads"), "rows": len(self.table),
                "dense_ms": self.dense_ms, "factors": dict(zip(PARTS, map(float, self.factors))),
                "fingerprint": m["fingerprint"], "date": m.get("date")}
