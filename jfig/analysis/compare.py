"""Agreement between effect estimators measured on the same inputs (gradient against clamping).

`compare_estimators` runs `measure_effects` once per method with the same seed, so every method
sees the same inputs, and reports per pair of methods: sign agreement, rank and linear
correlation of the mean effects, relative error, where their significance decisions differ, and
a table of the largest disagreements with the inputs behind them.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from scipy import stats as sps

from ..errors import JfigError
from ..measure import METHODS, Effects, measure_effects
from ..models.validation import check_saes
from ..stats import CORRECTIONS, adjust, robust_pvalues

CONTEXT_TOKENS = 6        # tokens shown on each side of the clamped position
WORST_INPUTS = 3          # inputs listed per disagreeing pair


@dataclass(frozen=True)
class PairAgreement:
    """How two estimators agree over the (source, target) pairs both measured.

    Pairs are *non-negligible* when both |means| exceed `negligible`, and *either* when at least
    one does. Sign agreement counts sign(a) == sign(b) (sign(0) = 0). Relative error is
    |a − b| / max(|a|, |b|) over the `either` pairs. Significance: sign-flip p-values of each
    method, corrected over that method's pairs, significant below alpha.
    `disagreements`: a pyarrow Table of the largest |a − b| pairs, largest first.
    """

    a: str
    b: str
    n_pairs: int
    n_either: int
    n_nonnegligible: int
    negligible: float
    sign_agreement: float
    sign_agreement_all: float
    sign_agreement_significant: float
    spearman: float
    pearson: float
    spearman_either: float
    pearson_either: float
    rel_error_median: float
    rel_error_p90: float
    n_significant_both: int
    n_significant_only_a: int
    n_significant_only_b: int
    n_significant_opposite: int
    disagreements: pa.Table = field(repr=False, compare=False)

    def as_dict(self) -> dict:
        out = {k: _jsonable(getattr(self, k)) for k in self.__dataclass_fields__ if k != "disagreements"}
        out["disagreements"] = [{k: _jsonable(v) for k, v in row.items()} for row in self.disagreements.to_pylist()]
        return out


@dataclass(frozen=True)
class EstimatorComparison:
    """The effects of each method (same inputs) and the agreement of every pair of methods.

    effects: {method: Effects} with per-input values; pvalues: {method: [n_sources, n_targets]}
    raw sign-flip p-values; pairs: one PairAgreement per pair of methods (first two first).
    """

    methods: tuple[str, ...]
    effects: dict = field(repr=False, compare=False)
    pvalues: dict = field(repr=False, compare=False)
    pairs: tuple[PairAgreement, ...]
    alpha: float
    correction: str
    options: dict = field(default_factory=dict, compare=False)

    @property
    def disagreements(self) -> pa.Table:
        """The disagreement table of the first pair of methods."""
        return self.pairs[0].disagreements

    def summary(self) -> str:
        lines = [f"estimator comparison: {len(self.effects[self.methods[0]].sources)} sources x "
                 f"{len(self.effects[self.methods[0]].targets)} targets, methods {', '.join(self.methods)}; "
                 f"significance: sign-flip p < {self.alpha} after {self.correction}"]
        for p in self.pairs:
            lines += [
                f"{p.a} vs {p.b}: {p.n_pairs} pairs measured by both, {p.n_either} with |effect| > "
                f"{p.negligible:.3g} in either, {p.n_nonnegligible} in both",
                f"  sign agreement {_fmt(p.sign_agreement)} (both non-negligible), {_fmt(p.sign_agreement_all)} (all), "
                f"{_fmt(p.sign_agreement_significant)} (significant in both)",
                f"  Spearman {_fmt(p.spearman)}, Pearson {_fmt(p.pearson)} (all); "
                f"Spearman {_fmt(p.spearman_either)}, Pearson {_fmt(p.pearson_either)} (either non-negligible)",
                f"  relative error |a-b|/max(|a|,|b|): median {_fmt(p.rel_error_median)}, "
                f"90th percentile {_fmt(p.rel_error_p90)}",
                f"  significant in both {p.n_significant_both} (opposite signs {p.n_significant_opposite}), "
                f"only {p.a} {p.n_significant_only_a}, only {p.b} {p.n_significant_only_b}",
            ]
            if p.disagreements.num_rows:
                r = p.disagreements.slice(0, 1).to_pylist()[0]
                lines.append(f"  largest gap: {r['source_site']}:{r['source_feature']} -> "
                             f"{r['target_site']}:{r['target_feature']}  {p.a} {r['mean_a']:.4g}, "
                             f"{p.b} {r['mean_b']:.4g}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """JSON-serialisable summary (NaN becomes None)."""
        return {"methods": list(self.methods), "alpha": self.alpha, "correction": self.correction,
                "n_sources": len(self.effects[self.methods[0]].sources),
                "n_targets": len(self.effects[self.methods[0]].targets),
                "options": {k: _jsonable(v) for k, v in self.options.items()},
                "pairs": [p.as_dict() for p in self.pairs]}


def _fmt(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def effect_pvalues(eff: Effects) -> np.ndarray:
    """Two-sided p-values [n_sources, n_targets] from per-input values, by the build's default test
    (`jfig.stats.robust_pvalues`: sign-flip saddle-point tail and skewness-corrected t), with the
    input weights of each pair (per pair when inputs="target_active")."""
    if eff.per_input is None:
        raise JfigError("effect_pvalues needs per-input values (measure with keep_per_input=True)")
    p = robust_pvalues(eff.per_input, eff.weights)
    return np.where(np.isfinite(eff.mean), p, np.nan)


def relative_error(a, b) -> np.ndarray:
    """|a − b| / max(|a|, |b|), elementwise (0 where both are 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den = np.maximum(np.abs(a), np.abs(b))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, np.abs(a - b) / np.where(den > 0, den, 1.0), 0.0)


