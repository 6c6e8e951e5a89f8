"""The ranked list of interactions: (feature, feature, location) triples, where the location is an MLP
neuron, an attention head or a whole layer, ranked by strength × frequency; and the figure of
interaction strength against location through the model.

Each metric result of this package becomes rows of one table (RANK_SCHEMA):

    metric           location  strength (per row)                                      needs data
    neuron_error     neuron    mean |e_m|·||W_down[m]|| where both fire                 yes
    neuron_expected  neuron    E[(a_j̃ / a_ĩ)·|s_ijm|] where both fire                   yes
    neuron_ratio     neuron    |s_ijm| (weights only; used when there is no data pass)   no
    mlp_error        layer     mean ||Σ_m e_m W_down[m]|| where both fire               yes
    hadamard         layer     ||v_i ⊙ v_j||                                             no
    qk_interaction   head      max over offsets and both query/key orders of |I_h(i, j)| no
    query_overlap    head      max over offsets of |overlap_h(i, j)|                     no
    mi               layer     binned mutual information, bias-corrected (nats)          yes
    corr             layer     |correlation| of the activations                          yes

frequency is the share of tokens on which both features fire: the data pass's own count where the
metric has one (neuron metrics with tokens), else the atlas's co-activation count over its tokens
(NaN where the atlas holds no statistics for the pair). score = strength × frequency: how much the
interaction matters on the data, not only how strong it is when it happens. Strengths of different
metrics are in different units, so rows are ranked within their metric (`rank`), and the table lists
metrics in the order above, each sorted by score (rows without a score last, by strength).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure

from ..errors import JfigError, ShapeError
from ..sites import parse_site, site_key

LOCATIONS = ("neuron", "head", "layer")
METRIC_LOCATIONS = {"neuron_error": "neuron", "neuron_expected": "neuron", "neuron_ratio": "neuron",
                    "mlp_error": "layer", "hadamard": "layer", "qk_interaction": "head", "query_overlap": "head",
                    "mi": "layer", "corr": "layer"}
METRICS = tuple(METRIC_LOCATIONS)
PAIR_COLUMNS = ("site_a", "feature_a", "site_b", "feature_b")
RANK_SCHEMA = pa.schema([
    ("site_a", pa.string()), ("feature_a", pa.int64()), ("site_b", pa.string()), ("feature_b", pa.int64()),
    ("metric", pa.string()),          # one of METRICS
    ("location", pa.string()),        # 'neuron' | 'head' | 'layer'
    ("layer", pa.int64()),            # the layer of the MLP / attention (distribution: the later site's layer)
    ("index", pa.int64()),            # neuron or head; -1 for a layer
    ("strength", pa.float64()),
    ("frequency", pa.float64()),      # share of tokens where both fire (NaN: unknown)
    ("score", pa.float64()),          # strength x frequency
    ("rank", pa.int64()),             # 1 = the highest score of its metric
])


def pair_frequency(atlas, site_a, feature_a, site_b, feature_b) -> np.ndarray:
    """[P] share of the atlas's tokens on which both features of each pair fire (its co-activation
    count over n_tokens, either site order); NaN where the atlas has no statistics for the pair."""
    sa, sb = np.asarray(site_a, object), np.asarray(site_b, object)
    fa, fb = np.asarray(feature_a, np.int64), np.asarray(feature_b, np.int64)
    out = np.full(len(fa), np.nan)
    if atlas is None or not len(fa):
        return out
    for a, b in {(str(x), str(y)) for x, y in zip(sa, sb)}:
        rows = np.flatnonzero((sa == a) & (sb == b))
        first, second = (a, b) if site_key(a) <= site_key(b) else (b, a)
        if (first, second) not in atlas.pairs:
            continue
        fi, fj = (fa[rows], fb[rows]) if first == a else (fb[rows], fa[rows])
        ti, tj = atlas.tracked_index(first, fi), atlas.tracked_index(second, fj)
        ok = (ti >= 0) & (tj >= 0)
        co = np.asarray(atlas.coactivation(first, second))
        counts = co[ti[ok], tj[ok]].astype(np.float64)
        if first == second:                       # same-site counts may be kept on one side of the diagonal
            counts = np.maximum(counts, co[tj[ok], ti[ok]])
        out[rows[ok]] = counts / max(atlas.n_tokens, 1)
    return out


def _rows(metric, site_a, fa, site_b, fb, layer, index, strength, frequency) -> dict:
    n = len(strength)
    strength = np.asarray(strength, np.float64)
    frequency = np.broadcast_to(np.asarray(frequency, np.float64), (n,))
    return dict(site_a=np.broadcast_to(np.asarray(site_a, object), (n,)), feature_a=np.asarray(fa, np.int64),
                site_b=np.broadcast_to(np.asarray(site_b, object), (n,)), feature_b=np.asarray(fb, np.int64),
                metric=np.full(n, metric, object), location=np.full(n, METRIC_LOCATIONS[metric], object),
                layer=np.broadcast_to(np.asarray(layer, np.int64), (n,)), index=np.asarray(index, np.int64),
                strength=strength, frequency=frequency, score=strength * frequency)


def _top_per_pair(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(pair rows, columns) of the k largest finite entries of each row of values [P, F], NaN skipped."""
    v = np.where(np.isnan(values), -np.inf, values)
    k = min(k, v.shape[1])
    cols = np.argpartition(-v, k - 1, axis=1)[:, :k] if k < v.shape[1] else np.tile(np.arange(v.shape[1]),
                                                                                   (len(v), 1))
    rows = np.repeat(np.arange(len(v)), cols.shape[1])
    cols = cols.reshape(-1)
    keep = np.isfinite(v[rows, cols])
    return rows[keep], cols[keep]


