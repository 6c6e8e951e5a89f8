"""`analyze`: every statistic of an interaction graph against the same rewiring null, the feature
grammar, the three predictions, and a report.

    result = jfig.analyze(graph, seed=0, null_samples=20, atlas=atlas)
    result.predictions["sparsity"]["verdict"]
    result.write("analysis/")          # report.md, analysis.json, figures/*.png

One set of `null_samples` rewired copies (degrees per sign, signs and the forward order of sites
kept) serves the motif census, the network statistics, the gating triangles and, for the first
`community_nulls` of them, the community modularity. The hub-ablation test runs the model, so it
is passed in (`hub_test=hub_ablation(...)`) rather than run here.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.files import atomic_folder
from ..errors import JfigError
from . import plots
from .communities import communities
from .degrees import degree_fits
from .grammar import gating_triangles, taxonomy
from .hubs import hubs
from .layers import layer_decay, sign_comparison
from .motifs import motif_census
from .network import against_null, reciprocity
from .predictions import degree_vs_rate, excitation_by_layer, heavy_tails, sparsity
from .report import markdown_report
from .rewire import SignedEdges, rewire, signed_edges

log = logging.getLogger(__name__)
TOP_COMMUNITIES = 10        # communities listed with their members in analysis.json
TOP_MEMBERS = 50            # members listed per community (highest total degree first)


@dataclass
class Analysis:
    """What `analyze` found. Every field is plain data (dicts, lists, numbers, strings); `to_dict`
    is the analysis.json document."""

    graph: dict                      # nodes, edges by kind, pairs tested, sites, model
    settings: dict                   # seed, null_samples, community_nulls, seconds per part
    degrees: list[dict]              # degree_fits rows
    network: list[dict]              # statistic, value, null_mean, null_sd, z
    reciprocity: dict
    communities: dict
    signs: dict                      # excitatory vs inhibitory subgraphs
    layer_decay: dict
    hubs: list[dict]
    hub_ablation: dict | None
    motifs: list[dict]               # the taxonomy: motif, description, count, z, verdict, examples
    predictions: dict                # sparsity, heavy_tails, excitation_by_layer
    figures: list[str] = field(default_factory=list)
    comparison: object = field(default=None, repr=False)     # an EstimatorComparison to plot, or None
    signed: object = field(default=None, repr=False)         # the SignedEdges analysed (for the figures)
    source: object = field(default=None, repr=False)         # the InteractionGraph analysed

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("graph", "settings", "degrees", "network", "reciprocity", "communities",
                                             "signs", "layer_decay", "hubs", "hub_ablation", "motifs", "predictions",
                                             "figures")}
        return plain(out)

    def write(self, out_dir, *, figures: bool = True) -> Path:
        """Write report.md, analysis.json and figures/ into `out_dir` (replaced whole, never half-written)."""
        out_dir = Path(out_dir)
        with atomic_folder(out_dir) as tmp:
            if figures:
                self.figures = self.draw(tmp / "figures")
            (tmp / "analysis.json").write_text(json.dumps(self.to_dict(), indent=1) + "\n")
            (tmp / "report.md").write_text(markdown_report(self.to_dict()))
        return out_dir

    def draw(self, folder: Path) -> list[str]:
        edges, graph = self.signed, self.source
        made = [plots.degree_ccdf(edges, folder / "degree_ccdf.png"),
                plots.layer_decay(self.layer_decay, folder / "layer_decay.png"),
                plots.motif_z(self.motifs, folder / "motif_z.png"),
                plots.community_sizes(self.communities["methods"], folder / "community_sizes.png"),
                plots.adjacency(graph, folder / "adjacency.png")]
        if self.comparison is not None:
            made.append(plots.estimator_agreement(self.comparison, folder / "estimator_agreement.png"))
        return [f"figures/{p.name}" for p in made]


def plain(x):
    """JSON-ready: numpy scalars and arrays to Python, sets to sorted lists, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return [plain(v) for v in sorted(x, key=repr)]
    if isinstance(x, np.ndarray):
        return plain(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    return x


def check_options(null_samples, community_nulls) -> None:
    """Raise JfigError unless null_samples is an integer >= 1 and community_nulls None or an integer >= 0."""
    if not isinstance(null_samples, int) or isinstance(null_samples, bool) or null_samples < 1:
        raise JfigError(f"null_samples must be an integer >= 1, got {null_samples!r}")
    if community_nulls is not None and (not isinstance(community_nulls, int) or community_nulls < 0):
        raise JfigError(f"community_nulls must be None or an integer >= 0, got {community_nulls!r}")


def analyze(graph, *, seed: int = 0, null_samples: int = 20, community_nulls: int | None = 5, atlas=None,
            hub_test: dict | None = None, comparison=None, hubs_k: int = 10, examples: int = 3) -> "Analysis":
    """Analyse an InteractionGraph (see the module docstring). atlas: the build's Atlas, for agreement
    with the co-activation communities; hub_test: `hub_ablation(...)`'s result; comparison: an
    EstimatorComparison to plot."""
    check_options(null_samples, community_nulls)
    edges = signed_edges(graph)
    if len(edges) == 0:
        raise JfigError("the graph has no excitatory or inhibitory edges to analyse")
    times, t = {}, time.perf_counter()

    def lap(name):
        nonlocal t
        times[name] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()

    copies = [rewire(edges, seed=seed + k)[1] for k in range(null_samples)]
    lap("rewiring")
    census = motif_census(edges, copies=copies, seed=seed)
    gates = gating_triangles(graph, edges, copies)
    motifs = taxonomy(census, gates, edges, graph, examples=examples)
    lap("motifs")
    network = against_null(edges, copies, seed=seed)
    by_sign = {}
    for kind, sign in (("excitatory", 1), ("inhibitory", -1)):
        keep = edges.sign == sign
        if keep.sum() >= 2:
            sub = SignedEdges(edges.source[keep], edges.target[keep], edges.sign[keep], edges.layer, edges.names,
                              None if edges.weight is None else edges.weight[keep])
            by_sign[kind] = against_null(sub, [c[keep] for c in copies], seed=seed)
    lap("network")
    n_comm = null_samples if community_nulls is None else min(community_nulls, null_samples)
    atlas_groups = None
    if atlas is not None:                  # co-activation communities among the graph's own features
        by_site: dict = {}
        for site, f in edges.names or []:
            by_site.setdefault(site, []).append(f)
        atlas_groups = atlas.communities(seed=seed, features=by_site, method="leiden")
    comm = communities(edges, copies[:n_comm], seed=seed, atlas_groups=atlas_groups)
    lap("communities")
    fits = degree_fits(edges).to_pylist()
    lap("degree fits")
    st = graph.manifest.get("statistics") or {}
    n_first = len(edges)
    preds = {"sparsity": sparsity(n_first, int(st.get("n_tested", 0))),
             "heavy_tails": heavy_tails(fits, hub_test, degree_vs_rate(graph)),
             "excitation_by_layer": excitation_by_layer(graph)}
    names = edges.names or []
    degree = np.bincount(edges.source, minlength=len(edges.layer)) + np.bincount(edges.target, minlength=len(edges.layer))
    for method in comm["methods"].values():
        members = sorted(method.pop("members"), key=len, reverse=True)[:TOP_COMMUNITIES]
        method["largest"] = [{"size": len(c), "members": [list(names[i]) for i in sorted(c, key=lambda v: -degree[v])
                                                          [:TOP_MEMBERS]]} for c in members]
    result = Analysis(
        graph={"nodes": graph.n_nodes, "edges": graph.edges_by_kind(), "pairs_tested": st.get("n_tested"),
               "model": (graph.manifest.get("model") or {}).get("name"),
               "sites": sorted({*graph.nodes.column("site").to_pylist()})},
        settings={"seed": seed, "null_samples": null_samples, "community_nulls": n_comm,
                  "null": "double-edge swaps within a sign, keeping every feature's in- and out-degree per "
                          "sign and the forward order of sites", "seconds": times},
        degrees=fits, network=network, reciprocity=reciprocity(edges), communities=comm,
        signs={**sign_comparison(graph), "network": by_sign}, layer_decay=layer_decay(graph), hubs=hubs(graph, k=hubs_k),
        hub_ablation=hub_test, motifs=motifs, predictions=preds, comparison=comparison, signed=edges, source=graph)
    lap("tables")
    log.info("analysed %d edges against %d rewired copies in %.1f s", n_first, null_samples, sum(times.values()))
    return result