def _corr(fn, x, y) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(fn(x, y)[0])


def _share(mask) -> float:
    return float(np.mean(mask)) if np.size(mask) else float("nan")


def source_positions(model, saes: dict, eff: Effects, tokens, rows_needed: dict) -> dict:
    """{(source row, input index): position of the source's strongest activation} for the inputs
    in rows_needed {source row: [input indices]} (the clamp position with clamp_at="single")."""
    out = {}
    by_site: dict = {}
    for r, idx in rows_needed.items():
        by_site.setdefault(eff.sources[r][0], []).append((r, idx))
    for site, items in by_site.items():
        inputs = sorted({int(i) for _, idx in items for i in idx})
        acts = model.run(np.asarray(tokens)[inputs], capture=(site,), stop_at=site, logits=False).cache[site]
        f = np.asarray(saes[site].encode(acts))                    # [n_inputs, seq, d_sae]
        where = {i: k for k, i in enumerate(inputs)}
        for r, idx in items:
            feat = eff.sources[r][1]
            for i in idx:
                out[(r, int(i))] = int(np.argmax(f[where[int(i)], :, feat]))
    return out


def context_text(tokenizer, row, pos: int, width: int = CONTEXT_TOKENS) -> str:
    """Decoded tokens around `pos` of a token row [seq], the token at `pos` in [[ ]]."""
    row = [int(t) for t in row]
    lo, hi = max(0, pos - width), min(len(row), pos + width + 1)
    return (tokenizer.decode(row[lo:pos]) + "[[" + tokenizer.decode(row[pos:pos + 1]) + "]]"
            + tokenizer.decode(row[pos + 1:hi])).replace("\n", "\\n")


def top_gaps(ea: Effects, eb: Effects, top: int):
    """(rows, cols) of the `top` pairs with the largest |mean_a − mean_b|, largest first."""
    a, b = ea.mean.astype(np.float64), eb.mean.astype(np.float64)
    gap = np.where(np.isfinite(a) & np.isfinite(b), np.abs(a - b), -np.inf)
    k = int(min(top, np.isfinite(gap).sum()))
    return np.unravel_index(np.argsort(-gap, axis=None, kind="stable")[:k], gap.shape)


def worst_inputs(ea: Effects, eb: Effects, r: int, c: int, k: int = WORST_INPUTS):
    """The k input slots m of source row r whose per-input values for target c differ most: (m [k'], gap [k'])."""
    d = np.abs(ea.per_input[r, :, c].astype(np.float64) - eb.per_input[r, :, c])
    d = np.where(ea.input_weight[r] > 0, d, -np.inf)
    m = [int(i) for i in np.argsort(-d, kind="stable")[:k] if np.isfinite(d[i])]
    return m, [float(d[i]) for i in m]


