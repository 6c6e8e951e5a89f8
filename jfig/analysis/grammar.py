"""The feature grammar: recurring signed motifs, named, tested against the rewiring null and shown
with real examples.

    census = motif_census(edges, null_samples=20)                 # three-node motifs (motifs.py)
    gates = gating_triangles(graph, edges, copies)                # hyperedges closing on a first-order edge
    table = taxonomy(census, gates, edges, graph, examples=3)     # named motifs, z, verdict, examples

A gating triangle is a gating hyperedge (modulator m changes the effect of s on t) whose pair s -> t
is itself a first-order edge: the modulator acts on an existing pathway. Its null keeps the
hyperedges and rewires the first-order edges. Mutual inhibition (a -| b and b -| a) needs pairs
measured in both directions; jfig measures from earlier sites to later ones only, so it is reported
as structurally absent rather than as a count of zero.
"""
from __future__ import annotations

import json

import numpy as np
from scipy import sparse

from .motifs import MotifCensus
from .network import summarise
from .rewire import SignedEdges

Z_LEVEL = 2.0
DESCRIPTIONS = {
    "chain ++": "excitatory chain: a excites b, b excites c",
    "chain +-": "a excites b, b inhibits c",
    "chain -+": "a inhibits b, b excites c (disinhibition of c's input removed)",
    "chain --": "double inhibition: a inhibits b, b inhibits c (disinhibition)",
    "convergence ++": "two features excite one target",
    "convergence +-": "one target excited by one feature and inhibited by another (competition for a target)",
    "convergence --": "two features inhibit one target",
    "divergence ++": "one feature excites two targets",
    "divergence +-": "one feature excites one target and inhibits another (switch)",
    "divergence --": "one feature inhibits two targets",
    "ffl coherent": "coherent feed-forward loop: the direct edge a -> c has the sign of the path a -> b -> c",
    "ffl incoherent": "incoherent feed-forward loop: the direct edge a -> c opposes the path a -> b -> c",
    "gating triangle": "a modulator changes the effect of an existing first-order edge s -> t",
    "mutual inhibition": "a inhibits b and b inhibits a (competition)",
}


def hyperedges(graph, edges: SignedEdges) -> np.ndarray:
    """[n_gating, 3] node ids (modulator, source, target) of the gating rows whose three features are
    nodes of `edges` (rows with an unknown feature are left out)."""
    if edges.names is None:
        return np.zeros((0, 3), np.int64)
    index = {name: i for i, name in enumerate(edges.names)}
    e = graph.edges.to_pydict()
    out = []
    for i, kind in enumerate(e["kind"]):
        if kind != "gating":
            continue
        ids = [index.get((e["modulator_site"][i], int(e["modulator"][i]))),
               index.get((e["source_site"][i], int(e["source"][i]))), index.get((e["target_site"][i], int(e["target"][i])))]
        if None not in ids:
            out.append(ids)
    return np.asarray(out, np.int64).reshape(-1, 3)


def _closing(edges: SignedEdges, target: np.ndarray, hyper: np.ndarray) -> np.ndarray:
    """[n_gating] bool: whether each hyperedge's (source, target) is a first-order edge."""
    n = len(edges.layer)
    keys = np.sort(edges.source * n + target)
    want = hyper[:, 1] * n + hyper[:, 2]
    at = np.searchsorted(keys, want).clip(max=max(len(keys) - 1, 0))
    return keys[at] == want if len(keys) else np.zeros(len(want), bool)


def gating_triangles(graph, edges: SignedEdges, copies: list[np.ndarray]) -> dict:
    """Gating triangles of the graph against rewired copies (count, null mean and sd, z)."""
    hyper = hyperedges(graph, edges)
    real = int(_closing(edges, edges.target, hyper).sum())
    null = np.asarray([_closing(edges, t, hyper).sum() for t in copies], np.float64)
    return {**summarise("gating triangle", real, null), "count": real, "hyperedges": len(hyper),
            "instances": hyper[_closing(edges, edges.target, hyper)].tolist()}


