"""Assembling an InteractionGraph from tested records: a pure function of data, no model runs.

    graph = assemble_graph(first_order, gating, node_info=NodeInfo(atlas, tokenizer.decode),
                           sites=model.sites, positions="same", manifest={...})

`first_order` and `gating` are `EdgeRecords`: every tested pair (or triple) with its measured mean,
variance, n, p-value and the significance decision from `jfig.stats.decide`. Rows the decision
keeps become edges (with any `extra` columns the records carry, null where a kind has none); every
measured source and every edge endpoint becomes a node.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..sites import site_layer
from ..stats import Decision
from .graph import InteractionGraph

EDGE_COLUMNS = ("source_site", "source", "target_site", "target", "kind", "weight", "p_value", "p_bonferroni",
                "q_value", "variance", "n", "estimator", "positions", "source_layer", "target_layer",
                "modulator_site", "modulator", "cv", "gating_flag")


@dataclass(frozen=True)
class EdgeRecords:
    """Tested pairs (first order) or triples (gating: source, modulator -> target).

    Arrays are [n_tested]; `decision` is the outcome of `jfig.stats.decide` on `p_value` and `mean`.
    `positions` labels what was measured (None: the graph's `positions`). First order may carry `cv`
    (std/|mean| of the per-input slopes) and `gating_flag` (the variance-based flag); gating carries
    `modulator` and `modulator_site` (None: the source's site).
    """

    source_site: np.ndarray
    source: np.ndarray
    target_site: np.ndarray
    target: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    n: np.ndarray
    p_value: np.ndarray
    decision: Decision
    estimator: str
    modulator: np.ndarray | None = None        # gating only
    extra: dict[str, np.ndarray] = field(default_factory=dict)   # more edge columns, [n_tested] each
    modulator_site: np.ndarray | None = None   # gating only
    positions: str | None = None
    cv: np.ndarray | None = None               # first order only
    gating_flag: np.ndarray | None = None      # first order only

    def __len__(self) -> int:
        return len(self.mean)


class NodeInfo:
    """Per-feature facts for the node table, read from an atlas: firing rate and top contexts.

    decode: token ids -> text (the model's tokenizer), or None to show ids.
    """

    def __init__(self, atlas: Any, decode: Callable[[list[int]], str] | None = None, n_contexts: int = 3):
        self.atlas, self.decode, self.n_contexts = atlas, decode, n_contexts

    def _known(self, site: str, feature: int) -> bool:
        return self.atlas is not None and site in self.atlas.sites and 0 <= int(feature) < self.atlas.d_sae[site]

    def firing_rate(self, site: str, feature: int) -> float | None:
        return float(self.atlas.firing_rate(site)[int(feature)]) if self._known(site, feature) else None

    def contexts(self, site: str, feature: int) -> str | None:
        """JSON list of {"text", "activation"} for the feature's top contexts; None if unknown."""
        if not self._known(site, feature):
            return None
        out = []
        for c in self.atlas.contexts(site, int(feature))[: self.n_contexts]:
            ids = [int(t) for t in c["tokens"] if t >= 0]
            text = self.decode(ids) if self.decode is not None else " ".join(map(str, ids))
            out.append({"text": text, "activation": round(float(c["activation"]), 4)})
        return json.dumps(out)


def assemble_graph(first_order: EdgeRecords, gating: EdgeRecords | None, *, node_info: NodeInfo,
                   sites: tuple[str, ...], positions: str, manifest: dict,
                   sources: list[tuple[str, int]] | None = None) -> InteractionGraph:
    """The typed graph: an edge per kept row (excitatory/inhibitory by the sign of the mean; gating
    rows as hyperedges), a node per measured source and edge endpoint. sources: the measured
    (site, feature) sources when `first_order` holds only some of the tested rows (a dense build
    passes its edges only); default: the sources of `first_order`'s rows."""
    extra_names = sorted(set(first_order.extra) | set(gating.extra if gating is not None else ()))
    edges: dict[str, list] = {k: [] for k in (*EDGE_COLUMNS, *extra_names)}

    def add(rec: EdgeRecords, i: int, kind: str) -> None:
        ss, ts = str(rec.source_site[i]), str(rec.target_site[i])
        gate = kind == "gating"
        row = dict(source_site=ss, source=int(rec.source[i]), target_site=ts, target=int(rec.target[i]), kind=kind,
                   weight=float(rec.mean[i]), p_value=float(rec.p_value[i]),
                   p_bonferroni=float(rec.decision.p_bonferroni[i]), q_value=float(rec.decision.q_value[i]),
                   variance=float(np.nan_to_num(rec.var[i])), n=int(rec.n[i]), estimator=rec.estimator,
                   positions=rec.positions or positions, source_layer=site_layer(ss, sites),
                   target_layer=site_layer(ts, sites),
                   modulator_site=(ss if rec.modulator_site is None else str(rec.modulator_site[i])) if gate else None,
                   modulator=int(rec.modulator[i]) if gate else None,
                   cv=None if rec.cv is None or not np.isfinite(rec.cv[i]) else float(rec.cv[i]),
                   gating_flag=None if rec.gating_flag is None else bool(rec.gating_flag[i]))
        for name in extra_names:
            row[name] = rec.extra[name][i].item() if name in rec.extra else None
        for k, v in row.items():
            edges[k].append(v)

    for i in np.flatnonzero(first_order.decision.keep):
        add(first_order, i, "excitatory" if first_order.mean[i] > 0 else "inhibitory")
    if gating is not None:
        for i in np.flatnonzero(gating.decision.keep):
            add(gating, i, "gating")
    keys = {(str(s), int(f)) for s, f in (sources if sources is not None else
                                          zip(first_order.source_site, first_order.source))}
    keys |= {(s, f) for s, f in zip(edges["target_site"], edges["target"])}
    keys |= {(s, f) for s, f in zip(edges["modulator_site"], edges["modulator"]) if f is not None}
    keys = sorted(keys, key=lambda k: (site_layer(k[0], sites), k[0], k[1]))
    nodes = {"site": [k[0] for k in keys], "feature": [k[1] for k in keys],
             "layer": [site_layer(k[0], sites) for k in keys],
             "firing_rate": [node_info.firing_rate(*k) for k in keys], "label": [None] * len(keys),
             "top_contexts": [node_info.contexts(*k) for k in keys]}
    return InteractionGraph.from_tables(nodes, edges, manifest)