def disagreement_table(ea: Effects, eb: Effects, pa_, pb_, top: int, contexts=None) -> pa.Table:
    """The `top` pairs with the largest |mean_a − mean_b|: both means, the relative error, both raw
    p-values and the inputs whose per-input values differ most (input index, gap, and the decoded
    context from `contexts` {(source row, input index): text} when given)."""
    rows, cols = top_gaps(ea, eb, top)
    out: dict = {n: [] for n in ("source_site", "source_feature", "target_site", "target_feature", "mean_a",
                                 "mean_b", "rel_error", "p_a", "p_b", "worst_inputs", "worst_gaps")}
    if contexts is not None:
        out["worst_contexts"] = []
    for r, c in zip(rows.tolist(), cols.tolist()):
        (s_site, s_feat), (t_site, t_feat) = ea.sources[r], ea.targets[c]
        ma, mb = float(ea.mean[r, c]), float(eb.mean[r, c])
        m, g = worst_inputs(ea, eb, r, c)
        idx = [int(ea.input_index[r, i]) for i in m]
        for name, v in (("source_site", s_site), ("source_feature", s_feat), ("target_site", t_site),
                        ("target_feature", t_feat), ("mean_a", ma), ("mean_b", mb),
                        ("rel_error", float(relative_error(ma, mb))), ("p_a", float(pa_[r, c])),
                        ("p_b", float(pb_[r, c])), ("worst_inputs", idx), ("worst_gaps", g)):
            out[name].append(v)
        if contexts is not None:
            out["worst_contexts"].append([contexts.get((r, i), "") for i in idx])
    types = {"source_feature": pa.int64(), "target_feature": pa.int64(), "worst_inputs": pa.list_(pa.int64()),
             "worst_gaps": pa.list_(pa.float64()), "worst_contexts": pa.list_(pa.string())}
    return pa.table({n: pa.array(v, type=types.get(n)) for n, v in out.items()})


