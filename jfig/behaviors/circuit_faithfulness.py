"""The feature circuit search's result and its checks: `FeatureCircuit` (with `CircuitEdge`), faithfulness
recomputed with stock edits (`direct_circuit_metric`), faithfulness of arbitrary node sets
(`set_faithfulness`), random node sets of the circuit's size (`random_circuits`) and the comparison with
a behaviour subgraph (`compare_circuits`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from ..edits import Clamp, SetFeatures, ShiftFeatures
from ..errors import JfigError
from ..graph import InteractionGraph
from ..sites import site_layer
from .circuit_runs import CircuitEdit, Evaluator, SearchData, rest_mask, rows_for, search_data, suite_tokens
from .metric import logit_diff
from .subgraph import Subgraph


# ------------------------------------------------------------------------------------------ result

class CircuitEdge(NamedTuple):
    """A kept edge: `delta` = change of the metric when it was ablated alone from the final circuit
    (or when last tested); `contribution` = mean over edited positions of v's clean value minus its
    value with u ablated (the direct effect; positive: u excites v)."""

    source_site: str
    source: int
    target_site: str
    target: int
    delta: float
    contribution: float


@dataclass
class FeatureCircuit:
    """What `feature_circuit` found (fields documented in `as_dict`; metrics are mean metric values)."""

    behavior: str
    threshold: float
    ablation: str
    sites: tuple
    nodes: tuple                       # ((site, feature), ...) in forward order
    node_delta: dict                   # {(site, feature): metric change when ablated (last test)}
    edges: tuple                       # CircuitEdge, ...
    n_candidate_edges: int
    rest_sites: tuple                  # sites whose rest node (every non-candidate feature) the circuit keeps
    rest_delta: dict                   # {site: metric change when its rest node was ablated (last test)}
    candidates: dict                   # {site: [features]} (the search's universe)
    attribution: dict                  # {site: [attribution of each candidate]}
    clean: float
    none: float
    start: float                       # only the candidates kept
    node_metric: float                 # after node pruning (every candidate edge among the nodes kept)
    metric: float                      # the circuit's metric
    sparse_metric: float               # the circuit without its rest nodes (its features and edges only)
    direct_metric: float | None = None
    n_prompts: int = 0
    n_states: int = 0
    seconds: float = 0.0
    options: dict = field(default_factory=dict)

    def retained(self, m: float) -> float:
        """(m - m_none) / (m_clean - m_none)."""
        return float((m - self.none) / (self.clean - self.none))

    @property
    def faithfulness(self) -> float:
        return self.retained(self.metric)

    @property
    def node_faithfulness(self) -> float:
        return self.retained(self.node_metric)

    @property
    def sparse_faithfulness(self) -> float:
        return self.retained(self.sparse_metric)

    @property
    def candidate_faithfulness(self) -> float:
        return self.retained(self.start)

    @property
    def direct_faithfulness(self) -> float | None:
        return None if self.direct_metric is None else self.retained(self.direct_metric)

    def by_site(self) -> dict:
        """{site: sorted features of the circuit's nodes}."""
        out: dict = {s: [] for s in self.sites}
        for s, f in self.nodes:
            out[s].append(f)
        return {s: sorted(v) for s, v in out.items()}

    def table(self) -> pa.Table:
        """The kept edges: source_site, source, target_site, target, delta, contribution."""
        cols = list(zip(*self.edges)) if self.edges else [[] for _ in CircuitEdge._fields]
        types = (pa.string(), pa.int64(), pa.string(), pa.int64(), pa.float64(), pa.float64())
        return pa.table({k: pa.array(list(v), t) for k, v, t in zip(CircuitEdge._fields, cols, types)})

    def node_table(self) -> pa.Table:
        """The nodes: site, feature, delta (metric change when ablated)."""
        return pa.table({"site": pa.array([s for s, _ in self.nodes], pa.string()),
                         "feature": pa.array([f for _, f in self.nodes], pa.int64()),
                         "delta": pa.array([self.node_delta[n] for n in self.nodes], pa.float64())})

    def to_graph(self, saes: dict | None = None) -> InteractionGraph:
        """The circuit as an InteractionGraph: its nodes, and its edges as first-order rows (weight: the
        contribution, estimator 'ablate', positions 'all', n: prompts). `saes` {site: SAE} fills the
        manifest's d_sae."""
        layer = {s: site_layer(s, self.sites) for s in self.sites}
        nodes = {"site": [s for s, _ in self.nodes], "feature": [f for _, f in self.nodes],
                 "layer": [layer[s] for s, _ in self.nodes], "firing_rate": [None] * len(self.nodes),
                 "label": [None] * len(self.nodes), "top_contexts": [None] * len(self.nodes)}
        e = self.edges
        edges = {"source_site": [x.source_site for x in e], "source": [x.source for x in e],
                 "target_site": [x.target_site for x in e], "target": [x.target for x in e],
                 "kind": ["excitatory" if x.contribution >= 0 else "inhibitory" for x in e],
                 "weight": [x.contribution for x in e], "p_value": [None] * len(e), "p_bonferroni": [None] * len(e),
                 "q_value": [None] * len(e), "variance": [None] * len(e), "n": [self.n_prompts] * len(e),
                 "estimator": ["ablate"] * len(e), "positions": ["all"] * len(e),
                 "source_layer": [layer[x.source_site] for x in e], "target_layer": [layer[x.target_site] for x in e],
                 "modulator_site": pa.array([None] * len(e), pa.string()),
                 "modulator": pa.array([None] * len(e), pa.int64()),
                 "cv": [None] * len(e), "gating_flag": pa.array([None] * len(e), pa.bool_())}
        saes = saes or {}
        manifest = {"saes": [{"site": s, **({"d_sae": int(saes[s].d_sae)} if s in saes else {})} for s in self.sites],
                    "options": {"feature_circuit": {"behavior": self.behavior, "threshold": self.threshold,
                                                    "ablation": self.ablation, **self.options}}}
        return InteractionGraph.from_tables(pa.table(nodes), pa.table(edges), manifest)

    def as_dict(self) -> dict:
        """behavior, threshold (fraction of |m_clean - m_none|), ablation, sites, metrics (clean, none,
        start, node_metric, metric, direct_metric) and faithfulness (circuit, after node pruning, of the
        candidates, direct), nodes and edges with their deltas, candidates with attributions, counts."""
        return {"behavior": self.behavior, "threshold": self.threshold, "ablation": self.ablation,
                "sites": list(self.sites), "n_prompts": self.n_prompts, "options": self.options,
                "metric": {"clean": self.clean, "none": self.none, "candidates": self.start,
                           "nodes": self.node_metric, "circuit": self.metric, "sparse": self.sparse_metric,
                           "direct": self.direct_metric},
                "faithfulness": {"circuit": self.faithfulness, "nodes": self.node_faithfulness,
                                 "sparse": self.sparse_faithfulness, "candidates": self.candidate_faithfulness,
                                 "direct": self.direct_faithfulness},
                "rest_sites": list(self.rest_sites), "rest_delta": self.rest_delta,
                "n_nodes": len(self.nodes), "n_edges": len(self.edges), "n_candidate_edges": self.n_candidate_edges,
                "nodes": [{"site": s, "feature": f, "delta": self.node_delta[(s, f)]} for s, f in self.nodes],
                "edges": [e._asdict() for e in self.edges],
                "candidates": {s: [int(x) for x in v] for s, v in self.candidates.items()},
                "attribution": {s: [float(x) for x in v] for s, v in self.attribution.items()},
                "n_states": self.n_states, "seconds": self.seconds}

    def summary(self) -> str:
        """A Markdown summary: metrics, faithfulness, nodes per site and the strongest edges."""
        per_site = self.by_site()
        lines = [f"# Feature circuit: {self.behavior}", "",
                 f"ACDC-style search over {sum(len(v) for v in self.candidates.values())} candidate features at "
                 f"{len(self.sites)} sites ({self.ablation} ablation, threshold {self.threshold:g} of "
                 f"|m_clean - m_none|, {self.n_prompts} prompts, {self.n_states} states run in {self.seconds:.0f} s).",
                 "", "| quantity | metric | faithfulness |", "|---|---|---|",
                 f"| clean model | {self.clean:.4f} | 1 |",
                 f"| every search-site feature ablated | {self.none:.4f} | 0 |",
                 f"| candidates only | {self.start:.4f} | {self.candidate_faithfulness:.3f} |",
                 f"| circuit nodes (all their edges) | {self.node_metric:.4f} | {self.node_faithfulness:.3f} |",
                 f"| circuit | {self.metric:.4f} | {self.faithfulness:.3f} |",
                 f"| circuit without its rest nodes | {self.sparse_metric:.4f} | {self.sparse_faithfulness:.3f} |"]
        if self.direct_metric is not None:
            lines.append(f"| circuit, direct ablation check | {self.direct_metric:.4f} | "
                         f"{self.direct_faithfulness:.3f} |")
        lines += ["", f"{len(self.nodes)} feature nodes, {len(self.edges)} of {self.n_candidate_edges} candidate edges "
                      f"kept; rest nodes (a site's non-candidate features together) kept at "
                      f"{', '.join(self.rest_sites) or 'no site'}.", "",
                  "| site | candidates | feature nodes | rest node (metric change when ablated) |", "|---|---|---|---|"]
        lines += [f"| {s} | {len(self.candidates[s])} | {', '.join(map(str, per_site[s])) or '-'} | "
                  f"{('kept' if s in self.rest_sites else 'pruned') if s in self.rest_delta else '-'}"
                  f"{f' ({self.rest_delta[s]:+.4f})' if s in self.rest_delta else ''} |" for s in self.sites]
        if self.edges:
            lines += ["", "| edge | metric change when ablated | contribution |", "|---|---|---|"]
            for e in sorted(self.edges, key=lambda e: -abs(e.delta))[:20]:
                lines.append(f"| {e.source_site}#{e.source} → {e.target_site}#{e.target} | {e.delta:+.4f} | "
                             f"{e.contribution:+.4f} |")
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the check

def direct_circuit_metric(model, saes: dict, data: SearchData, circuit: FeatureCircuit,
                          metric: Callable = logit_diff) -> float:
    """The circuit's mean metric (rest nodes included) recomputed without the search's machinery: every
    contribution of an
    ablated edge from its own run (the upstream feature ablated with a stock `Clamp` to its per-token
    ablation value, the features between held at their clean values), then one run per prompt batch with
    every feature outside the nodes ablated (stock `SetFeatures` for mean / zero ablation) and every
    ablated edge added to its downstream feature (stock `ShiftFeatures`)."""
    sites = list(circuit.sites)
    nodes = set(circuit.nodes)
    kept = {(e.source_site, e.source, e.target_site, e.target) for e in circuit.edges}
    shift = {s: np.zeros_like(data.clean[s]) for s in sites}
    tokens = jnp.asarray(data.tokens)
    pos = jnp.asarray(data.positions)
    if circuit.options.get("edges", True):
        for a, i in circuit.nodes:
            for b in sites[sites.index(a) + 1:]:
                targets = [j for t, j in circuit.nodes if t == b and (a, i, b, j) not in kept]
                if not targets:
                    continue
                edits = [Clamp(saes[a], i, data.ablated[a][..., i], positions=pos)]
                for s in sites[sites.index(a) + 1: sites.index(b)]:
                    d = saes[s].d_sae
                    edits.append(CircuitEdit(saes[s], np.zeros(d, bool), 0.0, np.ones(d, bool), data.clean[s],
                                             0.0, pos))
                x = model.run(tokens, edits=edits, capture=(b,), logits=False).cache[b]
                f = np.asarray(saes[b].encode(x))
                for j in targets:
                    shift[b][..., j] += f[..., j] - data.clean[b][..., j]
    edits = []
    for s in sites:
        outside = np.ones(saes[s].d_sae, bool)
        outside[[f for t, f in nodes if t == s]] = False
        if s in circuit.rest_sites:
            outside[rest_mask(saes[s].d_sae, circuit.candidates[s])] = False
        if circuit.ablation in ("mean", "zero"):
            values = data.ablated[s][0, 0] if circuit.ablation == "mean" else 0.0
            edits.append(SetFeatures(saes[s], outside, values, positions=pos))
        else:
            edits.append(CircuitEdit(saes[s], outside, data.ablated[s], np.zeros(saes[s].d_sae, bool), 0.0, 0.0, pos))
        edits.append(ShiftFeatures(saes[s], shift[s]))
    m = metric(model, tokens, jnp.asarray(data.last), jnp.asarray(data.answer), jnp.asarray(data.distractor), edits)
    return float(np.asarray(m, np.float64).mean())


# ------------------------------------------------------------------------------------------ comparison

def set_faithfulness(model, saes, suite, circuit: FeatureCircuit, node_sets: list, metric: Callable = logit_diff,
                     *, rest_sites=(), batch_size: int = 16, chunk: int = 8) -> np.ndarray:
    """[len(node_sets)]: faithfulness of node sets [(site, feature)] under the circuit's metric, ablation and
    sites (every feature outside a set ablated; features at other sites are ignored). At `rest_sites` the
    features that are not the circuit's candidates are kept too (the rest nodes)."""
    saes = model.check_saes(saes)
    saes = {s: saes[s] for s in circuit.sites}
    _, batch = suite_tokens(model, suite, circuit.options.get("n"), circuit.options.get("seed", 0))
    data = search_data(model, saes, batch, rows_for(batch, circuit.ablation), circuit.ablation, batch_size=batch_size)
    ev = Evaluator(model, saes, metric, data, batch_size=batch_size, chunk=chunk)
    masks = {s: np.ones((len(node_sets), sae.d_sae), bool) for s, sae in saes.items()}
    for s in rest_sites:
        masks[s][:, rest_mask(saes[s].d_sae, circuit.candidates[s])] = False
    for k, nodes in enumerate(node_sets):
        for s, f in nodes:
            if s in masks:
                masks[s][k, f] = False
    return np.asarray([circuit.retained(m) for m in ev.metrics(masks)])


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else float("nan")


@dataclass(frozen=True)
class CircuitComparison:
    """A feature circuit against a behaviour subgraph: overlaps and each one's faithfulness under the same
    metric; `rows` is the small table (one dict per line), `table()` its Markdown."""

    rows: tuple
    overlap: dict

    def table(self) -> str:
        lines = ["| set | nodes | nodes at shared sites | edges at shared sites | faithfulness |",
                 "|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['set']} | {r['nodes']} | {r['nodes_shared_sites']} | {r['edges_shared_sites']} | "
                         f"{r['faithfulness']:.3f} |")
        o = self.overlap
        lines += ["", f"Shared sites: {', '.join(o['shared_sites']) or 'none'}. Node Jaccard {o['node_jaccard']:.3f} "
                      f"({o['shared_nodes']} shared); at the shared sites {o['node_jaccard_shared_sites']:.3f}; edge "
                      f"Jaccard at the shared sites {o['edge_jaccard_shared_sites']:.3f} ({o['shared_edges']} shared)."]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict:
        return {"rows": list(self.rows), "overlap": self.overlap}


def compare_circuits(model, saes, suite, circuit: FeatureCircuit, subgraph, metric: Callable = logit_diff, *,
                     batch_size: int = 16, chunk: int = 8) -> CircuitComparison:
    """The feature circuit against a behaviour subgraph (a BehaviorCircuit or Subgraph of the interaction
    graph): node Jaccard (all nodes, and at the sites both cover), edge Jaccard at the shared sites (the
    subgraph's first-order edges against the circuit's edges), and faithfulness under the circuit's metric,
    ablation and sites (every feature outside a set ablated; subgraph nodes at sites the search did not
    cover are ignored): of the circuit's features alone and of the subgraph's features alone (all their
    edges, no rest nodes: like with like), and the circuit's own faithfulness (rest nodes kept, pruned
    edges ablated)."""
    sub = getattr(subgraph, "subgraph", subgraph)
    if not isinstance(sub, Subgraph):
        raise JfigError(f"expected a BehaviorCircuit or a Subgraph, got {type(subgraph).__name__}")
    shared = sorted(set(circuit.sites) & set(sub.by_site()), key=circuit.sites.index)
    a, b = set(circuit.nodes), set(sub.nodes)
    a_s, b_s = {x for x in a if x[0] in shared}, {x for x in b if x[0] in shared}
    cols = sub.edges.select(["source_site", "source", "target_site", "target", "kind"]).to_pydict()
    b_edges = {(ss, s, ts, t) for ss, s, ts, t, k in zip(*cols.values()) if k != "gating" and ss in shared
               and ts in shared}
    a_edges = {(e.source_site, e.source, e.target_site, e.target) for e in circuit.edges
               if e.source_site in shared and e.target_site in shared}
    faith = set_faithfulness(model, saes, suite, circuit, [circuit.nodes, sub.nodes], metric,
                             batch_size=batch_size, chunk=chunk)
    rows = ({"set": "feature circuit: its features alone", "nodes": len(a), "nodes_shared_sites": len(a_s),
             "edges_shared_sites": len(a_edges), "faithfulness": float(faith[0])},
            {"set": "feature circuit: features, pruned edges, rest nodes", "nodes": len(a), "nodes_shared_sites": len(a_s),
             "edges_shared_sites": len(a_edges), "faithfulness": float(circuit.faithfulness)},
            {"set": "behaviour subgraph: its features alone", "nodes": len(b), "nodes_shared_sites": len(b_s),
             "edges_shared_sites": len(b_edges), "faithfulness": float(faith[1])})
    overlap = {"shared_sites": shared, "node_jaccard": jaccard(a, b), "shared_nodes": len(a & b),
               "node_jaccard_shared_sites": jaccard(a_s, b_s), "edge_jaccard_shared_sites": jaccard(a_edges, b_edges),
               "shared_edges": len(a_edges & b_edges)}
    return CircuitComparison(rows, overlap)


def random_circuits(circuit: FeatureCircuit, pools: dict, n_random: int, *, seed: int = 0) -> list:
    """n_random node sets with the circuit's number of nodes per site, drawn uniformly without replacement
    from pools {site: features} (e.g. the candidates, or the features active on the suite)."""
    rng = np.random.default_rng(seed)
    per_site = circuit.by_site()
    out = []
    for _ in range(n_random):
        nodes = []
        for s, fs in per_site.items():
            pool = np.asarray(pools.get(s, []), np.int64)
            if len(pool) < len(fs):
                raise JfigError(f"site {s}: a pool of {len(pool)} features cannot hold random sets of {len(fs)}")
            nodes += [(s, int(f)) for f in rng.choice(pool, len(fs), replace=False)]
        out.append(nodes)
    return out
