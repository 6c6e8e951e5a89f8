"""Two graphs compared edge by edge: gained, lost, sign-flipped, strengthened, weakened or the same.

An edge is identified by (source, target, modulator, positions): the kind's sign is what can flip.
Graphs built with the same SAEs (on two models, two corpora or two sets of options) line up feature
by feature. Graphs of different SAEs (retrained, wider, or trained after a fine-tune) line up through
a matching of their features (site -> A id -> B id, e.g. from ``jfig.saes.match_features``): an edge
of A is the edge of B between the matched features, and an edge touching a feature with no match
has no counterpart and is counted as "unmatched". Without a matching, graphs whose SAEs differ in
width at a shared site cannot be compared, and are refused.

A build measures only some sources (the most important features of its model and SAEs), so an edge
of A can be absent from B because B measured its source and found no edge, or because B never
measured that source. Given the sources each build measured (``measured=``), the second kind is
counted as "untested" instead of lost (or gained): its absence says nothing about the interaction.

This module runs no model: the matching is computed beforehand and passed in.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import JfigError, OptionError

STATUSES = ("same", "gained", "lost", "flipped", "strengthened", "weakened", "unmatched", "untested")
KEY_COLUMNS = ("source_site", "source", "target_site", "target", "modulator_site", "modulator", "positions")
ENDPOINTS = (("source_site", "source"), ("target_site", "target"), ("modulator_site", "modulator"))
TABLE_SCHEMA = pa.schema([
    ("source_site", pa.string()), ("source", pa.int64()), ("target_site", pa.string()), ("target", pa.int64()),
    ("modulator_site", pa.string()), ("modulator", pa.int64()), ("positions", pa.string()), ("status", pa.string()),
    ("kind_a", pa.string()), ("kind_b", pa.string()), ("weight_a", pa.float64()), ("weight_b", pa.float64()),
    ("p_value_a", pa.float64()), ("p_value_b", pa.float64()), ("source_b", pa.int64()), ("target_b", pa.int64()),
    ("modulator_b", pa.int64()), ("similarity", pa.float64()), ("change", pa.float64())])


@dataclass(frozen=True, eq=False)
class GraphDiff:
    """``table``: one row per edge of either graph: the key columns (feature ids in A's numbering),
    ``status`` (one of STATUSES), ``kind_a``/``kind_b``, ``weight_a``/``weight_b`` and
    ``p_value_a``/``p_value_b`` (null where absent), ``source_b``/``target_b``/``modulator_b`` (the
    same features in B's numbering), ``similarity`` (the least match similarity of the edge's
    features; 1 where the SAEs are the same) and ``change`` (weight_b - weight_a, an absent edge
    counting 0; null on unmatched and untested rows). ``counts``: rows per status (the four base
    statuses, the strength ones when a ratio was given, "unmatched" when a matching was, "untested"
    when the measured sources were); ``notes``: what the
    comparison could not line up (sites in one graph only, SAEs whose fingerprints differ, duplicate
    keys, features left unmatched)."""

    table: pa.Table
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)
    ratio: float | None = None

    def summary(self) -> str:
        c = self.counts
        parts = [f"{c['same']} same", f"{c['gained']} gained", f"{c['lost']} lost", f"{c['flipped']} sign-flipped"]
        if "strengthened" in c:
            parts += [f"{c['strengthened']} strengthened", f"{c['weakened']} weakened (by more than x{self.ratio:g})"]
        if "unmatched" in c:
            parts.append(f"{c['unmatched']} touching unmatched features")
        if "untested" in c:
            parts.append(f"{c['untested']} whose source the other build did not measure")
        return ", ".join(parts) + f" ({self.table.num_rows} edges in either graph)"

    def most_changed(self, n: int = 20, *, min_similarity: float = 0.9) -> pa.Table:
        """The `n` rows whose weight changed most (|weight_b - weight_a|, an absent edge counting 0)
        among the edges whose features all matched with similarity >= `min_similarity`: interactions
        that changed while their features did not."""
        if int(n) < 0:
            raise OptionError(f"n must be >= 0 rows, got {n}")
        t = self.table
        keep = pc.and_(pc.invert(pc.is_in(t["status"], pa.array(["unmatched", "untested"]))),
                       pc.greater_equal(t["similarity"], min_similarity))
        rows = np.flatnonzero(keep.fill_null(False).to_numpy(zero_copy_only=False))
        change = np.abs(t["change"].to_numpy(zero_copy_only=False)[rows])
        return t.take(rows[np.argsort(-change, kind="stable")[:int(n)]])


def sae_widths(graph) -> dict[str, int]:
    """{site: features of its SAE}: from the manifest, else one more than the largest node id."""
    out = {s["site"]: int(s["d_sae"]) for s in graph.manifest.get("saes", []) if s.get("d_sae") is not None}
    sites, ids = graph.nodes["site"].to_pylist(), graph.nodes["feature"].to_numpy(zero_copy_only=False)
    for site in set(sites) - set(out):
        out[site] = int(ids[np.asarray(sites, object) == site].max()) + 1
    return out


def sae_notes(a, b, matched=()) -> list[str]:
    """What differs between the SAEs of two graphs' manifests; JfigError when a shared site's SAEs
    have different widths and no matching (`matched`: sites) lines them up."""
    sa = {s["site"]: s for s in a.manifest.get("saes", [])}
    sb = {s["site"]: s for s in b.manifest.get("saes", [])}
    notes = []
    for site in sorted((set(sa) & set(sb)) - set(matched)):
        if sa[site].get("d_sae") != sb[site].get("d_sae"):
            raise JfigError(f"the graphs' SAEs at {site} differ in width ({sa[site].get('d_sae')} vs "
                            f"{sb[site].get('d_sae')} features): compare graphs built with the same SAEs, or "
                            f"pass a matching of their features")
        fa, fb = sa[site].get("fingerprint"), sb[site].get("fingerprint")
        if fa and fb and fa != fb:
            notes.append(f"the SAEs at {site} have different weights (fingerprints {fa} and {fb}): the same "
                         f"feature id may not be the same feature")
    nodes_a, nodes_b = set(a.nodes["site"].to_pylist()), set(b.nodes["site"].to_pylist())
    for name, only in (("A", nodes_a - nodes_b), ("B", nodes_b - nodes_a)):
        if only:
            notes.append(f"sites only in graph {name}: {sorted(only)}; their edges count as "
                         f"{'lost' if name == 'A' else 'gained'}")
    return notes


def edge_frame(graph) -> tuple[dict[tuple, int], list[str]]:
    """{key: row} of a graph's edges (the strongest row where a key repeats) and notes on repeats."""
    cols = {c: graph.edges[c].to_pylist() for c in KEY_COLUMNS}
    weight = np.abs(graph.edges["weight"].to_numpy(zero_copy_only=False))
    rows: dict[tuple, int] = {}
    repeats = 0
    for r in range(graph.n_edges):
        key = tuple(cols[c][r] for c in KEY_COLUMNS)
        if key in rows:
            repeats += 1
            if weight[r] <= weight[rows[key]]:
                continue
        rows[key] = r
    notes = [f"{repeats} edge rows repeat a (source, target, modulator, positions) key; the strongest is compared"] \
        if repeats else []
    return rows, notes


# ------------------------------------------------------------------------------ feature matchings

@dataclass(frozen=True)
class SiteMap:
    """One site's matching: ``fwd [d_a]`` (A id -> B id, -1 unmatched), ``inv [d_b]`` (B id -> A id),
    ``sim_a [d_a]`` / ``sim_b [d_b]`` (the pair's similarity; 1 for a plain mapping)."""

    fwd: np.ndarray
    inv: np.ndarray
    sim_a: np.ndarray
    sim_b: np.ndarray


def _forward(value, site: str, d_a: int | None, d_b: int | None):
    """(fwd [d_a] int64, similarity [d_a], d_b) from a FeatureMatching-like object (``match``,
    ``similarity``, ``d_sae_b``), a {A id: B id} mapping, or an array [d_a] of B ids (-1: none)."""
    if hasattr(value, "match"):
        fwd = np.asarray(value.match, np.int64)
        sim = np.asarray(getattr(value, "similarity", np.ones(len(fwd))), np.float64)
        width_b = getattr(value, "d_sae_b", None)
        if width_b is not None and d_b is not None and int(width_b) != d_b:
            raise JfigError(f"the matching at {site} was made for a B SAE of {width_b} features, but graph B's SAE "
                            f"there has {d_b}")
        d_b = int(width_b) if width_b is not None else d_b
    elif isinstance(value, Mapping):
        keys = np.asarray(list(value), np.int64)
        vals = np.asarray(list(value.values()), np.int64)
        if len(keys) and (keys.min() < 0 or (d_a is not None and keys.max() >= d_a)):
            bad = keys[(keys < 0) | (keys >= (d_a if d_a is not None else np.inf))][0]
            raise JfigError(f"the matching at {site} names A feature {bad}, outside graph A's SAE there "
                            f"(0..{(d_a or 0) - 1})")
        width_a = d_a if d_a is not None else int(keys.max(initial=-1)) + 1
        fwd = np.full(width_a, -1, np.int64)
        fwd[keys] = vals
        if (vals < 0).any():
            raise JfigError(f"the matching at {site} maps A feature {keys[vals < 0][0]} to {vals[vals < 0][0]}; "
                            f"leave an unmatched feature out of the mapping")
        sim = np.ones(width_a)
    else:
        fwd = np.asarray(value, np.int64).reshape(-1)
        sim = np.ones(len(fwd))
    if d_a is not None and len(fwd) != d_a:
        raise JfigError(f"the matching at {site} covers {len(fwd)} A features, but graph A's SAE there has {d_a}")
    d_b = d_b if d_b is not None else int(fwd.max(initial=-1)) + 1
    bad = (fwd < -1) | (fwd >= d_b)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise JfigError(f"the matching at {site} maps A feature {i} to {fwd[i]}, outside graph B's SAE there "
                        f"(0..{d_b - 1}, or -1 for no match)")
    hit = fwd[fwd >= 0]
    if len(np.unique(hit)) != len(hit):
        dup = int(np.flatnonzero(np.bincount(hit) > 1)[0])
        raise JfigError(f"the matching at {site} maps several A features to B feature {dup}; it must be one to one")
    return fwd, sim, d_b


def site_maps(matching, a, b) -> dict[str, SiteMap]:
    """{site: SiteMap} for `matching` (site -> FeatureMatching, {A id: B id} or array of B ids),
    checked against the graphs' SAE widths."""
    if not isinstance(matching, Mapping):
        raise JfigError(f"matching must be a mapping of site -> feature matching, got {type(matching).__name__}")
    wa, wb = sae_widths(a), sae_widths(b)
    sites = set(wa) | set(wb)
    for g in (a, b):
        for col, _ in ENDPOINTS:
            sites |= {s for s in g.edges[col].to_pylist() if s is not None}
    out = {}
    for site, value in matching.items():
        if site not in sites:
            raise JfigError(f"the matching names site {site!r}, which neither graph has (their sites: {sorted(sites)})")
        fwd, sim, d_b = _forward(value, site, wa.get(site), wb.get(site))
        ok = np.flatnonzero(fwd >= 0)
        inv = np.full(d_b, -1, np.int64)
        inv[fwd[ok]] = ok
        sim_b = np.full(d_b, np.nan)
        sim_b[fwd[ok]] = sim[ok]
        out[site] = SiteMap(fwd, inv, sim, sim_b)
    return out


def translate(graph, maps: dict[str, SiteMap], side: str):
    """A graph's edges in both numberings: (a_ids [3, n], b_ids [3, n], unmatched [n], similarity [n])
    for source, target and modulator (-2 where there is no modulator, -1 where a feature has no
    match). `side`: "A" or "B", the numbering the graph's own ids are in."""
    n = graph.n_edges
    a_ids, b_ids = [], []
    unmatched, sim = np.zeros(n, bool), np.ones(n)
    for site_col, id_col in ENDPOINTS:
        own = pc.fill_null(graph.edges[id_col], -2).to_numpy(zero_copy_only=False).astype(np.int64)
        other = own.copy()
        sites = np.asarray(graph.edges[site_col].to_pylist(), object)
        for site, m in maps.items():
            rows = np.flatnonzero((sites == site) & (own >= 0))
            if not len(rows):
                continue
            to, s = (m.fwd, m.sim_a) if side == "A" else (m.inv, m.sim_b)
            if own[rows].max() >= len(to):
                raise JfigError(f"graph {side} has feature {own[rows].max()} at {site}, but the matching there "
                                f"covers {len(to)} of its features")
            other[rows] = to[own[rows]]
            unmatched[rows] |= other[rows] < 0
            sim[rows] = np.fmin(sim[rows], s[own[rows]])
        a_ids.append(own if side == "A" else other)
        b_ids.append(other if side == "A" else own)
    return np.stack(a_ids), np.stack(b_ids), unmatched, sim


# ------------------------------------------------------------------------------ the comparison

def _status(ka, kb, wa, wb, ratio) -> str:
    if ka != kb:
        return "flipped"
    if ratio is not None and abs(wb) > ratio * abs(wa):
        return "strengthened"
    if ratio is not None and abs(wb) * ratio < abs(wa):
        return "weakened"
    return "same"


def measured_sets(measured, maps: dict[str, SiteMap]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({site: bool [ids]} of A's measured sources, the same of B's) from ``measured`` = (A's, B's
    {site: feature ids}); JfigError on anything else or on an id outside a matched site's SAE."""
    if not (isinstance(measured, (tuple, list)) and len(measured) == 2
            and all(isinstance(m, Mapping) for m in measured)):
        raise JfigError("measured must be a pair (A's, B's) of {site: feature ids} mappings: the sources each "
                        f"build measured; got {type(measured).__name__}")
    out = []
    for side, given in zip("AB", measured):
        sets = {}
        for site, ids in given.items():
            ids = np.asarray(list(ids), np.int64).reshape(-1)
            if len(ids) and ids.min() < 0:
                raise JfigError(f"measured sources of graph {side} at {site} include a negative id ({ids.min()})")
            width = len((maps[site].fwd if side == "A" else maps[site].inv)) if site in maps else None
            if width is not None and len(ids) and ids.max() >= width:
                raise JfigError(f"measured sources of graph {side} at {site} include feature {ids.max()}, outside "
                                f"its SAE there (0..{width - 1})")
            hit = np.zeros(max(int(ids.max(initial=-1)) + 1, width or 0), bool)
            hit[ids] = True
            sets[site] = hit
        out.append(sets)
    return out[0], out[1]


def _was_measured(sets: dict[str, np.ndarray], site: str, feature: int) -> bool:
    """Whether a build measured source `feature` at `site` (a site it lists no sources at: not measured)."""
    hit = sets.get(site)
    return hit is not None and 0 <= feature < len(hit) and bool(hit[feature])


def diff_graphs(a, b, *, matching=None, ratio: float | None = None, measured=None) -> GraphDiff:
    """Compare graph ``a`` with graph ``b``: every edge of either, labelled 'same' (in both, same
    kind), 'flipped' (in both, excitatory in one and inhibitory in the other), 'lost' (in a only) or
    'gained' (in b only).

    ratio: also label edges of the same kind whose |weight| grew by more than this factor
      'strengthened', and those that shrank by more than it 'weakened' (e.g. 2.0; None: sign only).
    matching: {site: matching of A's features to B's} for graphs of different SAEs at those sites
      (a ``FeatureMatching``, a {A id: B id} dict or an array [d_sae_a] of B ids with -1 for none).
      Edges are identified through the matched ids; an edge touching a feature with no match is
      'unmatched' (neither gained nor lost). Sites not in it are compared id by id.
    measured: (A's, B's) measured sources, each {site: feature ids} in its own graph's numbering (a
      dense build's sources: its candidates.json). An edge of A whose source B did not measure (its
      match, through `matching`) is 'untested' rather than 'lost'; an edge of B whose source A did not
      measure is 'untested' rather than 'gained'. A site missing from a mapping: nothing measured there.
    """
    if ratio is not None and not float(ratio) > 1.0:
        raise OptionError(f"ratio must be > 1 (the factor by which |weight| changes), got {ratio}")
    maps = site_maps(matching, a, b) if matching is not None else {}
    tested_a, tested_b = measured_sets(measured, maps) if measured is not None else (None, None)
    notes = sae_notes(a, b, matched=maps)
    rows_a, na = edge_frame(a)
    rows_b, nb = edge_frame(b)
    notes += [f"graph A: {n}" for n in na] + [f"graph B: {n}" for n in nb]
    for site, m in maps.items():
        k = int((m.fwd >= 0).sum())
        notes.append(f"{site}: {k} of {len(m.fwd)} A features matched to B's {len(m.inv)}; edges touching the "
                     f"others count as unmatched")
    side_a, side_b = translate(a, maps, "A"), translate(b, maps, "B")

    ga = {c: a.edges[c].to_pylist() for c in ("kind", "weight", "p_value", "source_site", "target_site",
                                              "modulator_site", "positions")}
    gb = {c: b.edges[c].to_pylist() for c in ga}

    def common(g, side, r):
        """The key of edge r in A's numbering."""
        ids = side[0][:, r]
        return (g["source_site"][r], int(ids[0]), g["target_site"][r], int(ids[1]), g["modulator_site"][r],
                None if ids[2] == -2 else int(ids[2]), g["positions"][r])

    matched_a = {common(ga, side_a, r): r for r in rows_a.values() if not side_a[2][r]}
    matched_b = {common(gb, side_b, r): r for r in rows_b.values() if not side_b[2][r]}
    keys = list(matched_a) + [k for k in matched_b if k not in matched_a]
    lonely_a = [r for r in rows_a.values() if side_a[2][r]]
    lonely_b = [r for r in rows_b.values() if side_b[2][r]]

    cols = {f.name: [] for f in TABLE_SCHEMA}

    def add(status, ra, rb, similarity):
        """One row: edge `ra` of A and/or `rb` of B (None where absent)."""
        g, side, r = (ga, side_a, ra) if ra is not None else (gb, side_b, rb)
        b_ids = side_b[1][:, rb] if rb is not None else side[1][:, r]
        for (site_col, id_col), ia, ib in zip(ENDPOINTS, side[0][:, r], b_ids):
            cols[site_col].append(g[site_col][r])
            cols[id_col].append(None if ia < 0 else int(ia))
            cols[id_col + "_b"].append(None if ib < 0 else int(ib))
        cols["positions"].append(g["positions"][r])
        cols["status"].append(status)
        for suffix, gg, rr in (("_a", ga, ra), ("_b", gb, rb)):
            for c in ("kind", "weight", "p_value"):
                cols[c + suffix].append(gg[c][rr] if rr is not None else None)
        cols["similarity"].append(similarity)
        wa, wb = cols["weight_a"][-1], cols["weight_b"][-1]
        cols["change"].append(None if status in ("unmatched", "untested") else (wb or 0.0) - (wa or 0.0))

    for key in keys:
        ra, rb = matched_a.get(key), matched_b.get(key)
        if rb is None:
            status = "lost" if tested_b is None or _was_measured(tested_b, key[0], int(side_a[1][0, ra])) \
                else "untested"
        elif ra is None:
            status = "gained" if tested_a is None or _was_measured(tested_a, key[0], key[1]) else "untested"
        else:
            status = _status(ga["kind"][ra], gb["kind"][rb], ga["weight"][ra], gb["weight"][rb], ratio)
        add(status, ra, rb, float(min(side[3][r] for side, r in ((side_a, ra), (side_b, rb)) if r is not None)))
    for r in lonely_a:
        add("unmatched", r, None, None)
    for r in lonely_b:
        add("unmatched", None, r, None)
    table = pa.table({f.name: pa.array(cols[f.name], f.type) for f in TABLE_SCHEMA}, schema=TABLE_SCHEMA)
    shown = STATUSES[:4] + (("strengthened", "weakened") if ratio is not None else ()) + \
        (("unmatched",) if matching is not None else ()) + (("untested",) if measured is not None else ())
    counts = {s: cols["status"].count(s) for s in shown}
    return GraphDiff(table, counts, notes, None if ratio is None else float(ratio))
