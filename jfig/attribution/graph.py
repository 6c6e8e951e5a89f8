"""AttributionGraph: one prompt's direct-effect graph over transcoder features, error nodes, tokens and
logits, laid out as circuit-tracer's `Graph` is.

Nodes, in order: the feature nodes (the selected active features, in `active_features` order:
layer, then position, then feature), the error nodes (layer x position, row l*s + p), the token nodes
(one per position), the logit nodes (likeliest first). `adjacency_matrix[t, s]` is the direct effect
of source s on target t: the source's activation times its write (decoder row, error vector or
embedding) dotted with the gradient of the target's input (a feature's pre-activation, a logit's
demeaned logit) through the prompt's linear replacement model. Error, token and logit columns of
logit rows and all error and token rows are sources only: their rows are zero.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..data.files import atomic_write_json
from ..graph import NodeIndex
from .influence import PruneResult, graph_scores, prune
from .viewer import error_node, feature_node, graph_file, logit_node, token_node

LINK_SCHEMA = pa.schema([
    ("source_layer", pa.int64()), ("source_position", pa.int64()), ("source_feature", pa.int64()),
    ("source_site", pa.string()),
    ("target_layer", pa.int64()), ("target_position", pa.int64()), ("target_feature", pa.int64()),
    ("target_site", pa.string()),
    ("weight", pa.float64()),          # the attribution edge (direct effect on this prompt)
    ("both_nodes", pa.bool_()),        # both features are nodes of the corpus graph (null: no graph)
    ("corpus_kind", pa.string()), ("corpus_weight", pa.float64()), ("corpus_p_value", pa.float64()),
    ("corpus_estimator", pa.string()), ("corpus_positions", pa.string()),
])


@dataclass(frozen=True, eq=False, repr=False)
class AttributionGraph:
    """One prompt's attribution graph (see the module docstring for the node order).

    tokens [s] int; prompt (the tokens decoded); token_strings (each token decoded);
    active_features [n_active, 3] (layer, position, feature); activation_values [n_active];
    selected_features [n_features]: indices into active_features of the feature nodes;
    adjacency_matrix [n_nodes, n_nodes] float32 (target, source); logit_tokens [n_logits];
    logit_probabilities [n_logits]; logit_strings; n_layers; sites {layer: the jfig site its
    transcoder reads}; scan (the transcoders' name for the viewers); corpus: the corpus-wide
    InteractionGraph the features are linked to, or None.
    """

    tokens: np.ndarray
    prompt: str
    token_strings: tuple
    active_features: np.ndarray
    activation_values: np.ndarray
    selected_features: np.ndarray
    adjacency_matrix: np.ndarray
    logit_tokens: np.ndarray
    logit_probabilities: np.ndarray
    logit_strings: tuple
    n_layers: int
    sites: dict
    scan: str
    corpus: object = None

    # ---- sizes and node ranges ------------------------------------------------------------------

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.selected_features)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def n_nodes(self) -> int:
        return self.adjacency_matrix.shape[0]

    @property
    def feature_nodes(self) -> np.ndarray:
        """[n_features, 3]: (layer, position, feature) of each feature node."""
        return self.active_features[self.selected_features]

    def __repr__(self) -> str:
        return (f"AttributionGraph({self.n_pos} tokens, {self.n_features} features, {self.n_errors} error nodes, "
                f"{self.n_logits} logits, {int((self.adjacency_matrix != 0).sum())} edges)")

    def node_table(self) -> pa.Table:
        """One row per node in adjacency order: kind ('feature', 'error', 'token', 'logit'), layer
        (-1 for tokens, n_layers for logits), position, feature (token id for tokens and logits, -1 for
        errors), activation (features; null otherwise), site (features; null otherwise)."""
        f = self.feature_nodes
        err = np.arange(self.n_errors)
        last = self.n_pos - 1
        kind = ["feature"] * self.n_features + ["error"] * self.n_errors + ["token"] * self.n_pos + \
            ["logit"] * self.n_logits
        layer = np.concatenate([f[:, 0], err // self.n_pos, np.full(self.n_pos, -1), np.full(self.n_logits,
                                                                                            self.n_layers)])
        pos = np.concatenate([f[:, 1], err % self.n_pos, np.arange(self.n_pos), np.full(self.n_logits, last)])
        feat = np.concatenate([f[:, 2], np.full(self.n_errors, -1), self.tokens, self.logit_tokens])
        act = self.activation_values[self.selected_features].tolist() + [None] * (self.n_nodes - self.n_features)
        site = [self.sites[int(l)] for l in f[:, 0]] + [None] * (self.n_nodes - self.n_features)
        return pa.table({"kind": kind, "layer": layer.astype(np.int64), "position": pos.astype(np.int64),
                         "feature": feat.astype(np.int64), "activation": pa.array(act, pa.float64()),
                         "site": pa.array(site, pa.string())})

    # ---- influence ------------------------------------------------------------------------------

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
        """Nodes and edges kept by influence on the logits (circuit-tracer's `prune_graph`)."""
        return prune(self.adjacency_matrix, self.logit_probabilities, self.n_features, self.n_pos,
                     node_threshold, edge_threshold)

    def scores(self) -> tuple[float, float]:
        """(replacement score, completeness score) as circuit-tracer's `compute_graph_scores`."""
        return graph_scores(self.adjacency_matrix, self.logit_probabilities, self.n_features, self.n_errors,
                            self.n_pos)

    # ---- the corpus-wide graph ------------------------------------------------------------------

    def links(self, pruned: bool = False, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> pa.Table:
        """Every feature -> feature edge (`pruned`: only those `prune` keeps), strongest first, with the
        corpus graph's edge between the same two features where both are its nodes and it has one
        (the first first-order row; gating rows are hyperedges and are not matched). Columns:
        `LINK_SCHEMA`; the corpus columns are null where there is no such edge."""
        n = self.n_features
        keep = self.adjacency_matrix[:n, :n] != 0
        if pruned:
            keep &= self.prune(node_threshold, edge_threshold).edge_mask[:n, :n]
        tgt, src = np.nonzero(keep)
        w = self.adjacency_matrix[tgt, src].astype(np.float64)
        order = np.argsort(-np.abs(w), kind="stable")
        tgt, src, w = tgt[order], src[order], w[order]
        f = self.feature_nodes
        s_site = [self.sites[int(l)] for l in f[src, 0]]
        t_site = [self.sites[int(l)] for l in f[tgt, 0]]
        cols = {"source_layer": f[src, 0], "source_position": f[src, 1], "source_feature": f[src, 2],
                "source_site": s_site, "target_layer": f[tgt, 0], "target_position": f[tgt, 1],
                "target_feature": f[tgt, 2], "target_site": t_site, "weight": w}
        k = len(w)
        extra = {name: [None] * k for name in ("both_nodes", "corpus_kind", "corpus_weight", "corpus_p_value",
                                                "corpus_estimator", "corpus_positions")}
        if self.corpus is not None and k:
            index = NodeIndex.from_graph(self.corpus)
            both = (index.lookup(s_site, f[src, 2]) >= 0) & (index.lookup(t_site, f[tgt, 2]) >= 0)
            extra["both_nodes"] = both.tolist()
            rows = corpus_edges(self.corpus)
            e = self.corpus.edges
            for i in np.flatnonzero(both).tolist():
                r = rows.get((s_site[i], int(f[src[i], 2]), t_site[i], int(f[tgt[i], 2])))
                if r is None:
                    continue
                for col, name in (("corpus_kind", "kind"), ("corpus_weight", "weight"),
                                  ("corpus_p_value", "p_value"), ("corpus_estimator", "estimator"),
                                  ("corpus_positions", "positions")):
                    extra[col][i] = e[name][r].as_py()
        return pa.table({**cols, **extra}, schema=LINK_SCHEMA)

    # ---- the viewers' file ----------------------------------------------------------------------

    def to_dict(self, slug: str = "jfig-graph", *, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                scan: str | None = None) -> dict:
        """The pruned graph as the attribution-graph JSON (as circuit-tracer's `create_graph_files`
        writes it): nodes kept by `prune`, links kept between them, unlinked feature and error nodes
        dropped. Feature nodes take their corpus label (when a linked corpus graph has one) as `clerp`."""
        keep_nodes, keep_edges, cumulative = self.prune(node_threshold, edge_threshold)
        nf, ne, s = self.n_features, self.n_errors, self.n_pos
        labels = corpus_labels(self.corpus) if self.corpus is not None else {}
        nodes = {}
        for i in np.flatnonzero(keep_nodes).tolist():
            infl = cumulative[i]
            if i < nf:
                layer, pos, feat = (int(v) for v in self.feature_nodes[i])
                nodes[i] = feature_node(layer, feat, pos, influence=infl,
                                        activation=self.activation_values[self.selected_features[i]],
                                        clerp=labels.get((self.sites[layer], feat)) or "")
            elif i < nf + ne:
                layer, pos = divmod(i - nf, s)
                nodes[i] = error_node(layer, pos, influence=infl)
            elif i < nf + ne + s:
                pos = i - nf - ne
                nodes[i] = token_node(pos, int(self.tokens[pos]), influence=infl)
            else:
                r = i - nf - ne - s
                nodes[i] = logit_node(s - 1, int(self.logit_tokens[r]), self.logit_strings[r], self.n_layers,
                                      prob=float(self.logit_probabilities[r]), target=r == 0)
        tgt, src = np.nonzero(keep_edges)
        links = [{"source": nodes[a]["node_id"], "target": nodes[b]["node_id"], "weight": float(w)}
                 for a, b, w in zip(src.tolist(), tgt.tolist(), self.adjacency_matrix[tgt, src].tolist())
                 if a in nodes and b in nodes]
        linked = {x for link in links for x in (link["source"], link["target"])}
        used = [n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
        info = {"creator": "jfig", "sites": {str(l): site for l, site in sorted(self.sites.items())},
                "edge_threshold": edge_threshold}
        return graph_file(slug=slug, scan=scan or self.scan, prompt_tokens=self.token_strings, prompt=self.prompt,
                          nodes=used, links=links, node_threshold=node_threshold, info=info)

    def to_json(self, path, slug: str | None = None, *, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                scan: str | None = None) -> dict:
        """Write `to_dict` as JSON and return it. `path`: a .json file (slug: its stem by default), or a
        folder, which gets `{slug}.json` and an updated `graph-metadata.json` (the list of graphs
        circuit-tracer's local viewer serves)."""
        path = Path(path)
        folder = path if path.is_dir() else None
        slug = slug or (path.stem if folder is None else "jfig-graph")
        data = self.to_dict(slug, node_threshold=node_threshold, edge_threshold=edge_threshold, scan=scan)
        atomic_write_json(path if folder is None else folder / f"{slug}.json", data)
        if folder is not None:
            index_file = folder / "graph-metadata.json"
            listed = read_graph_list(index_file)
            listed["graphs"] = [g for g in listed["graphs"] if g.get("slug") != slug] + [data["metadata"]]
            atomic_write_json(index_file, listed)
        return data


def read_graph_list(path: Path) -> dict:
    """A viewer folder's graph-metadata.json ({"graphs": [...]}), or an empty one."""
    if not path.exists():
        return {"graphs": []}
    data = json.loads(path.read_text())
    return data if isinstance(data.get("graphs"), list) else {"graphs": []}


def corpus_edges(graph) -> dict:
    """{(source_site, source, target_site, target): row} of a graph's first-order edges (first row wins)."""
    e = graph.edges
    cols = [e[c].to_pylist() for c in ("source_site", "source", "target_site", "target", "kind")]
    rows = {}
    for r, (ss, s, ts, t, kind) in enumerate(zip(*cols)):
        if kind != "gating":
            rows.setdefault((ss, s, ts, t), r)
    return rows


def corpus_labels(graph) -> dict:
    """{(site, feature): label} of a graph's labelled nodes."""
    n = graph.nodes
    return {(s, f): lab for s, f, lab in zip(n["site"].to_pylist(), n["feature"].to_pylist(), n["label"].to_pylist())
            if lab}