def motif_examples(edges: SignedEdges, motif: str, k: int) -> list[list[int]]:
    """Up to k node-id triples (a, b, c) of a feed-forward loop or chain motif, strongest first (summed
    |weight| of its edges). Convergence and divergence are fixed by the degrees and never listed."""
    n = len(edges.layer)
    w = edges.weight if edges.weight is not None else np.ones(len(edges))
    sign = {"+": 1, "-": -1}
    adj = {s: sparse.csr_matrix((w[edges.sign == v], (edges.source[edges.sign == v], edges.target[edges.sign == v])),
                                shape=(n, n)) for s, v in sign.items()}
    total = adj["+"] + adj["-"]
    signed = {(int(a), int(b)): int(s) for a, b, s in zip(edges.source, edges.target, edges.sign)}
    weight = {(int(a), int(b)): float(x) for a, b, x in zip(edges.source, edges.target, w)}
    found: list[tuple[float, list[int]]] = []
    if motif.startswith("ffl"):
        coherent = motif == "ffl coherent"
        into = total.T.tocsr()                                     # row c: the nodes with an edge into c
        closing = (total @ total).multiply(total > 0).tocoo()      # (a, c) pairs with a path a->b->c and an edge a->c
        order = np.argsort(-closing.data)[: 50 * k]
        for a, c in zip(closing.row[order].tolist(), closing.col[order].tolist()):
            for b in np.intersect1d(total[a].indices, into[c].indices).tolist():
                if (signed[(a, b)] * signed[(b, c)] == signed[(a, c)]) == coherent:
                    found.append((weight[(a, b)] + weight[(b, c)] + weight[(a, c)], [a, b, c]))
    elif motif.startswith("chain"):
        s1, s2 = sign[motif[-2]], sign[motif[-1]]
        for (a, b), s in sorted(signed.items(), key=lambda kv: -weight[kv[0]])[: 200 * k]:
            if s != s1:
                continue
            for c in total[b].indices.tolist():
                if c != a and signed[(b, c)] == s2:
                    found.append((weight[(a, b)] + weight[(b, c)], [a, b, c]))
    found.sort(key=lambda x: -x[0])
    seen, out = set(), []
    for _, triple in found:
        if tuple(triple) not in seen:
            seen.add(tuple(triple))
            out.append(triple)
        if len(out) == k:
            break
    return out


def describe_node(graph_nodes: dict, index: dict, name) -> dict:
    """A feature's site, id, label and first top context."""
    i = index.get(name)
    ctx = json.loads(graph_nodes["top_contexts"][i]) if i is not None and graph_nodes["top_contexts"][i] else []
    return {"site": name[0], "feature": int(name[1]), "label": graph_nodes["label"][i] if i is not None else None,
            "context": ctx[0]["text"] if ctx else None}


def taxonomy(census: MotifCensus, gates: dict, edges: SignedEdges, graph, *, examples: int = 3) -> list[dict]:
    """A row per motif: name, description, count, z, verdict (over-represented z >= 2, under-represented
    z <= -2, as expected, fixed by the degrees, or structurally absent) and real examples of the
    over-represented ones (features with their top context)."""
    nodes = graph.nodes.to_pydict()
    index = {(s, int(f)): i for i, (s, f) in enumerate(zip(nodes["site"], nodes["feature"]))}
    rows = []
    for r in census.table.to_pylist():
        rows.append({"motif": r["motif"], "count": r["count"], "z": r["z"], "null_mean": r["null_mean"],
                     "fixed_by_degrees": r["fixed_by_degrees"]})
    rows.append({"motif": "gating triangle", "count": gates["count"], "z": gates["z"], "null_mean": gates["null_mean"],
                 "fixed_by_degrees": False})
    forward = bool((edges.layer[edges.source] < edges.layer[edges.target]).all())
    rows.append({"motif": "mutual inhibition", "count": None if forward else 0, "z": None, "null_mean": None,
                 "fixed_by_degrees": False, "structural": forward})
    for row in rows:
        row["description"] = DESCRIPTIONS[row["motif"]]
        z = row["z"]
        if row.get("structural"):
            row["verdict"] = "structurally absent (no pair is measured in both directions)"
        elif row["fixed_by_degrees"]:
            row["verdict"] = "fixed by the degrees (no null spread)"
        elif z is None or not np.isfinite(z):
            row["verdict"] = "no null spread"
        else:
            row["verdict"] = ("over-represented" if z >= Z_LEVEL else "under-represented" if z <= -Z_LEVEL
                              else "as expected")
        row["examples"] = []
        if row["verdict"] == "over-represented" and edges.names is not None:
            triples = (gates["instances"][:examples] if row["motif"] == "gating triangle"
                       else motif_examples(edges, row["motif"], examples))
            row["examples"] = [[describe_node(nodes, index, edges.names[i]) for i in t] for t in triples]
    return rows