def neuron_rows(n, atlas=None, per_pair: int = 3) -> list[dict]:
    """Rows of a NeuronInteractions: per pair, its `per_pair` strongest neurons by each neuron metric,
    and the layer rows (mlp_error, hadamard)."""
    fa, fb = n.pairs[:, 0], n.pairs[:, 1]
    data = n.neuron_error is not None
    freq = n.cooccurrence if data else pair_frequency(atlas, [n.site] * len(fa), fa, [n.site] * len(fa), fb)
    out = []
    per_neuron = (("neuron_error", n.neuron_error), ("neuron_expected", n.expected)) if data else \
        (("neuron_ratio", np.abs(n.ratio)),)
    for metric, values in per_neuron:
        r, c = _top_per_pair(np.asarray(values, np.float64), per_pair)
        out.append(_rows(metric, n.site, fa[r], n.site, fb[r], n.layer, c, values[r, c], freq[r]))
    layer_metrics = (("mlp_error", n.error),) if data else ()
    for metric, values in layer_metrics + (("hadamard", n.hadamard),):
        ok = np.isfinite(values)
        out.append(_rows(metric, n.site, fa[ok], n.site, fb[ok], n.layer, np.full(ok.sum(), -1), values[ok],
                         freq[ok]))
    return out


def _positions(ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    order = np.argsort(ids)
    pos = np.searchsorted(ids, wanted, sorter=order)
    pos = order[np.minimum(pos, len(ids) - 1)]
    if (ids[pos] != wanted).any():
        raise JfigError(f"pair feature {int(wanted[ids[pos] != wanted][0])} is not among the {what}")
    return pos


def _site_pairs(pairs, site: str, default: np.ndarray) -> np.ndarray:
    if pairs is None:
        a, b = np.triu_indices(len(default), k=1)
        return np.stack([default[a], default[b]], axis=1)
    p = np.asarray(pairs[site] if isinstance(pairs, dict) else pairs, np.int64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ShapeError(f"pairs at {site} must have shape [n_pairs, 2], got {p.shape}")
    return p


def head_rows(terms=None, overlap=None, pairs=None, atlas=None, per_pair: int = 3) -> list[dict]:
    """Rows of a QKTerms (qk_interaction) and/or a QueryOverlap (query_overlap): per pair, its
    `per_pair` strongest heads. `pairs` [P, 2] (or {site: [P, 2]}); default every pair of the query
    features (for QK terms, both features must be among the queries and the keys)."""
    out = []
    if terms is not None:
        p = _site_pairs(pairs, terms.site, np.intersect1d(terms.queries, terms.keys))
        qa, qb = _positions(terms.queries, p[:, 0], "query features"), _positions(terms.queries, p[:, 1],
                                                                                   "query features")
        ka, kb = _positions(terms.keys, p[:, 0], "key features"), _positions(terms.keys, p[:, 1], "key features")
        inter = np.abs(np.asarray(terms.interaction, np.float64))                       # [R, H, n_q, n_k]
        s = np.maximum(inter[:, :, qa, kb], inter[:, :, qb, ka]).max(axis=0).T          # [P, H]
        out.append(_pair_head_rows("qk_interaction", terms.site, terms.layer, p, s, atlas, per_pair))
    if overlap is not None:
        p = _site_pairs(pairs, overlap.site, np.asarray(overlap.queries))
        a, b = _positions(overlap.queries, p[:, 0], "query features"), _positions(overlap.queries, p[:, 1],
                                                                                  "query features")
        s = np.abs(np.asarray(overlap.overlap, np.float64))[:, :, a, b].max(axis=0).T    # [P, H]
        out.append(_pair_head_rows("query_overlap", overlap.site, overlap.layer, p, s, atlas, per_pair))
    return out


def _pair_head_rows(metric, site, layer, p, s, atlas, per_pair) -> dict:
    freq = pair_frequency(atlas, [site] * len(p), p[:, 0], [site] * len(p), p[:, 1])
    r, c = _top_per_pair(s, per_pair)
    return _rows(metric, site, p[r, 0], site, p[r, 1], layer, c, s[r, c], freq[r])


def distribution_rows(dist, pairs=None, atlas=None) -> list[dict]:
    """Rows of a FeatureDistribution (mi: bias-corrected binned MI; corr: |correlation|) for `pairs`, a
    table or dict with columns site_a, feature_a, site_b, feature_b (default: every pair of its features)."""
    if pairs is None:
        a, b = np.triu_indices(len(dist.features), k=1)
    else:
        cols = {c: np.asarray(pairs[c]) for c in PAIR_COLUMNS}
        key = {(s, int(f)): r for r, (s, f) in enumerate(zip(dist.sites, dist.features))}
        a = np.asarray([key.get((str(s), int(f)), -1) for s, f in zip(cols["site_a"], cols["feature_a"])], np.int64)
        b = np.asarray([key.get((str(s), int(f)), -1) for s, f in zip(cols["site_b"], cols["feature_b"])], np.int64)
        if (a < 0).any() or (b < 0).any():
            r = int(np.flatnonzero((a < 0) | (b < 0))[0])
            raise JfigError(f"pair {cols['site_a'][r]}#{cols['feature_a'][r]}, {cols['site_b'][r]}#"
                            f"{cols['feature_b'][r]} is not tracked by the distribution")
    sites = np.asarray(dist.sites, object)
    sa, sb, fa, fb = sites[a], sites[b], dist.features[a], dist.features[b]
    layer = np.maximum([parse_site(s).layer for s in sa], [parse_site(s).layer for s in sb]) if len(a) else []
    freq = pair_frequency(atlas, sa, fa, sb, fb)
    out = []
    for metric, values in (("mi", dist.mi_corrected[a, b]), ("corr", np.abs(dist.corr[a, b]))):
        ok = np.isfinite(values)
        out.append(_rows(metric, sa[ok], fa[ok], sb[ok], fb[ok], np.asarray(layer, np.int64)[ok],
                         np.full(ok.sum(), -1), values[ok], freq[ok]))
    return out


def rank_interactions(*, neurons=(), qk=(), overlaps=(), distribution=None, pairs=None, distribution_pairs=None,
                      atlas=None, per_pair: int = 3) -> pa.Table:
    """One table (RANK_SCHEMA) of every interaction the given metric results hold, ranked by
    strength × frequency within each metric.

    neurons: NeuronInteractions (one per SAE and layer); qk: QKTerms; overlaps: QueryOverlap;
    distribution: a FeatureDistribution. pairs: the pairs the head metrics report ({site: [P, 2]} or
    [P, 2]); distribution_pairs: those the distribution reports (a table or dict with columns site_a,
    feature_a, site_b, feature_b); default every pair of their features. atlas: the frequency of rows
    without a data-pass count.
    per_pair: the strongest neurons (heads) kept per pair and metric.

    >>> table = rank_interactions(neurons=[jfig.neuron_interactions(model, sae, pairs, tokens)], atlas=atlas)
    >>> table.column_names[:5]
    ['site_a', 'feature_a', 'site_b', 'feature_b', 'metric']
    """
    if per_pair < 1:
        raise JfigError(f"per_pair must be >= 1, got {per_pair}")
    parts = []
    for n in neurons:
        parts += neuron_rows(n, atlas, per_pair)
    for t in qk:
        parts += head_rows(terms=t, pairs=pairs, atlas=atlas, per_pair=per_pair)
    for o in overlaps:
        parts += head_rows(overlap=o, pairs=pairs, atlas=atlas, per_pair=per_pair)
    if distribution is not None:
        parts += distribution_rows(distribution, distribution_pairs, atlas)
    parts = [p for p in parts if len(p["strength"])]
    if not parts:
        return RANK_SCHEMA.empty_table()
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    m = np.asarray([METRICS.index(x) for x in cols["metric"]])
    score = np.where(np.isnan(cols["score"]), -np.inf, cols["score"])
    order = np.lexsort((-cols["strength"], -score, m))
    cols = {k: v[order] for k, v in cols.items()}
    m = m[order]
    start = np.searchsorted(m, m, side="left")
    cols["rank"] = np.arange(len(m)) - start + 1
    return pa.Table.from_pydict({k: cols[k] for k in RANK_SCHEMA.names}, schema=RANK_SCHEMA)


def site_codes(sites) -> np.ndarray:
    """[n] int: each site's position in forward order among the sites named (vectorised site_key)."""
    sites = np.asarray(sites, object).astype(str)
    uniq, inv = np.unique(sites, return_inverse=True)
    order = sorted(range(len(uniq)), key=lambda i: (site_key(str(uniq[i])), str(uniq[i])))
    code = np.empty(len(uniq), np.int64)
    code[order] = np.arange(len(uniq))
    return code[inv].reshape(-1) if len(sites) else np.zeros(0, np.int64)


def canonical_pairs(site_a, feature_a, site_b, feature_b):
    """The four columns with each pair's two features in forward order (site, then id): a pair reads
    the same whichever way it was given."""
    sa, sb = np.asarray(site_a, object), np.asarray(site_b, object)
    fa, fb = np.asarray(feature_a, np.int64), np.asarray(feature_b, np.int64)
    codes = site_codes(np.concatenate([sa, sb]))                # one coding for both columns
    ca, cb = codes[:len(sa)], codes[len(sa):]
    swap = (ca > cb) | ((ca == cb) & (fa > fb))
    return (np.where(swap, sb, sa), np.where(swap, fb, fa), np.where(swap, sa, sb), np.where(swap, fa, fb))


def pair_summary(table: pa.Table, value: str = "strength", how: str = "max") -> pa.Table:
    """One row per pair (features in forward order) and one column per metric present: the largest
    (how="max") or summed (how="sum") `value` ("strength" or "score") over the pair's locations; NaN where
    the pair has no row of that metric."""
    if value not in ("strength", "score"):
        raise JfigError(f"value must be 'strength' or 'score', got {value!r}")
    if how not in ("max", "sum"):
        raise JfigError(f"how must be 'max' or 'sum', got {how!r}")
    sa, fa, sb, fb = canonical_pairs(*(table[c].to_numpy(zero_copy_only=False) for c in PAIR_COLUMNS))
    codes = site_codes(np.concatenate([sa, sb]))
    key = np.stack([codes[:len(sa)], fa, codes[len(sa):], fb], axis=1).reshape(-1, 4)
    uniq, first, idx = np.unique(key, axis=0, return_index=True, return_inverse=True)    # forward order
    idx = idx.reshape(-1)
    out = dict(site_a=sa[first], feature_a=fa[first], site_b=sb[first], feature_b=fb[first])
    metric = table["metric"].to_numpy(zero_copy_only=False)
    vals = table[value].to_numpy(zero_copy_only=False).astype(np.float64)
    for m in [m for m in METRICS if m in set(metric)]:
        sel = (metric == m) & np.isfinite(vals)
        col = np.full(len(uniq), -np.inf if how == "max" else 0.0)
        (np.maximum if how == "max" else np.add).at(col, idx[sel], vals[sel])
        seen = np.zeros(len(uniq), bool)
        seen[idx[sel]] = True
        out[m] = np.where(seen, col, np.nan)
    return pa.Table.from_pydict(out)


def plot_interactions(table: pa.Table, path=None, *, top: int = 300, title: str | None = None) -> Figure:
    """Interaction strength against location through the model: one panel per metric, x the layer
    (neurons and heads spread across their layer's width by index), y the score (strength × frequency;
    the strength where no frequency is known), the `top` rows of each metric as points coloured by
    their first feature, and each layer's summed score as a bar behind them. Writes a PNG when `path`
    is given; returns the figure (matplotlib's object API, no pyplot state)."""
    metric = table["metric"].to_numpy(zero_copy_only=False)
    present = [m for m in METRICS if m in set(metric)]
    fig = Figure(figsize=(10, 1.0 + 2.2 * max(len(present), 1)), layout="constrained")
    axes = fig.subplots(max(len(present), 1), 1, squeeze=False)[:, 0]
    if not present:
        axes[0].text(0.5, 0.5, "no interactions", ha="center", va="center", transform=axes[0].transAxes)
    cols = {c: table[c].to_numpy(zero_copy_only=False) for c in ("layer", "index", "strength", "score",
                                                                   "site_a", "feature_a")}
    palette = [f"C{i}" for i in range(10)]
    layers = np.maximum(cols["layer"], 0)
    xlim = (max(int(layers.min()) - 0.2, 0), int(layers.max()) + 1.2) if len(layers) else (0, 1)
    for ax, m in zip(axes, present):
        sel = np.flatnonzero(metric == m)
        y = np.where(np.isfinite(cols["score"][sel]), cols["score"][sel], cols["strength"][sel])
        keep = np.isfinite(y) & (y > 0)
        sel, y = sel[keep], y[keep]
        if not len(sel):
            ax.set_title(f"{m}: no positive values", fontsize=9)
            continue
        layer, index = np.maximum(cols["layer"][sel], 0), cols["index"][sel]
        width = max(int(index.max()) + 1, 1)
        x = layer + np.where(index >= 0, (index + 0.5) / width, 0.5)
        totals = np.bincount(layer, weights=y)
        used = np.flatnonzero(totals > 0)
        ax.bar(used + 0.5, totals[used], width=0.9, color="0.85", label="sum over the layer", zorder=1)
        best = np.argsort(-y, kind="stable")[:top]
        feats = [f"{a}#{f}" for a, f in zip(cols["site_a"][sel[best]], cols["feature_a"][sel[best]])]
        colour = {f: palette[i % len(palette)] for i, f in enumerate(dict.fromkeys(feats))}
        ax.scatter(x[best], y[best], s=12, c=[colour[f] for f in feats], zorder=2,
                   label=f"top {len(best)} (colour: first feature)")
        ax.set_yscale("log")
        scored = np.isfinite(cols["score"][sel]).any()
        ax.set_ylabel(f"{m}\n{'strength × freq.' if scored else 'strength'}", fontsize=8)
        ax.set_xlim(*xlim)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1].set_xlabel("layer (neurons and heads placed across the layer by index)")
    if title:
        fig.suptitle(title, fontsize=10)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig
