"""Do cheap metrics predict the causal graph? Each metric of a table of tested feature pairs against the
edges measured on those pairs, per edge kind:

- ROC AUC of edge against tested non-edge (a pair with no edge of any kind): the probability that an
  edge's metric exceeds a non-edge's (ties count one half), computed from the Mann–Whitney U
  statistic; its null is U's two-sided p-value (scipy.stats.mannwhitneyu), its 95 % interval
  DeLong's variance (placement values from ranks, so 10^6 pairs cost one sort).
- Spearman rank correlation of the metric with |weight| over the kind's edges (the measured pairs
  that passed), with scipy's p-value under no correlation; and, when the table has a `weight`
  column measured on every tested pair, over all of them.
- Precision at k: the share of edges among the k pairs with the largest metric (k = the number of
  edges by default: R-precision), ties shared out in proportion; its null is the base rate
  (edges / pairs), its p-value the hypergeometric tail.

A pair is matched to edges whichever way round it is given: a first-order edge through (source,
target), a gating hyperedge through (source, modulator). The table's rows are the tested pairs, so
a row that matches no edge is a tested non-edge. The module reads a graph's `edges` table only
(any object with one, or the pyarrow table itself), so it imports nothing above this layer.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats as sps

from ..errors import JfigError
from .rank import PAIR_COLUMNS, canonical_pairs, site_codes

EDGE_KINDS = ("excitatory", "inhibitory", "gating", "any")
PREDICTION_SCHEMA = pa.schema([
    ("metric", pa.string()), ("kind", pa.string()),
    ("n_pairs", pa.int64()),              # edges of the kind + tested non-edges with a finite metric
    ("n_edges", pa.int64()),
    ("base_rate", pa.float64()),          # n_edges / n_pairs: precision of a random order
    ("auc", pa.float64()), ("auc_lo", pa.float64()), ("auc_hi", pa.float64()), ("auc_p", pa.float64()),
    ("spearman", pa.float64()), ("spearman_p", pa.float64()), ("n_spearman", pa.int64()),
    ("spearman_tested", pa.float64()), ("spearman_tested_p", pa.float64()),   # over every tested pair ('any')
    ("k", pa.int64()), ("precision", pa.float64()), ("precision_p", pa.float64()),
    ("verdict", pa.string()),
])
MIN_EDGES = 5


def roc_auc(positive, negative) -> tuple[float, float, float, float]:
    """(AUC, 95 % lower, upper, two-sided Mann–Whitney p) of scores of edges `positive` against
    non-edges `negative`. AUC = U / (n_pos · n_neg); the interval is AUC ± 1.96 · DeLong's standard
    error, clipped to [0, 1]."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return (np.nan,) * 4
    res = sps.mannwhitneyu(pos, neg, alternative="two-sided", method="asymptotic" if m * n > 2500 else "auto")
    auc = float(res.statistic) / (m * n)
    both = sps.rankdata(np.concatenate([pos, neg]))
    v10 = (both[:m] - sps.rankdata(pos)) / n             # per edge: share of non-edges below it
    v01 = 1.0 - (both[m:] - sps.rankdata(neg)) / m       # per non-edge: share of edges above it
    var = (np.var(v10, ddof=1) / m if m > 1 else 0.0) + (np.var(v01, ddof=1) / n if n > 1 else 0.0)
    se = float(np.sqrt(max(var, 0.0)))
    return auc, max(auc - 1.96 * se, 0.0), min(auc + 1.96 * se, 1.0), float(res.pvalue)


def precision_at_k(scores, labels, k: int) -> tuple[float, float]:
    """(precision, hypergeometric p) of the k largest `scores` against boolean `labels`; a tie at the
    k-th value counts each tied pair's label in proportion to the places left."""
    s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
    n, n_pos = len(s), int(y.sum())
    k = int(min(max(k, 1), n))
    if n == 0:
        return np.nan, np.nan
    kth = np.partition(s, n - k)[n - k]
    above, tied = s > kth, s == kth
    hits = y[above].sum() + y[tied].sum() * (k - above.sum()) / tied.sum()
    p = float(sps.hypergeom.sf(int(round(hits)) - 1, n, n_pos, k))
    return float(hits / k), p


