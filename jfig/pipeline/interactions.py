"""`jfig interactions --graph DIR`: the interaction metrics of a saved graph's feature pairs, ranked
(feature, feature, location) and drawn against location through the model.

Pairs. At each SAE site: the graph's gating hyperedges whose source and modulator share the site, then
the atlas's most co-active pairs among the graph's features there (without an atlas, every pair of its
most connected features), up to `pairs`. Across sites: the `edges` strongest first-order edges
(source, target). Same-site pairs get every metric (neurons and whole MLP, heads, distribution);
cross-site pairs, whose features never share a residual stream, the distribution metrics only.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data import tokens_from
from ..data.files import atomic_write_text
from ..errors import JfigError, SiteError
from ..interactions import (feature_distribution, first_reader, neuron_interactions, qk_terms, query_overlap,
                            rank_interactions)
from ..interactions.distribution import MAX_STATE
from ..interactions.rank import METRICS, PAIR_COLUMNS, plot_interactions
from ..sites import sort_sites
from .view import ViewSources, check_sources, load_parts

log = logging.getLogger(__name__)


@dataclass
class InteractionOptions:
    """What `jfig interactions` measures (command-line options)."""

    pairs: int = 128                    # same-site pairs per site (gating pairs first, then co-active)
    edges: int = 256                    # strongest first-order edges given the distribution metrics
    corpus: str = "default"             # text the data metrics run on
    n_tokens: int = 4096
    seq_len: int = 64
    batch_size: int = 8
    bins: int = 4                       # distribution bins (bin 0: inactive)
    offsets: tuple = (0, 1, 2, 4, 8)    # query - key positions of the QK terms
    per_pair: int = 3                   # strongest neurons / heads kept per pair
    top: int = 20                       # rows per metric in the report
    skip_positions: int = 1             # the sequence-start token (an attention sink) is left out

    def check(self) -> None:
        for name in ("pairs", "edges", "n_tokens", "seq_len", "batch_size", "per_pair", "top"):
            if getattr(self, name) < (0 if name == "edges" else 1):
                raise JfigError(f"--{name.replace('_', '-')} must be >= {0 if name == 'edges' else 1}, got "
                                f"{getattr(self, name)}")
        if self.bins < 2:
            raise JfigError(f"--bins must be >= 2 (bin 0 is 'inactive'), got {self.bins}")


@dataclass
class GraphPairs:
    """same_site: {site: [P, 2] feature ids}; cross: (site_a, feature_a, site_b, feature_b) columns."""

    same_site: dict
    cross: dict = field(default_factory=dict)


def _graph_features(graph, site: str) -> np.ndarray:
    nodes = graph.nodes.filter(pc.equal(graph.nodes["site"], site))
    return np.unique(nodes["feature"].to_numpy())


def _degree(graph, site: str, features: np.ndarray) -> np.ndarray:
    e = graph.edges
    ends = np.concatenate([e.filter(pc.equal(e[s], site))[f].to_numpy()
                           for s, f in (("source_site", "source"), ("target_site", "target"))])
    ids, counts = np.unique(ends, return_counts=True)
    if not len(features) or not len(ids):
        return np.zeros(len(features), np.int64)
    pos = np.minimum(np.searchsorted(ids, features), len(ids) - 1)
    return np.where(ids[pos] == features, counts[pos], 0)


def graph_pairs(graph, atlas, sites, *, pairs: int = 128, edges: int = 256) -> GraphPairs:
    """The pairs `jfig interactions` measures (module docstring), at `sites` (those with an SAE)."""
    e = graph.edges
    gate = e.filter(pc.and_(pc.equal(e["kind"], "gating"), pc.equal(e["source_site"], e["modulator_site"])))
    same = {}
    for site in sites:
        g = gate.filter(pc.equal(gate["source_site"], site))
        got = [tuple(sorted((int(a), int(b)))) for a, b in zip(g["source"].to_pylist(), g["modulator"].to_pylist())]
        feats = _graph_features(graph, site)
        if atlas is not None and site in atlas.sites and (site, site) in atlas.pairs and len(feats) > 1:
            idx = atlas.tracked_index(site, feats)
            feats = feats[idx >= 0]
            co = np.asarray(atlas.coactivation(site, site))[np.ix_(idx[idx >= 0], idx[idx >= 0])]
            co = np.triu(np.maximum(co, co.T), k=1)
            a, b = np.nonzero(co > 0)
            order = np.lexsort((b, a, -co[a, b]))
            got += [(int(feats[a[r]]), int(feats[b[r]])) for r in order[:pairs]]
        elif len(feats) > 1:
            n = max(2, int(math.ceil((1 + math.sqrt(1 + 8 * pairs)) / 2)))
            top = np.sort(feats[np.argsort(-_degree(graph, site, feats), kind="stable")[:n]])
            a, b = np.triu_indices(len(top), k=1)
            got += [(int(top[x]), int(top[y])) for x, y in zip(a, b)]
        uniq = list(dict.fromkeys(got))[:pairs]
        if uniq:
            same[site] = np.asarray(uniq, np.int64)
    first = e.filter(pc.and_(pc.not_equal(e["kind"], "gating"), pc.is_in(e["source_site"], pa.array(list(sites)))))
    first = first.filter(pc.is_in(first["target_site"], pa.array(list(sites))))
    first = first.take(pc.array_sort_indices(pc.abs(first["weight"]), order="descending")[:edges])
    cross = {c: first[s].to_numpy(zero_copy_only=False) for c, s in zip(
        PAIR_COLUMNS, ("source_site", "source", "target_site", "target"))}
    return GraphPairs(same, cross)


def _distribution_features(pairs: GraphPairs, bins: int) -> tuple[dict, dict, int]:
    """({site: ids}, distribution pair columns, bins) within the accumulator's size, cross pairs dropped
    (weakest first) and then bins lowered when all features would not fit."""
    rows = {c: [] for c in PAIR_COLUMNS}
    for site, p in pairs.same_site.items():
        for c, v in zip(PAIR_COLUMNS, ([site] * len(p), p[:, 0], [site] * len(p), p[:, 1])):
            rows[c] += list(v)
    n_same = len(rows["site_a"])
    for c in PAIR_COLUMNS:
        rows[c] += list(pairs.cross.get(c, []))

    def features(n_rows):
        feats: dict = {}
        for sa, fa, sb, fb in zip(*(rows[c][:n_rows] for c in PAIR_COLUMNS)):
            feats.setdefault(str(sa), set()).add(int(fa))
            feats.setdefault(str(sb), set()).add(int(fb))
        return {s: np.asarray(sorted(v), np.int64) for s, v in feats.items()}

    seen: set = set()
    grown = []                                     # distinct features after each row
    for sa, fa, sb, fb in zip(*(rows[c] for c in PAIR_COLUMNS)):
        seen.update(((str(sa), int(fa)), (str(sb), int(fb))))
        grown.append(len(seen))
    fits = [r + 1 for r, n in enumerate(grown) if n * bins <= MAX_STATE]
    n_rows = max(n_same, fits[-1] if fits else 0)
    feats = features(n_rows)
    n = sum(map(len, feats.values()))
    while bins > 2 and n * bins > MAX_STATE:
        bins -= 1
    if n * bins > MAX_STATE:
        return {}, {c: [] for c in PAIR_COLUMNS}, bins
    return feats, {c: np.asarray(rows[c][:n_rows]) for c in PAIR_COLUMNS}, bins


def graph_interactions(model, saes, graph, atlas, tokens, opts: InteractionOptions,
                       progress: bool = False) -> tuple[pa.Table, list[str]]:
    """(ranked table, notes): every metric of `graph_pairs` on `tokens`, ranked (rank_interactions)."""
    by_site = {s.site: s for s in saes}
    sites = [s for s in sort_sites(by_site) if s in set(graph.nodes["site"].to_pylist())]
    pairs = graph_pairs(graph, atlas, sites, pairs=opts.pairs, edges=opts.edges)
    notes, neurons, qk, overlaps, head_pairs = [], [], [], [], {}
    n_layers = model.config.n_layers
    for site, p in pairs.same_site.items():
        sae = by_site[site]
        weights = atlas.firing_rate(site) + 1e-6 if atlas is not None and site in atlas.sites else None
        try:
            if first_reader(site, "mlp") < n_layers:
                neurons.append(neuron_interactions(model, sae, p, tokens, batch_size=opts.batch_size,
                                                   skip_positions=opts.skip_positions, progress=progress))
            else:
                notes.append(f"{site}: no MLP reads it (the model has {n_layers} layers); no neuron metrics")
            if first_reader(site, "attn") < n_layers:
                feats = np.unique(p)
                offsets = [o for o in opts.offsets if abs(o) < min(model.config.max_seq_len, opts.seq_len)]
                qk.append(qk_terms(model, sae, feats, offsets=offsets, weights=weights))
                overlaps.append(query_overlap(model, sae, feats, offsets=offsets, weights=weights))
                head_pairs[site] = p
            else:
                notes.append(f"{site}: no attention reads it; no head metrics")
        except SiteError as err:
            notes.append(f"{site}: {err}")
    feats, dist_pairs, bins = _distribution_features(pairs, opts.bins)
    dist = None
    n_cross = len(pairs.cross.get("site_a", []))
    if feats:
        dist = feature_distribution(model, [by_site[s] for s in feats], tokens, feats, bins=bins, atlas=atlas,
                                    batch_size=opts.batch_size, skip_positions=opts.skip_positions, progress=progress)
        kept = len(dist_pairs["site_a"]) - sum(len(p) for p in pairs.same_site.values())
        if kept < n_cross or bins < opts.bins:
            notes.append(f"distribution: {kept} of {n_cross} first-order edges and {bins} bins fit the accumulator "
                         f"({MAX_STATE} features x bins)")
    elif pairs.same_site or n_cross:
        notes.append("distribution: too many features for the accumulator; no distribution metrics")
    table = rank_interactions(neurons=neurons, qk=qk, overlaps=overlaps, distribution=dist, pairs=head_pairs,
                              distribution_pairs=dist_pairs if dist is not None else None, atlas=atlas,
                              per_pair=opts.per_pair)
    n_same = sum(len(p) for p in pairs.same_site.values())
    notes.insert(0, f"{n_same} same-site pairs at {len(pairs.same_site)} site(s), {n_cross} first-order edges; "
                    f"{tokens.shape[0]} x {tokens.shape[1]} tokens")
    return table, notes


def report_markdown(table: pa.Table, notes: list[str], *, graph: str, top: int) -> str:
    """report.md: what was measured, then per metric its total score per location kind and layer and
    its `top` strongest interactions."""
    lines = [f"# Interactions of {graph}", "", *(f"- {n}" for n in notes), "",
             "Strength × frequency ranks the interactions of each metric (units differ between metrics; "
             "docs/interactions.md defines each).", ""]
    metric = table["metric"].to_numpy(zero_copy_only=False)
    rows = table.to_pylist()
    for m in [m for m in METRICS if m in set(metric)]:
        sel = [r for r, x in zip(rows, metric) if x == m]
        by_layer: dict = {}
        for r in sel:
            if r["score"] is not None and np.isfinite(r["score"]):
                by_layer[r["layer"]] = by_layer.get(r["layer"], 0.0) + r["score"]
        lines += [f"## {m} ({sel[0]['location']}; {len(sel):,} rows)", ""]
        if by_layer:
            lines += ["score by layer: " + ", ".join(f"{k}: {v:.4g}" for k, v in sorted(by_layer.items())), ""]
        lines += ["| rank | feature a | feature b | layer | index | strength | frequency | score |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sel[:top]:
            f = "—" if r["frequency"] is None or not np.isfinite(r["frequency"]) else f"{r['frequency']:.4f}"
            s = "—" if r["score"] is None or not np.isfinite(r["score"]) else f"{r['score']:.4g}"
            lines.append(f"| {r['rank']} | {r['site_a']}#{r['feature_a']} | {r['site_b']}#{r['feature_b']} | "
                         f"{r['layer']} | {r['index'] if r['index'] >= 0 else '—'} | {r['strength']:.4g} | {f} | {s} |")
        lines.append("")
    return "\n".join(lines)


def run_interactions(src: ViewSources, out=None, opts: InteractionOptions | None = None,
                     progress: bool = False) -> tuple[Path, pa.Table]:
    """Measure, rank and draw the interactions of a saved graph's pairs; write OUT/interactions.parquet,
    OUT/interactions.png and OUT/report.md (OUT default: `interactions` beside the graph folder)."""
    opts = opts or InteractionOptions()
    opts.check()
    graph_dir = check_sources(src)
    if src.model is None:
        raise JfigError("jfig interactions reads the model's weights and runs it on text; pass --model")
    out = Path(out) if out is not None else graph_dir.resolve().parent / "interactions"
    if out.exists() and not out.is_dir():
        raise JfigError(f"--out {out} is a file; give a folder")
    if not out.parent.exists():
        raise JfigError(f"the folder of --out ({out.parent}) does not exist")
    graph, kwargs, model, saes = load_parts(src, need_saes=True)
    if getattr(model, "apply_fn", None) is not None:
        raise JfigError("jfig interactions reads the model's weights: it needs a built-in model (GPT-2, Llama, "
                        "Gemma-2)")
    tokens = tokens_from(opts.corpus, model, opts.seq_len, max_tokens=opts.n_tokens)
    table, notes = graph_interactions(model, saes, graph, kwargs["atlas"], tokens, opts, progress=progress)
    if kwargs["atlas"] is None:
        notes.append("no atlas: weight-only rows have no frequency (score NaN); pass --atlas")
    out.mkdir(exist_ok=True)
    tmp = out / "interactions.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(out / "interactions.parquet")
    plot_interactions(table, out / "interactions.png", title=f"interactions of {graph_dir.name}")
    atomic_write_text(out / "report.md", report_markdown(table, notes, graph=str(graph_dir), top=opts.top))
    for n in notes:
        log.info("%s", n)
    return out, table