def agreement(ea: Effects, eb: Effects, pa_, pb_, *, alpha: float, correction: str, negligible: float | None,
              top: int, contexts=None) -> PairAgreement:
    """PairAgreement of two Effects measured on the same inputs, with their raw p-values [S, T]."""
    a, b = ea.mean.astype(np.float64), eb.mean.astype(np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    av, bv = a[ok], b[ok]
    scale = float(np.max(np.abs(np.concatenate([av, bv])))) if av.size else 0.0
    tol = float(negligible) if negligible is not None else 1e-6 + 1e-3 * scale
    both = (np.abs(av) > tol) & (np.abs(bv) > tol)
    either = (np.abs(av) > tol) | (np.abs(bv) > tol)
    rel = relative_error(av[either], bv[either])
    qa, qb = adjust(np.where(ok, pa_, np.nan), correction), adjust(np.where(ok, pb_, np.nan), correction)
    sa, sb = (np.nan_to_num(qa, nan=1.0) < alpha) & ok, (np.nan_to_num(qb, nan=1.0) < alpha) & ok
    sig2 = sa & sb
    same = np.sign(a) == np.sign(b)
    return PairAgreement(
        a=ea.method, b=eb.method, n_pairs=int(ok.sum()), n_either=int(either.sum()), n_nonnegligible=int(both.sum()),
        negligible=tol,
        sign_agreement=_share(np.sign(av[both]) == np.sign(bv[both])),
        sign_agreement_all=_share(np.sign(av) == np.sign(bv)),
        sign_agreement_significant=_share(same[sig2]),
        spearman=_corr(sps.spearmanr, av, bv), pearson=_corr(sps.pearsonr, av, bv),
        spearman_either=_corr(sps.spearmanr, av[either], bv[either]),
        pearson_either=_corr(sps.pearsonr, av[either], bv[either]),
        rel_error_median=float(np.median(rel)) if rel.size else float("nan"),
        rel_error_p90=float(np.percentile(rel, 90)) if rel.size else float("nan"),
        n_significant_both=int(sig2.sum()), n_significant_only_a=int((sa & ~sb).sum()),
        n_significant_only_b=int((sb & ~sa).sum()), n_significant_opposite=int((sig2 & ~same).sum()),
        disagreements=disagreement_table(ea, eb, pa_, pb_, top, contexts))


def check_same_inputs(effects: dict) -> None:
    """Raise JfigError unless every method measured each source on the same inputs."""
    ref_name, ref = next(iter(effects.items()))
    for name, e in effects.items():
        wr, we = ref.input_weight > 0, e.input_weight > 0
        if not (np.array_equal(wr, we) and np.array_equal(np.where(wr, ref.input_index, -1),
                                                          np.where(we, e.input_index, -1))):
            bad = int(np.argmax((wr != we).any(-1) | (np.where(wr, ref.input_index, -1)
                                                      != np.where(we, e.input_index, -1)).any(-1)))
            raise JfigError(f"methods {ref_name!r} and {name!r} measured source {ref.sources[bad]} on different "
                            f"inputs ({ref.input_index[bad][wr[bad]].tolist()} vs {e.input_index[bad][we[bad]].tolist()}); "
                            "compare estimators only with the same seed, tokens and input options")


def compare_estimators(model, saes, sources, tokens, methods=("jacobian", "clamp"), *, targets=None,
                       inputs_per_source: int = 32, alpha: float = 0.01, correction: str = "bonferroni",
                       top: int = 20, seed: int = 0, negligible: float | None = None,
                       **measure_kwargs) -> EstimatorComparison:
    """Measure the same (source, target) pairs with several estimators on the same inputs and compare them.

    model, saes, sources, tokens [N, seq], targets: as for `measure_effects`; methods: two or more of
    its methods (every pair is compared, the first two first); measure_kwargs go to every
    `measure_effects` call (e.g. alphas, positions, read). negligible: |effect| at or below which a
    pair counts as zero for the sign agreement (default 1e-6 + 1e-3 × the largest |effect|).
    top: rows of each disagreement table (ranked by |mean_a − mean_b|, with decoded contexts around
    the clamped position when the model has a tokenizer).

    >>> cmp = compare_estimators(model, saes, {"blocks.6.hook_resid_post": [3, 17]}, tokens)
    >>> print(cmp.summary()); cmp.disagreements.to_pylist()[0]
    """
    methods = tuple(methods)
    if len(methods) < 2 or len(set(methods)) != len(methods):
        raise JfigError(f"compare_estimators needs two or more distinct methods, got {methods}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise JfigError(f"unknown method(s) {unknown}; expected some of {METHODS}")
    if correction not in CORRECTIONS:
        raise JfigError(f"unknown correction {correction!r}; expected one of {list(CORRECTIONS)}")
    if not 0 < alpha < 1:
        raise JfigError(f"alpha must be in (0, 1), got {alpha}")
    for reserved in ("method", "keep_per_input", "seed", "inputs_per_source", "targets"):
        if reserved in measure_kwargs:
            raise JfigError(f"{reserved!r} is set by compare_estimators; pass it as its own argument")
    saes = check_saes(model, saes)
    tokens = model.check_tokens(tokens)
    effects = {m: measure_effects(model, saes, sources, tokens, method=m, targets=targets,
                                  inputs_per_source=inputs_per_source, keep_per_input=True, seed=seed,
                                  **measure_kwargs) for m in methods}
    check_same_inputs(effects)
    pvals = {m: effect_pvalues(e) for m, e in effects.items()}
    pairs = list(itertools.combinations(methods, 2))
    contexts = None
    if model.tokenizer is not None and top > 0:
        need: dict = {}
        for a_name, b_name in pairs:   # inputs of the top pairs only: one short prefix run per source site
            ea, eb = effects[a_name], effects[b_name]
            for r, c in zip(*(x.tolist() for x in top_gaps(ea, eb, top))):
                need.setdefault(r, set()).update(int(ea.input_index[r, i]) for i in worst_inputs(ea, eb, r, c)[0])
        pos = source_positions(model, saes, effects[methods[0]], tokens, need)
        tok = np.asarray(tokens)
        contexts = {k: context_text(model.tokenizer, tok[k[1]], p) for k, p in pos.items()}
    out = tuple(agreement(effects[x], effects[y], pvals[x], pvals[y], alpha=alpha, correction=correction,
                          negligible=negligible, top=top, contexts=contexts) for x, y in pairs)
    return EstimatorComparison(methods=methods, effects=effects, pvalues=pvals, pairs=out, alpha=alpha,
                               correction=correction,
                               options=dict(inputs_per_source=inputs_per_source, seed=seed, top=top,
                                            **{k: v for k, v in measure_kwargs.items()
                                               if isinstance(v, (int, float, str, bool, type(None)))}))
