"""Synthetic interaction graphs with planted structure, as InteractionGraph objects (the tables a
build writes), for the analysis tests."""
from __future__ import annotations

import json

import numpy as np

import jfig


def graph_from_edges(sites, src_site, src, tgt_site, tgt, sign, weight=None, *, n_features=None, tested=None,
                     gating=(), firing_rate=None):
    """An InteractionGraph over `sites` (TransformerLens names, forward order) with first-order edges
    given as arrays (site indices into `sites`, feature ids, sign +1/-1, |weight|), every feature
    0..n_features-1 of every site a node, `tested` {(a, b): pairs tested} for the manifest and
    gating rows (modulator site, modulator, source site, source, target site, target)."""
    sites = list(sites)
    layer = [jfig.sites.parse_site(s).layer for s in sites]
    n_features = n_features or int(max(np.max(src, initial=0), np.max(tgt, initial=0)) + 1)
    weight = np.ones(len(src)) if weight is None else np.asarray(weight, np.float64)
    rng = np.random.default_rng(0)
    nodes = {"site": [s for s in sites for _ in range(n_features)],
             "feature": [f for _ in sites for f in range(n_features)],
             "layer": [layer[i] for i in range(len(sites)) for _ in range(n_features)],
             "firing_rate": (rng.uniform(0.001, 0.1, len(sites) * n_features) if firing_rate is None
                             else np.asarray(firing_rate)).tolist(),
             "label": [None] * (len(sites) * n_features),
             "top_contexts": [json.dumps([{"text": f"context of {s}:{f}", "activation": 1.0}])
                              for s in sites for f in range(n_features)]}
    rows = {k: [] for k in ("source_site", "source", "target_site", "target", "kind", "weight", "source_layer",
                            "target_layer", "modulator_site", "modulator")}
    for a, i, b, j, sg, w in zip(src_site, src, tgt_site, tgt, sign, weight):
        rows["source_site"].append(sites[a]); rows["source"].append(int(i))
        rows["target_site"].append(sites[b]); rows["target"].append(int(j))
        rows["kind"].append("excitatory" if sg > 0 else "inhibitory"); rows["weight"].append(float(sg * w))
        rows["source_layer"].append(layer[a]); rows["target_layer"].append(layer[b])
        rows["modulator_site"].append(None); rows["modulator"].append(None)
    for m, mf, a, i, b, j in gating:
        rows["source_site"].append(sites[a]); rows["source"].append(int(i))
        rows["target_site"].append(sites[b]); rows["target"].append(int(j))
        rows["kind"].append("gating"); rows["weight"].append(1.0)
        rows["source_layer"].append(layer[a]); rows["target_layer"].append(layer[b])
        rows["modulator_site"].append(sites[m]); rows["modulator"].append(int(mf))
    n = len(rows["source"])
    edges = {**rows, "p_value": [1e-8] * n, "p_bonferroni": [1e-6] * n, "q_value": [1e-6] * n, "variance": [0.1] * n,
             "n": [32] * n, "estimator": ["clamp"] * n, "positions": ["same"] * n}
    if tested is None:
        tested = {}
        for a, b in set(zip(np.asarray(src_site).tolist(), np.asarray(tgt_site).tolist())):
            tested[(a, b)] = n_features * n_features
    manifest = {"model": {"name": "synthetic"},
                "statistics": {"n_tested": int(sum(tested.values())), "seq_len": 16,
                               "n_tested_by_site_pair": {f"{sites[a]} -> {sites[b]}": int(v)
                                                         for (a, b), v in tested.items()}}}
    return jfig.InteractionGraph.from_tables(nodes, edges, manifest)


def random_layered(sites, n_features, n_edges, *, p_excitatory=0.6, seed=0, pairs=None):
    """Arrays (src_site, src, tgt_site, tgt, sign) of n_edges distinct random edges between the site
    pairs `pairs` (default: each site to the next)."""
    rng = np.random.default_rng(seed)
    pairs = pairs or [(i, i + 1) for i in range(len(sites) - 1)]
    seen, out = set(), []
    while len(out) < n_edges:
        a, b = pairs[rng.integers(len(pairs))]
        e = (a, int(rng.integers(n_features)), b, int(rng.integers(n_features)))
        if e not in seen:
            seen.add(e)
            out.append(e)
    a, i, b, j = map(np.asarray, zip(*out))
    return a, i, b, j, np.where(rng.random(n_edges) < p_excitatory, 1, -1)