def verdict(auc_lo: float, auc_hi: float, n_edges: int, n_pairs: int, margin: float = 0.1) -> str:
    """'predicts' when the AUC interval lies above 0.5 + margin, 'weakly predicts' above 0.5,
    'predicts inversely' / 'weakly inverse' below, else 'no better than chance'."""
    if n_edges < MIN_EDGES or n_pairs - n_edges < MIN_EDGES or not np.isfinite(auc_lo):
        return "too few edges"
    if auc_lo > 0.5 + margin:
        return "predicts"
    if auc_lo > 0.5:
        return "weakly predicts"
    if auc_hi < 0.5 - margin:
        return "predicts inversely"
    if auc_hi < 0.5:
        return "weakly inverse"
    return "no better than chance"


def _column(table, name) -> np.ndarray:
    col = table[name]
    return np.asarray(col.to_numpy(zero_copy_only=False) if hasattr(col, "to_numpy") else col)


def edge_labels(table, edges) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({kind: [n_rows] bool}, {kind: [n_rows] max |weight|}): whether each pair of `table` (columns
    site_a, feature_a, site_b, feature_b) is an edge of each kind of `edges` (a graph's edge table), and
    the largest |weight| of its edges of that kind (0 where none). `edges` may be the graph itself."""
    edges = getattr(edges, "edges", edges)
    rows = canonical_pairs(*(_column(table, c) for c in PAIR_COLUMNS))
    kind = _column(edges, "kind").astype(str)
    gate = kind == "gating"
    mod_site = pc.fill_null(edges["modulator_site"], "").to_numpy(zero_copy_only=False).astype(object)
    mod = pc.fill_null(edges["modulator"], -1).to_numpy(zero_copy_only=False).astype(np.int64)
    other_site = np.where(gate, mod_site, _column(edges, "target_site").astype(object))
    other = np.where(gate, mod, _column(edges, "target").astype(np.int64))
    ekeys = canonical_pairs(_column(edges, "source_site").astype(object), _column(edges, "source").astype(np.int64),
                            other_site, other)
    n, m = len(rows[0]), len(ekeys[0])
    codes = site_codes(np.concatenate([rows[0], rows[2], ekeys[0], ekeys[2]]).astype(str))
    rk = np.stack([codes[:n], rows[1], codes[n:2 * n], rows[3]], axis=1).reshape(-1, 4)
    ek = np.stack([codes[2 * n:2 * n + m], ekeys[1], codes[2 * n + m:], ekeys[3]], axis=1).reshape(-1, 4)
    uniq, inv = np.unique(np.concatenate([rk, ek]), axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    row_id, edge_id = inv[:n], inv[n:]                  # a pair given twice reads the same edges twice
    w = np.abs(np.nan_to_num(_column(edges, "weight").astype(np.float64)))
    present, weight = {}, {}
    for k in EDGE_KINDS[:-1]:
        sel = kind == k
        hit, best = np.zeros(len(uniq), bool), np.zeros(len(uniq))
        hit[edge_id[sel]] = True
        np.maximum.at(best, edge_id[sel], w[sel])
        present[k], weight[k] = hit[row_id], best[row_id]
    present["any"] = np.logical_or.reduce([present[k] for k in EDGE_KINDS[:-1]])
    weight["any"] = np.maximum.reduce([weight[k] for k in EDGE_KINDS[:-1]])
    return present, weight


def metric_predictions(metrics_table, graph, *, metrics=None, kinds=EDGE_KINDS, k: int | None = None,
                       margin: float = 0.1) -> pa.Table:
    """How well each metric column of `metrics_table` (one row per tested pair: site_a, feature_a,
    site_b, feature_b, the metrics; optionally `weight`, the measured effect of every pair) predicts
    the edges of `graph` (an InteractionGraph, or its edges table), per edge kind. See the module
    docstring for each statistic and its null; `verdict` reads the AUC's interval with `margin`.
    metrics: the columns to score (default every numeric column but the pair columns and `weight`);
    k: precision at k (default: the number of edges of each kind). Returns PREDICTION_SCHEMA rows.
    """
    edges = getattr(graph, "edges", graph)
    names = list(metrics_table.column_names if hasattr(metrics_table, "column_names") else metrics_table)
    missing = [c for c in PAIR_COLUMNS if c not in names]
    if missing:
        raise JfigError(f"the metrics table lacks column(s) {missing}; it needs {list(PAIR_COLUMNS)} and metrics")
    if metrics is None:
        metrics = [c for c in names if c not in PAIR_COLUMNS + ("weight",)
                   and np.issubdtype(_column(metrics_table, c).dtype, np.number)]
    for c in metrics:
        if c not in names:
            raise JfigError(f"metric {c!r} is not a column of the metrics table ({names})")
    for kd in kinds:
        if kd not in EDGE_KINDS:
            raise JfigError(f"edge kind must be one of {EDGE_KINDS}, got {kd!r}")
    present, weight = edge_labels(metrics_table, edges)
    non_edge = ~present["any"]
    tested_w = np.abs(_column(metrics_table, "weight").astype(np.float64)) if "weight" in names else None
    rows = []
    for name in metrics:
        x = _column(metrics_table, name).astype(np.float64)
        ok = np.isfinite(x)
        for kd in kinds:
            pos = present[kd] & ok
            use = pos | (non_edge & ok)
            n_pairs, n_edges = int(use.sum()), int(pos.sum())
            auc, lo, hi, p_auc = roc_auc(x[pos], x[non_edge & ok])
            rho = p_rho = rho_t = p_t = np.nan
            if n_edges >= 3 and np.ptp(x[pos]) > 0 and np.ptp(weight[kd][pos]) > 0:
                rho, p_rho = sps.spearmanr(x[pos], weight[kd][pos])
            if kd == "any" and tested_w is not None:
                sel = ok & np.isfinite(tested_w)
                if sel.sum() >= 3 and np.ptp(x[sel]) > 0:
                    rho_t, p_t = sps.spearmanr(x[sel], tested_w[sel])
            kk = int(k) if k is not None else max(n_edges, 1)
            prec, p_prec = precision_at_k(x[use], pos[use], kk) if n_edges else (np.nan, np.nan)
            rows.append(dict(metric=name, kind=kd, n_pairs=n_pairs, n_edges=n_edges,
                             base_rate=n_edges / n_pairs if n_pairs else np.nan, auc=auc, auc_lo=lo, auc_hi=hi,
                             auc_p=p_auc, spearman=float(rho), spearman_p=float(p_rho), n_spearman=n_edges,
                             spearman_tested=float(rho_t), spearman_tested_p=float(p_t),
                             k=int(min(kk, n_pairs)), precision=prec, precision_p=p_prec,
                             verdict=verdict(lo, hi, n_edges, n_pairs, margin)))
    return pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)


def predictions_markdown(table: pa.Table) -> str:
    """The prediction table as markdown: one line per (metric, kind)."""
    head = ("| metric | kind | pairs | edges | AUC [95 % CI] | MWU p | Spearman (edges) | precision@k (base) | "
            "verdict |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in table.to_pylist():
        rho = "—" if r["spearman"] is None or not np.isfinite(r["spearman"]) else \
            f"{r['spearman']:+.3f} (p {r['spearman_p']:.2g})"
        auc = "—" if not np.isfinite(r["auc"]) else f"{r['auc']:.3f} [{r['auc_lo']:.3f}, {r['auc_hi']:.3f}]"
        p = "—" if not np.isfinite(r["auc_p"]) else f"{r['auc_p']:.2g}"
        prec = "—" if not np.isfinite(r["precision"]) else f"{r['precision']:.3f}@{r['k']} ({r['base_rate']:.3f})"
        lines.append(f"| {r['metric']} | {r['kind']} | {r['n_pairs']:,} | {r['n_edges']:,} | {auc} | {p} | {rho} | "
                     f"{prec} | {r['verdict']} |")
    return "\n".join(lines) + "\n"
