"""Feature circuit search: ACDC-style greedy pruning over SAE features and feature-to-feature edges.

The universe is a set of *candidate* features at the search sites (residual, ``hook_attn_out`` and
``hook_mlp_out`` SAEs): the top `candidates` per site by attribution patching. Every feature outside
the candidates is ablated throughout. Every edit keeps the SAE error and touches every prompt position
but the first (the sequence-start token is an attention sink). Ablating a feature sets it, per token,
to its *ablation value*: its value on the corrupted prompt at that position (``"corrupted"``, ACDC's
patching), its mean over the suite (``"mean"``) or 0 (``"zero"``).

Definitions (m = the behaviour metric, by default the mean logit difference; span = m_clean - m_none,
m_none = every feature of every search site ablated):

- **node ablation** of feature i at site s: x_s' = x_s + decode(f') - decode(f) with f'_i = its
  ablation value (the other features and the error unchanged).
- **edge** u -> v, u = (a, i) at site a, v = (b, j) at a later site b. Its *contribution* is the
  per-token change D_uv [n, seq] of f_j at b when u alone is ablated at a in the clean model *with
  every feature of every search site strictly between a and b held at its clean value* (error kept):
  the direct effect of u on v, not the paths through intermediate features (those are edges of their
  own). **Ablating the edge** adds D_uv to v's value at b (error-preserving, through v's decoder
  direction) and changes nothing else: u itself, and every other path from u, stay as they are.
  Ablating several edges into v adds their contributions (as ACDC sums a node's incoming edges).
- The circuit's metric m(C) is the metric with every feature outside C's nodes ablated and every
  candidate edge among C's nodes that is not in C ablated, all in one run.

The search (``feature_circuit``) prunes nodes first, then edges among the kept nodes, each in
ACDC's order from the output backwards: nodes site by site from the last search site; edges grouped
by their downstream site, from the last. Within a group the pruning is greedy and batched: all
remaining items are ablated one at a time on top of the current state (one vmapped pass), ordered by
|change|, and the longest prefix of that order whose every step changes m by at most
``threshold · |span|`` is removed (the prefixes are a second vmapped pass; this is exactly ACDC's
sequential test in that order up to the first item that must stay). Passes repeat until none of the
remaining items can go, so every kept item of a group, ablated alone from the final state of its
group, changes m by more than the threshold.

faithfulness = (m(C) - m_none) / (m_clean - m_none): 1 keeps the whole behaviour, 0 is no better than
ablating every feature. ``direct_circuit_metric`` recomputes m(C) without the search's machinery
(stock edits, one run per contribution and one for the circuit) as a check.

The edit, the data the runs share and the vmapped runs are in `circuit_runs`; the result
(`FeatureCircuit`), the faithfulness checks and the comparisons in `circuit_faithfulness`.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..edits import ShiftFeatures
from ..errors import JfigError, SiteError
from .circuit_faithfulness import CircuitEdge, FeatureCircuit, direct_circuit_metric
from .circuit_runs import Evaluator, SearchData, check_sites, rest_mask, rows_for, search_data, suite_tokens
from .metric import logit_diff

log = logging.getLogger(__name__)
ABLATIONS = ("corrupted", "mean", "zero")
REST = -1            # a site's rest node: every feature of the site that is not a candidate


# ------------------------------------------------------------------------------------------ pruning

def greedy_prune(items: list, metric_of: Callable, tolerance: float) -> tuple[list, list, dict, int]:
    """Batched ACDC over `items` (module docstring). metric_of(list of frozensets of items ablated on top
    of the fixed state) -> [len] metrics. Returns (kept, removed in removal order, {item: change of the
    metric when it was last ablated: on removal, or alone from the final state for kept ones}, passes)."""
    removed: list = []
    remaining = list(items)
    change: dict = {}
    passes = 0
    while remaining:
        passes += 1
        gone = frozenset(removed)
        m = metric_of([gone] + [gone | {i} for i in remaining])
        single = m[1:] - m[0]
        change.update({i: float(d) for i, d in zip(remaining, single)})
        order = np.argsort(np.abs(single), kind="stable")
        if abs(single[order[0]]) > tolerance:
            break
        seq = [remaining[j] for j in order]
        if len(seq) == 1:
            steps = single[order]
        else:
            prefixes = metric_of([gone | frozenset(seq[:k]) for k in range(1, len(seq) + 1)])
            steps = np.diff(np.concatenate([[m[0]], prefixes]))
        bad = np.flatnonzero(np.abs(steps) > tolerance)
        stop = max(int(bad[0]) if bad.size else len(seq), 1)
        for k in range(stop):
            removed.append(seq[k])
            change[seq[k]] = float(steps[k])
        remaining = [i for i in remaining if i not in set(seq[:stop])]
    return remaining, removed, change, passes


# ------------------------------------------------------------------------------------------ the search

def check_search_args(threshold, candidates, ablation: str, metric, batch_size: int, chunk: int) -> float:
    """The pre-work checks of feature_circuit; returns the threshold as a float."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(threshold)) or threshold < 0:
        raise JfigError(f"threshold must be a finite number >= 0 (a fraction of |m_clean - m_none|), got {threshold!r}")
    if ablation not in ABLATIONS:
        raise JfigError(f"unknown ablation {ablation!r}; expected one of {ABLATIONS}")
    if not callable(metric):
        raise JfigError(f"metric must be a function (model, tokens, last, answer, distractor, edits) -> [n] like "
                        f"jfig.behaviors.logit_diff, got {type(metric).__name__}")
    whole = isinstance(candidates, (int, np.integer)) and not isinstance(candidates, bool)
    if not isinstance(candidates, dict) and (not whole or candidates < 1):
        raise JfigError(f"candidates must be an int >= 1 (features per site) or {{site: [features]}}, "
                        f"got {candidates!r}")
    for name, v in (("batch_size", batch_size), ("chunk", chunk)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise JfigError(f"{name} must be an int >= 1, got {v!r}")
    return float(threshold)


@eqx.filter_jit
def _attribution_chunk(model, saes, metric, data):
    """Σ over prompts and edited positions of (f - ablation value) · ∂metric/∂f: {site: [d_sae]}."""
    def total(deltas):
        edits = tuple(ShiftFeatures(saes[s], deltas[s]) for s in saes)
        return metric(model, data.tokens, data.last, data.answer, data.distractor, edits).sum()
    grads = jax.grad(total)({s: jnp.zeros_like(f) for s, f in data.clean.items()})
    m = data.positions[..., None].astype(jnp.float32)
    return {s: ((data.clean[s] - data.ablated[s]) * grads[s] * m).sum((0, 1)) for s in saes}


def candidate_attribution(model, saes: dict, metric: Callable, data: SearchData, *, batch_size: int = 16) -> dict:
    """{site: [d_sae]}: attribution patching, the first-order change of the mean metric when each feature is
    set to its ablation value at every edited position (gradients through ShiftFeatures at 0)."""
    acc = None
    for lo in range(0, len(data.tokens), batch_size):
        part = jax.tree.map(jnp.asarray, data.rows(slice(lo, lo + batch_size)))
        got = jax.tree.map(lambda a: np.asarray(a, np.float64), _attribution_chunk(model, saes, metric, part))
        acc = got if acc is None else jax.tree.map(np.add, acc, got)
    return {s: a / len(data.tokens) for s, a in acc.items()}


def pick_candidates(saes: dict, attribution: dict, candidates) -> dict:
    """{site: int array} of candidate features: the top-k by |attribution| per site, or given lists (checked)."""
    if isinstance(candidates, dict):
        unknown = sorted(set(candidates) - set(saes))
        if unknown:
            raise SiteError(f"candidates name site(s) {unknown} that are not search sites {list(saes)}")
        out = {}
        for s in saes:
            f = np.unique(np.asarray(candidates.get(s, []), np.int64))
            if f.size and (f.min() < 0 or f.max() >= saes[s].d_sae):
                raise JfigError(f"candidate features at {s} must lie in [0, {saes[s].d_sae}), got {f.tolist()}")
            out[s] = f
        return out
    return {s: np.sort(np.argsort(-np.abs(attribution[s]), kind="stable")[:min(candidates, saes[s].d_sae)])
            for s in saes}


def node_masks_from(saes: dict, keep: dict, candidates: dict, c: int = 1) -> dict:
    """{site: bool [c, d_sae]} ablating every feature not in keep {site: features}; REST in keep[site] keeps
    the site's non-candidate features (candidates {site: features})."""
    out = {}
    for s, sae in saes.items():
        m = np.ones(sae.d_sae, bool)
        m[np.asarray([f for f in keep.get(s, ()) if f != REST], np.int64)] = False
        if REST in keep.get(s, ()):
            m[rest_mask(sae.d_sae, candidates[s])] = False
        out[s] = np.repeat(m[None], c, 0)
    return out

def edge_contributions(ev: Evaluator, saes: dict, nodes: list, candidates: dict) -> dict:
    """{((a, i), (b, j)): D [n, w]} for every pair of `nodes` [(site, feature)] at sites a before b: the change of
    f_j at b when (a, i) alone is ablated with every feature of every search site strictly between held at its
    clean value (module docstring). One state per (upstream node, downstream site), vmapped; every candidate
    {site: features} is read, so the compiled shapes do not depend on which nodes were kept."""
    sites = list(saes)
    read = {s: np.asarray(list(candidates[s]) or [0], np.int32) for s in sites}
    combos = [(u, b) for u in nodes for b in sites if sites.index(b) > sites.index(u[0])
              and any(t == b for t, _ in nodes)]
    if not combos:
        return {}
    d = {s: sae.d_sae for s, sae in saes.items()}
    ablate = {s: np.zeros((len(combos), d[s]), bool) for s in sites}
    hold = {s: np.zeros((len(combos), d[s]), bool) for s in sites}
    for k, ((a, i), b) in enumerate(combos):
        ablate[a][k, i] = True
        for s in sites[sites.index(a) + 1: sites.index(b)]:
            hold[s][k] = True
    got = ev.read(ablate, hold, read)
    out = {}
    for k, ((a, i), b) in enumerate(combos):
        for col, j in enumerate(read[b]):
            if (b, int(j)) in nodes:
                out[((a, i), (b, int(j)))] = (got[b][k, ..., col] - ev.data.clean[b][..., j]).astype(np.float32)
    return out


def feature_circuit(model, saes, suite, metric: Callable = logit_diff, *, threshold: float, sites=None,
                    candidates=8, ablation: str = "corrupted", rest: bool = True, edges: bool = True,
                    n: int | None = 32, seed: int = 0, check: bool = True, batch_size: int = 16,
                    chunk: int = 8) -> FeatureCircuit:
    """The circuit of a behaviour over SAE features (module docstring has the definitions).

    model: a jfig Model; saes: SAEs (list or {site: SAE}); suite: a behaviour name, .jsonl path,
    BehaviorSuite, list of prompts, or SuiteTokens (models without a tokenizer; n prompts of a built-in
    suite); metric: f(model, tokens, last, answer, distractor, edits) -> [n] (default the logit
    difference). threshold: an item stays when ablating it changes the mean metric by more than
    threshold · |m_clean - m_none|. sites: the search sites (residual, hook_attn_out, hook_mlp_out SAE
    sites; None: every such SAE site). candidates: features per site by |attribution| (or {site:
    [features]}). ablation: "corrupted" (aligned corrupted prompts only), "mean" or "zero". rest: each site's
    non-candidate features form one more node, which the search keeps or prunes like the others (False: they
    are ablated throughout, and the candidates are the whole universe). edges: prune
    edges among the kept nodes (False: nodes only). check: recompute the circuit's metric with
    `direct_circuit_metric`. batch_size prompts per run, chunk states per vmapped run.
    """
    t0 = time.time()
    threshold = check_search_args(threshold, candidates, ablation, metric, batch_size, chunk)
    saes = model.check_saes(saes)
    search_sites = check_sites(model, saes, sites)
    saes = {s: saes[s] for s in search_sites}
    name, batch = suite_tokens(model, suite, n, seed)
    rows = rows_for(batch, ablation)
    if isinstance(candidates, dict):
        pick_candidates(saes, {}, candidates)                    # checked before any run
    data = search_data(model, saes, batch, rows, ablation, batch_size=batch_size)
    ev = Evaluator(model, saes, metric, data, batch_size=batch_size, chunk=chunk)
    attribution = candidate_attribution(model, saes, metric, data, batch_size=batch_size)
    cand = pick_candidates(saes, attribution, candidates)
    d = {s: sae.d_sae for s, sae in saes.items()}
    base = ev.metrics({s: np.stack([np.zeros(d[s], bool), np.ones(d[s], bool),
                                    node_masks_from(saes, cand, cand)[s][0]]) for s in saes})
    clean, none, start = (float(x) for x in base)
    span = clean - none
    if abs(span) < 1e-9:
        raise JfigError(f"ablating every feature of the search sites leaves the metric unchanged ({clean:.4g}); "
                        f"faithfulness is undefined for this suite, these SAEs and ablation={ablation!r}")
    tol = threshold * abs(span)
    log.info("%s: %d prompts; metric clean %.4f, all ablated %.4f, candidates only %.4f", name, len(rows), clean,
             none, start)

    keep = {s: set(int(f) for f in cand[s]) | ({REST} if rest and len(cand[s]) < d[s] else set()) for s in saes}
    node_delta: dict = {}
    for s in reversed(search_sites):                       # nodes, from the output backwards
        others = rest_mask(d[s], cand[s])

        def node_metric_of(sets, s=s, others=others):
            masks = node_masks_from(saes, keep, cand, len(sets))
            for k, gone in enumerate(sets):
                masks[s][k, [f for f in gone if f != REST]] = True
                if REST in gone:
                    masks[s][k, others] = True
            return ev.metrics(masks)
        kept, removed, change, passes = greedy_prune(sorted(keep[s]), node_metric_of, tol)
        keep[s] = set(kept)
        node_delta.update({(s, f): v for f, v in change.items()})
        log.info("%s: %d of %d candidates kept%s (%d removed, %d passes)", s, len(set(kept) - {REST}), len(cand[s]),
                 " and the rest node" if REST in kept else "", len(removed), passes)
    nodes = [(s, f) for s in search_sites for f in sorted(keep[s]) if f != REST]
    rest_sites = tuple(s for s in search_sites if REST in keep[s])
    node_masks = node_masks_from(saes, keep, cand)
    sparse_masks = node_masks_from(saes, {s: keep[s] - {REST} for s in saes}, cand)
    node_metric = float(ev.metrics(node_masks)[0])

    kept_edges, n_candidate_edges, edge_delta, contrib = [], 0, {}, {}
    final = node_metric
    sparse = float(ev.metrics(sparse_masks)[0])
    if edges and len(nodes) > 1:
        contrib = edge_contributions(ev, saes, nodes, cand)
        n_candidate_edges = len(contrib)
        index = {s: [e for e in contrib if e[1][0] == s] for s in search_sites}
        ev.set_edges({s: np.stack([contrib[e] for e in index[s]], -1) for s in saes if index[s]},
                     {s: np.asarray([e[1][1] for e in index[s]], np.int32) for s in saes if index[s]})
        position = {e: (s, k) for s in saes for k, e in enumerate(index[s])}
        gone_edges: set = set()

        def edge_metric_of(sets, masks=node_masks):
            removed = {s: np.zeros((len(sets), max(len(index[s]), 1)), np.float32) for s in saes}
            for k, extra in enumerate(sets):
                for e in gone_edges | extra:
                    s, col = position[e]
                    removed[s][k, col] = 1.0
            return ev.metrics({s: np.repeat(m, len(sets), 0) for s, m in masks.items()}, removed)

        for s in reversed(search_sites):                   # edges by downstream site, from the output backwards
            if not index[s]:
                continue
            kept, removed, change, passes = greedy_prune(index[s], edge_metric_of, tol)
            gone_edges |= set(removed)
            edge_delta.update(change)
            kept_edges += kept
            log.info("edges into %s: %d of %d kept (%d passes)", s, len(kept), len(index[s]), passes)
        final = float(edge_metric_of([frozenset()])[0])
        sparse = float(edge_metric_of([frozenset()], sparse_masks)[0])
        kept_edges = sorted(kept_edges, key=lambda e: (search_sites.index(e[0][0]), e[0][1],
                                                       search_sites.index(e[1][0]), e[1][1]))
    pos = data.positions
    edge_rows = tuple(CircuitEdge(u[0], u[1], v[0], v[1], edge_delta[(u, v)],
                                  float(-(contrib[(u, v)] * pos).sum() / max(int(pos.sum()), 1)))
                      for u, v in kept_edges)
    circuit = FeatureCircuit(
        behavior=name, threshold=threshold, ablation=ablation, sites=search_sites, nodes=tuple(nodes),
        node_delta={k: node_delta[k] for k in nodes}, edges=edge_rows, n_candidate_edges=n_candidate_edges,
        rest_sites=rest_sites, rest_delta={s: node_delta[(s, REST)] for s in saes if (s, REST) in node_delta},
        candidates={s: [int(x) for x in cand[s]] for s in saes},
        attribution={s: [float(attribution[s][f]) for f in cand[s]] for s in saes}, clean=clean, none=none,
        start=start, node_metric=node_metric, metric=final, sparse_metric=sparse, n_prompts=len(rows),
        options=dict(n=n, seed=seed, rest=rest, edges=edges, metric=getattr(metric, "__name__", repr(metric)),
                     candidates=candidates if not isinstance(candidates, dict) else "given"))
    circuit.n_states = ev.n_states
    if check:
        circuit.direct_metric = direct_circuit_metric(model, saes, data, circuit, metric)
    circuit.seconds = round(time.time() - t0, 1)
    log.info("%s: %d nodes, %d edges, faithfulness %.3f (direct %s) in %.0f s", name, len(nodes), len(edge_rows),
             circuit.faithfulness, circuit.direct_faithfulness, circuit.seconds)
    return circuit
