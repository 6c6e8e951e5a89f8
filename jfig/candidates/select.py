"""Candidate feature pairs for causal measurement: the pruning filters and their report.

    effects = {sae.site: feature_importance(atlas, sae, model, tokens, kind="loss", pool=800) for sae in saes}
    cands = select_candidates(atlas, saes, effects=effects, importance="loss", top_k=200, window=5)
    cands.pairs      # pyarrow.Table: source_site, source, target_site, target, statistics
    print(cands.report)

The filters, each applied to the survivors of the last:

1. layer window: source site strictly before the target site, 0 <= layer(t) - layer(s) <= window;
2. importance: per site, the top_k features by firing rate x downstream causal effect (the effect
   is measured beforehand, by `jfig.measure.feature_importance`; without it, firing rate alone);
3. co-activation: P(j | i) >= min_coact (and PMI >= min_pmi), plus, with keep_low_coact, pairs
   that co-activate significantly *less* than independence predicts (candidate inhibition);
4. decoder alignment, a prior: pairs are ordered by |cos(e_j, d_i)| (the direct residual-path
   alignment, where the target SAE reads the residual stream the source writes to), highest first.
   It drops pairs only when asked (min_alignment=<threshold> or "auto" for 2/sqrt(d_in)), because an
   interaction carried by an MLP or by attention need not be aligned with any decoder direction.

`report` gives the number of pairs before and after each step (real counts, not estimates).
Selection only reads the atlas and the SAEs' weights: it runs no model.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pyarrow as pa

from ..errors import JfigError, ShapeError
from ..models.validation import saes_by_site
from ..saes.geometry import decoder_alignment, dictionaries_aligned
from ..sites import parse_site
from .report import Candidates, Report, SourceCandidates


def select_candidates(atlas, saes, *, effects: Mapping[str, np.ndarray] | None = None, importance: str = "rate",
                      top_k: int = 200, min_coact: float = 0.01, min_pmi: float | None = None,
                      keep_low_coact: bool = True, low_coact_p: float = 1e-3,
                      min_alignment: float | str | None = None,
                      alignment_window: int | None = 1, window: int = 5) -> Candidates:
    """Candidate pairs by layer window, importance, co-activation (incl. low co-activation) and decoder
    alignment; see the module docstring and docs/atlas.md.

    effects: site -> downstream effect of each tracked feature ([n_tracked], in the order of
      `atlas.features[site]`, NaN where not measured), from `jfig.measure.feature_importance`;
      importance = firing rate x effect. Without `effects`, features rank by firing rate alone.
    importance: how `effects` were measured ("loss", "kl", "attribution"; "rate" without effects),
      recorded in the report.
    min_alignment: None (default: alignment only orders the pairs), a threshold on |cos(e_j, d_i)|, or
      "auto" for 2/sqrt(d_in) (two standard deviations of the cosine of random directions);
      alignment_window: apply a threshold only where the layer distance is at most this (None:
      everywhere alignment applies).
    """
    saes, effects, importance, note = check_inputs(atlas, saes, effects, importance, window)
    feat_rows, chosen = rank_features(atlas, effects, top_k)

    layer = {s: parse_site(s).layer for s in atlas.sites}
    order_of = {s: i for i, s in enumerate(atlas.sites)}
    all_pairs = sum(atlas.d_sae[a] * atlas.d_sae[b] for a in atlas.sites for b in atlas.sites
                    if order_of[a] < order_of[b])
    site_pairs = [(a, b) for a, b in atlas.pairs if a != b and layer[b] - layer[a] <= window]
    n_window = sum(atlas.d_sae[a] * atlas.d_sae[b] for a, b in site_pairs)
    n_tracked = sum(len(atlas.features[a]) * len(atlas.features[b]) for a, b in site_pairs)
    n_imp = sum(len(chosen[a]) * len(chosen[b]) for a, b in site_pairs)
    n_high = n_low = n_applied = 0
    parts = []
    for a, b in site_pairs:
        ra, rb = chosen[a], chosen[b]
        if not len(ra) or not len(rb):
            continue
        co = atlas.coactivation(a, b)[np.ix_(ra, rb)]
        p_cond = atlas.conditional_probability(a, b)[np.ix_(ra, rb)]
        pmi = atlas.pmi(a, b)[np.ix_(ra, rb)]
        expected = atlas.expected_coactivation(a, b)[np.ix_(ra, rb)]
        with np.errstate(invalid="ignore"):
            high = (p_cond >= min_coact) & ((pmi >= min_pmi) if min_pmi is not None else True)
        p_low = atlas.low_coactivation_pvalue(a, b, ra, rb)
        low = keep_low_coact & ~high & (co < expected) & (p_low <= low_coact_p)
        n_high, n_low = n_high + int(high.sum()), n_low + int(low.sum())
        keep = high | low
        fa, fb = atlas.features[a][ra], atlas.features[b][rb]
        dot = cos = np.full(co.shape, np.nan)
        aligned = dictionaries_aligned(saes[a], saes[b])
        applies = aligned and (alignment_window is None or layer[b] - layer[a] <= alignment_window)
        if aligned:
            dot, cos = decoder_alignment(saes[a], saes[b], fa, fb)
        if applies and min_alignment is not None:
            thr = 2.0 / math.sqrt(saes[b].d_in) if min_alignment == "auto" else float(min_alignment)
            n_applied += int(keep.sum())
            keep &= np.abs(cos) >= thr
        i, j = np.nonzero(keep)
        imp_a = feat_rows[order_of[a]].column("importance").to_numpy()[ra]
        imp_b = feat_rows[order_of[b]].column("importance").to_numpy()[rb]
        parts.append(pa.Table.from_pydict(dict(
            source_site=[a] * len(i), source=fa[i], target_site=[b] * len(i), target=fb[j],
            layer_distance=np.full(len(i), layer[b] - layer[a]), low_coactivation=low[i, j], count=co[i, j],
            p_cond=p_cond[i, j], pmi=pmi[i, j], p_low=p_low[i, j], alignment=dot[i, j], alignment_cos=cos[i, j],
            source_importance=imp_a[i], target_importance=imp_b[j],
            admitted_by=np.where(low[i, j], "low co-activation", "co-activation"),
            priority=np.nan_to_num(np.abs(cos[i, j]))), schema=PAIR_SCHEMA))
    pairs = pa.concat_tables(parts) if parts else PAIR_SCHEMA.empty_table()
    if pairs.num_rows:                       # the alignment prior: most aligned pairs first (stable otherwise)
        pairs = pairs.take(np.argsort(-pairs.column("priority").to_numpy(), kind="stable"))

    report = Report()
    report.add("all pairs (source site before target site)", all_pairs, all_pairs, f"{len(atlas.sites)} sites")
    report.add(f"layer window (0 <= dlayer <= {window})", all_pairs, n_window, f"{len(site_pairs)} site pairs")
    if n_tracked != n_window:
        report.add("tracked by the atlas", n_window, n_tracked, "features with pair statistics")
    report.add(f"importance (top {top_k} per site, {importance})", n_tracked, n_imp, note)
    coact = f"co-activation (P(j|i) >= {min_coact:g}" + (f", PMI >= {min_pmi:g}" if min_pmi is not None else "")
    coact += f"; low co-activation p <= {low_coact_p:g})" if keep_low_coact else ")"
    report.add(coact, n_imp, n_high + n_low, f"{n_high} co-active, {n_low} low co-activation")
    if min_alignment is None:
        report.add("decoder alignment (a prior: orders pairs, drops none)", n_high + n_low, len(pairs),
                   "pairs ranked by |cos(e_j, d_i)|")
    else:
        thr_note = "2/sqrt(d_in)" if min_alignment == "auto" else f"{float(min_alignment):g}"
        where = "all" if alignment_window is None else f"dlayer <= {alignment_window}"
        report.add(f"decoder alignment (|cos| >= {thr_note}, {where})", n_high + n_low, len(pairs),
                   f"applied to {n_applied} residual-stream pairs; others pass")
    settings = dict(top_k=top_k, min_coact=min_coact, min_pmi=min_pmi, keep_low_coact=keep_low_coact,
                    low_coact_p=low_coact_p, min_alignment=min_alignment, alignment_window=alignment_window,
                    window=window, importance=importance)
    return Candidates(pairs=pairs, features=pa.concat_tables(feat_rows), report=report, settings=settings)


def select_sources(atlas, saes, *, effects: Mapping[str, np.ndarray] | None = None, importance: str = "rate",
                   top_k: int = 200, window: int = 5) -> SourceCandidates:
    """The dense selection: per site the top_k features by importance (as `select_candidates` ranks
    them), each to be measured against every feature of every later site within `window` layers.
    Sources at a site with no later site in the window are not selected. Runs no model."""
    saes, effects, importance, note = check_inputs(atlas, saes, effects, importance, window)
    feat_rows, chosen = rank_features(atlas, effects, top_k)
    order_of = {s: i for i, s in enumerate(atlas.sites)}
    all_pairs = sum(atlas.d_sae[a] * atlas.d_sae[b] for a in atlas.sites for b in atlas.sites
                    if order_of[a] < order_of[b])
    target_sites = window_targets(atlas.sites, window)
    n_window = sum(atlas.d_sae[a] * atlas.d_sae[b] for a, ts in target_sites.items() for b in ts)
    sources = {}
    for table, site in zip(feat_rows, atlas.sites):
        if site in target_sites:
            rank = table.column("rank").to_numpy()[chosen[site]]
            sources[site] = atlas.features[site][chosen[site]][np.argsort(rank, kind="stable")]
    d_sae = {s: int(atlas.d_sae[s]) for s in atlas.sites}
    cands = SourceCandidates(sources=sources, target_sites=target_sites, d_sae=d_sae,
                             features=pa.concat_tables(feat_rows), report=Report(),
                             settings=dict(top_k=top_k, window=window, importance=importance, targets="all"))
    rep = cands.report
    rep.add("all pairs (source site before target site)", all_pairs, all_pairs, f"{len(atlas.sites)} sites")
    rep.add(f"layer window (0 <= dlayer <= {window})", all_pairs, n_window,
            f"{sum(map(len, target_sites.values()))} site pairs")
    rep.add(f"importance (top {top_k} sources per site, {importance}; every target)", n_window, cands.n_pairs,
            f"{cands.n_sources} sources" + (f"; {note}" if note else ""))
    return cands



def window_targets(sites, window: int) -> dict[str, tuple[str, ...]]:
    """Source site -> the later sites (in the given forward order) at most `window` layers after it;
    sites with none are left out (their features have no targets)."""
    sites = list(sites)
    layer = {s: parse_site(s).layer for s in sites}
    out = {a: tuple(b for b in sites[i + 1:] if layer[b] - layer[a] <= window) for i, a in enumerate(sites)}
    return {a: t for a, t in out.items() if t}

def check_inputs(atlas, saes, effects, importance: str, window: int):
    """(saes by site, effects, importance, note) after checking that the SAEs, effects and window fit
    the atlas; importance falls back to "rate" without effects."""
    saes = saes_by_site(saes)
    for site in atlas.sites:
        if site not in saes:
            raise JfigError(f"no SAE given for atlas site {site}; got SAEs at {sorted(saes)}")
        if saes[site].d_sae != atlas.d_sae[site]:
            raise ShapeError(f"SAE at {site} has d_sae {saes[site].d_sae}; the atlas was built with "
                             f"{atlas.d_sae[site]}")
    if window > atlas.settings["window"]:
        raise JfigError(f"window {window} exceeds the atlas's layer window {atlas.settings['window']}")
    effects = dict(effects or {})
    note = ""
    if not effects:
        if importance != "rate":
            note = "firing rate only (no measured effects given)"
        importance = "rate"
    for site, e in effects.items():
        if site not in atlas.features or np.shape(e) != atlas.features[site].shape:
            raise ShapeError(f"effects for {site} must have one value per tracked feature "
                             f"({len(atlas.features.get(site, ()))}), got shape {np.shape(e)}")

    return saes, effects, importance, note


def rank_features(atlas, effects: dict, top_k: int) -> tuple[list[pa.Table], dict[str, np.ndarray]]:
    """Per site: the feature table (firing rate, effect, importance, rank, selected) and the tracked
    positions of the top_k features by importance (firing rate x effect; firing rate without effects)."""
    feat_rows, chosen = [], {}
    for site in atlas.sites:
        rate = atlas.firing_rate(site)[atlas.features[site]]
        effect = np.asarray(effects[site], np.float64) if site in effects else np.full(rate.shape, np.nan)
        imp = rate * effect if site in effects else rate.copy()
        score = np.where(np.isnan(imp), -np.inf, imp)
        order = np.argsort(-score, kind="stable")
        chosen[site] = np.sort(order[np.isfinite(score[order])][:top_k])      # tracked positions
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        sel = np.zeros(len(order), bool)
        sel[chosen[site]] = True
        feat_rows.append(pa.table(dict(site=[site] * len(rate), feature=atlas.features[site], firing_rate=rate,
                                       effect=effect, importance=imp, rank=rank, selected=sel)))
    return feat_rows, chosen


PAIR_SCHEMA = pa.schema([("source_site", pa.string()), ("source", pa.int64()), ("target_site", pa.string()),
                         ("target", pa.int64()), ("layer_distance", pa.int64()), ("low_coactivation", pa.bool_()),
                         ("count", pa.int64()), ("p_cond", pa.float64()), ("pmi", pa.float64()),
                         ("p_low", pa.float64()), ("alignment", pa.float64()), ("alignment_cos", pa.float64()),
                         ("source_importance", pa.float64()), ("target_importance", pa.float64()),
                         ("admitted_by", pa.string()), ("priority", pa.float64())])
