"""Predicted cascades: how clamping some features changes the others, read off an interaction graph.

Each edited feature is held at its change (a clamp); every other node j changes by

    Δf_j = Σ_{first-order rows i -> j} w_ij Δf_i + Σ_{gating rows (i, k -> j)} g_ikj Δf_i Δf_k

(g in mixed-derivative units ∂²f_j/∂α_i∂α_k; a row with i == k adds ½ g Δf_i², its Taylor term), and
changes of intermediate features propagate further. Nodes are indexed once (`CascadeNetwork`, sites in
forward order by `jfig.sites.sort_sites`, then feature id; `cascade_nodes` gives that order) and the
propagation is Δ ← clamp(bound(Δ W + gating(Δ))) on a dense Δ [n, N], `hops` times: after h steps every
path of at most h edges has contributed, so as many steps as there are sites equal one sweep in forward
order on a graph whose edges run forward.

The n rows are independent inputs (tokens): every effect acts at the token it comes from, whatever an
edge's `positions` column says. Bounds are below only: an SAE feature cannot fall below 0, so a node
with baseline activation b changes by at least −b (clamped features are not bounded).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import OptionError, ShapeError
from ..graph.index import Key, NodeIndex



def check_hops(hops) -> int | None:
    """`hops` as None or an int >= 1."""
    if hops is None:
        return None
    if isinstance(hops, bool) or not isinstance(hops, (int, np.integer)) or hops < 1:
        raise OptionError(f"hops must be None (propagate to the end) or an int >= 1, got {hops!r}", key="hops")
    return int(hops)


def check_key(key, what: str) -> Key:
    """A node key `(site, feature)`: a site name and an int feature id."""
    ok = isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str)
    if not ok or isinstance(key[1], bool) or not isinstance(key[1], (int, np.integer)):
        raise OptionError(f"{what}: keys must be (site, feature) pairs such as ('blocks.1.hook_resid_post', 7), "
                          f"got {key!r}", key=what)
    return key[0], int(key[1])


def check_values(values, what: str, *, minimum: float | None = None, allow_inf: bool = False) -> np.ndarray:
    """A float or a 1-D array [n] as float64 [] or [n]; finite (or +inf with `allow_inf`), >= `minimum`."""
    try:
        v = np.asarray(values, np.float64)
    except (TypeError, ValueError):
        raise OptionError(f"{what} must be a number or a 1-D array of numbers, got {type(values).__name__}",
                          key=what) from None
    if v.ndim > 1:
        raise ShapeError(f"{what} must be a number or a 1-D array [n] (one value per token), got shape {v.shape}")
    bad = np.isnan(v) | (np.isinf(v) if not allow_inf else np.isneginf(v))
    if bad.any():
        raise OptionError(f"{what} must be finite, got {v[bad].ravel()[0]}", key=what)
    if minimum is not None and (v < minimum).any():
        raise OptionError(f"{what} must be >= {minimum} (an SAE feature's activation), got {v[v < minimum].min()}",
                          key=what)
    return v


def common_length(arrays: dict, current: int | None = None) -> int | None:
    """The length n shared by the 1-D arrays among `arrays` ({label: array}); None when all are scalars."""
    n = current
    for label, v in arrays.items():
        if v.ndim == 1:
            if n is not None and len(v) != n:
                raise ShapeError(f"{label} has {len(v)} values, expected {n} like the other per-token arrays "
                                 f"(all arrays [n] must have the same n; scalars broadcast)")
            n = len(v)
    return n


def check_deltas(deltas) -> tuple[list[Key], dict[Key, np.ndarray], int | None]:
    """Keys, {key: float64 [] or [n]} and n (None when every delta is a scalar) of a deltas mapping."""
    if not isinstance(deltas, Mapping) or not deltas:
        raise OptionError("deltas must be a non-empty dict {(site, feature): change}, got "
                          f"{deltas!r:.80}", key="deltas")
    values = {}
    for key, value in deltas.items():
        key = check_key(key, "deltas")
        values[key] = check_values(value, f"deltas[{key!r}]")
    n = common_length({f"deltas[{k!r}]": v for k, v in values.items()})
    return list(values), values, n


def rows_of(values: list[np.ndarray], rows: int) -> np.ndarray:
    """[rows, k] from k values of shape [] or [rows]."""
    return np.stack([np.broadcast_to(v, (rows,)) for v in values], axis=1) if values else np.zeros((rows, 0))


@dataclass(frozen=True, eq=False)
class CascadeNetwork:
    """An interaction graph as sparse matrices over its N nodes (`index`, forward order).

    first_order: csr [N, N], entry (i, j) the summed weight of the first-order rows i -> j;
    gate_source, gate_modulator, gate_target [G] node indices and gate_weight [G] (halved where
    source == modulator); gate_matrix: csr [G, N], row g has a 1 at gate_target[g].
    """

    index: NodeIndex
    first_order: sp.csr_matrix
    gate_source: np.ndarray
    gate_modulator: np.ndarray
    gate_target: np.ndarray
    gate_weight: np.ndarray
    gate_matrix: sp.csr_matrix

    @classmethod
    def from_graph(cls, graph) -> "CascadeNetwork":
        index = NodeIndex.from_graph(graph)
        e = graph.edges
        gate = np.asarray(e["kind"].to_numpy(), object) == "gating"
        src = index.index_of(e["source_site"].to_numpy(), e["source"].to_numpy())
        tgt = index.index_of(e["target_site"].to_numpy(), e["target"].to_numpy())
        mod = index.index_of(np.asarray(e["modulator_site"].to_numpy(), object)[gate],
                             np.asarray(e["modulator"].to_numpy())[gate])
        weight = np.asarray(e["weight"].to_numpy(), np.float64)
        n = len(index)
        first = sp.csr_matrix((weight[~gate], (src[~gate], tgt[~gate])), shape=(n, n))
        g_src, g_tgt = src[gate], tgt[gate]
        g_weight = weight[gate] * np.where(g_src == mod, 0.5, 1.0)
        g_matrix = sp.csr_matrix((np.ones(len(g_tgt)), (np.arange(len(g_tgt)), g_tgt)), shape=(len(g_tgt), n))
        return cls(index, first, g_src, mod, g_tgt, g_weight, g_matrix)

    @property
    def n_nodes(self) -> int:
        return len(self.index)

    def locate(self, keys) -> np.ndarray:
        """Node indices [k] of k (site, feature) keys."""
        return self.index.locate(keys)

    def lower_bounds(self, baseline, n: int | None) -> np.ndarray | None:
        """−baseline as [rows, N] (rows = n or 1; −inf where unbounded), or None when baseline is None.

        baseline: None; a dict {(site, feature): value or [n]} whose keys are nodes (nodes not listed are
        unbounded); or an array [N] or [n, N] aligned with `cascade_nodes` (np.inf = unbounded). Values >= 0."""
        if baseline is None:
            return None
        rows = n or 1
        if isinstance(baseline, Mapping):
            values = {check_key(k, "baseline"): check_values(v, f"baseline[{k!r}]", minimum=0.0, allow_inf=True)
                      for k, v in baseline.items()}
            common_length({f"baseline[{k!r}]": v for k, v in values.items()}, rows if n else None)
            lower = np.full((rows, self.n_nodes), -np.inf)
            lower[:, self.locate(values)] = -rows_of(list(values.values()), rows)
            return lower
        b = np.asarray(baseline, np.float64)
        if b.shape not in ((self.n_nodes,), (1, self.n_nodes), (rows, self.n_nodes)):
            raise ShapeError(f"baseline array has shape {b.shape}; expected [N] = ({self.n_nodes},) or [n, N] = "
                             f"({rows}, {self.n_nodes}), columns in cascade_nodes(graph) order")
        check_values(b.ravel(), "baseline", minimum=0.0, allow_inf=True)
        return -np.broadcast_to(b, (rows, self.n_nodes))

    def node_rows(self, values, n: int | None, what: str) -> np.ndarray:
        """An array [N] or [n, N] (cascade_nodes order) as finite [rows, N]."""
        rows = n or 1
        a = np.asarray(values, np.float64)
        if a.shape not in ((self.n_nodes,), (1, self.n_nodes), (rows, self.n_nodes)):
            raise ShapeError(f"{what} array has shape {a.shape}; expected [N] = ({self.n_nodes},) or [n, N] = "
                             f"({rows}, {self.n_nodes}), columns in cascade_nodes(graph) order")
        if not np.isfinite(a).all():
            raise OptionError(f"{what} has non-finite values; expected finite pre-activations and thresholds")
        return np.broadcast_to(a, (rows, self.n_nodes))

    def gating(self, delta: np.ndarray) -> np.ndarray:
        """Σ_g w_g Δ_source Δ_modulator into each gate's target: [rows, N] from Δ [rows, N]."""
        products = self.gate_weight * delta[:, self.gate_source] * delta[:, self.gate_modulator]   # [rows, G]
        return np.asarray(self.gate_matrix.T @ products.T).T

    def tangent(self, delta0: np.ndarray) -> sp.csr_matrix:
        """[N, N]: the first-order matrix plus the gating rows linearised at Δ0 [N]
        (source -> target with w Δ0_modulator, modulator -> target with w Δ0_source)."""
        rows = np.concatenate([self.gate_source, self.gate_modulator])
        cols = np.concatenate([self.gate_target, self.gate_target])
        vals = np.concatenate([self.gate_weight * delta0[self.gate_modulator],
                               self.gate_weight * delta0[self.gate_source]])
        return (self.first_order + sp.csr_matrix((vals, (rows, cols)), shape=self.first_order.shape)).tocsr()

    def propagate(self, fixed_index: np.ndarray, fixed_values: np.ndarray, *, lower: np.ndarray | None = None,
                  hops: int | None = None, gating: bool = True, matrix: sp.csr_matrix | None = None,
                  pre: np.ndarray | None = None, threshold: np.ndarray | None = None) -> np.ndarray:
        """Δ [rows, N] with the nodes `fixed_index` [k] clamped at `fixed_values` [rows, k].

        Steps Δ ← clamp(max(Δ M + gating(Δ), lower)) `hops` times (default: the number of sites) or until
        nothing changes; M is `matrix` (default the first-order weights). With `pre` and `threshold`
        ([rows, N]: baseline pre-activations and activation thresholds) Δ M + gating(Δ) is a change of
        pre-activations and the step is the change of activation, act(pre + Δpre) − act(pre) with
        act(z) = z where z > max(threshold, 0), else 0."""
        matrix = self.first_order if matrix is None else matrix
        rows = fixed_values.shape[0]
        clamped = np.zeros(self.n_nodes, bool)
        clamped[fixed_index] = True
        fixed = np.zeros((rows, self.n_nodes))
        fixed[:, fixed_index] = fixed_values
        delta, transposed = fixed, matrix.T.tocsr()
        for _ in range(hops or max(len(self.index.sites), 1)):
            step = np.asarray(transposed @ delta.T).T
            if gating and len(self.gate_weight):
                step = step + self.gating(delta)
            if pre is not None:
                step = activate(pre + step, threshold) - activate(pre, threshold)
            elif lower is not None:
                step = np.maximum(step, lower)
            new = np.where(clamped, fixed, step)
            if np.array_equal(new, delta):
                break
            delta = new
        return delta

    def changes(self, delta: np.ndarray, keep: np.ndarray, per_token: bool) -> dict[Key, np.ndarray]:
        """{key: change} for the nonzero columns of Δ [rows, N] and the indices `keep`, in forward order;
        values [rows] when `per_token`, else 0-d."""
        wanted = np.any(delta != 0, axis=0)
        wanted[keep] = True
        nodes = self.index.keys
        return {nodes[j]: (delta[:, j].copy() if per_token else np.asarray(delta[0, j]))
                for j in np.flatnonzero(wanted)}


def activate(z: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """An SAE activation on pre-activations z: z where z > max(threshold, 0), else 0 (ReLU: threshold 0;
    JumpReLU: its thresholds; TopK: each token's k-th largest pre-activation)."""
    return np.where(z > np.maximum(threshold, 0.0), z, 0.0)


def cascade_nodes(graph) -> list[Key]:
    """The graph's nodes (site, feature) in the order the cascade indexes them: sites in forward order
    (`jfig.sites.sort_sites`), then feature id. Baseline arrays [N] / [n, N] use this column order."""
    return NodeIndex.from_graph(graph).keys


COMPOSE = ("auto", "untested", "all")


def tested_site_pairs(graph) -> set[tuple[str, str]] | None:
    """The (source site, target site) pairs a build tested (manifest statistics.n_tested_by_site_pair),
    or None when the manifest does not say."""
    pairs = (graph.manifest.get("statistics") or {}).get("n_tested_by_site_pair")
    if not pairs:
        return None
    return {tuple(k.split(" -> ")) for k, v in pairs.items() if v}


def composition_matrix(network: "CascadeNetwork", edited: np.ndarray, tested: set) -> sp.csr_matrix:
    """The first-order matrix with the rows of non-edited nodes cut to targets at sites that no edited
    feature's site was tested against: a tested pair's weight is already the total effect (every
    path through intermediate features included), so composing paths into it would count them twice."""
    sites = network.index.sites
    edited_sites = {sites[i] for i in np.unique(network.index.node_site[edited])}
    covered = np.asarray([any((a, b) in tested for a in edited_sites) for b in sites])
    w = network.first_order.tocoo()
    keep = np.isin(w.row, edited) | ~covered[network.index.node_site[w.col]]
    return sp.csr_matrix((w.data[keep], (w.row[keep], w.col[keep])), shape=w.shape)


def predict_cascade(graph, deltas, *, baseline=None, hops: int | None = None, gating: bool = True,
                    pre=None, threshold=None, compose: str = "auto") -> dict[Key, np.ndarray]:
    """Predicted change of every node when the features in `deltas` are clamped at their changes.

    deltas: {(site, feature): change}, each a float or an array [n] (one value per token; all arrays of
    one n, scalars broadcast). These features stay at their change (a clamp).
    baseline: None (no bounds), {(site, feature): activation or [n]} (nodes not listed are unbounded),
    or an array [N] / [n, N] in `cascade_nodes(graph)` order (np.inf = unbounded); a node's change
    is then at least −baseline. Clamped features are not bounded.
    hops: propagation steps (None: as many as there are sites, i.e. to the end; 1: direct targets of
    the edited features only). gating: include the gating rows' Δf_i·Δf_k terms.
    pre, threshold: for graphs whose targets were read before the activation function (a build with
    read="pre"): arrays [N] / [n, N] in `cascade_nodes` order of every node's baseline pre-activation
    and activation threshold (ObservedCascade.clean_columns gives both). The summed effects are then
    changes of pre-activation, and a node's change is act(pre + Δpre) − act(pre): a feature below its
    threshold stays off unless pushed past it, one above it cannot fall below 0. Replaces `baseline`.
    compose: which paths through intermediate features add up. Edges measured by clamping are total
    effects: the weight of a tested pair (i, j) already includes every path from i to j, so chaining
    i -> k -> j on top counts those paths twice. "untested" composes paths only into sites that no
    edited feature's site was tested against (per the manifest's statistics.n_tested_by_site_pair);
    "all" chains every edge (right for graphs of direct effects between adjacent sites); "auto" is
    "untested" when the manifest lists its tested site pairs, else "all".

    Returns {(site, feature): change} in forward order: the clamped features and every node whose
    predicted change is nonzero; values are arrays [n] when any delta or baseline is per token,
    else 0-d arrays. Raises (before any propagation) for an unknown site or node, a non-finite
    delta, arrays of different lengths, or hops < 1.
    """
    hops = check_hops(hops)
    if compose not in COMPOSE:
        raise OptionError(f"unknown compose {compose!r}; expected one of {COMPOSE}")
    keys, values, n = check_deltas(deltas)
    network = CascadeNetwork.from_graph(graph)
    index = network.locate(keys)
    tested = tested_site_pairs(graph) if compose != "all" else None
    if compose == "untested" and tested is None:
        raise OptionError("compose='untested' needs the graph manifest's statistics.n_tested_by_site_pair; this "
                          "graph has none (use compose='all')")
    matrix = composition_matrix(network, index, tested) if tested is not None else None
    if (pre is None) != (threshold is None):
        raise OptionError("pre and threshold go together: pass both (pre-activations and thresholds) or neither")
    if pre is not None and baseline is not None:
        raise OptionError("pass either baseline (activations: lower bounds) or pre and threshold, not both")
    n = common_length(baseline_lengths(baseline if pre is None else pre), n)
    lower = network.lower_bounds(baseline, n)
    pre_rows = None if pre is None else network.node_rows(pre, n, "pre")
    thr_rows = None if threshold is None else network.node_rows(threshold, n, "threshold")
    delta = network.propagate(index, rows_of([values[k] for k in keys], n or 1), lower=lower, hops=hops,
                              gating=gating, pre=pre_rows, threshold=thr_rows, matrix=matrix)
    return network.changes(delta, index, per_token=n is not None)


def baseline_lengths(baseline) -> dict[str, np.ndarray]:
    """{label: values} of a dict baseline's 1-D arrays, or of a 2-D array baseline's token axis, for
    `common_length`."""
    if isinstance(baseline, Mapping):
        return {f"baseline[{k!r}]": np.asarray(v) for k, v in baseline.items() if np.ndim(v) == 1}
    if baseline is not None and np.ndim(baseline) == 2 and np.shape(baseline)[0] != 1:
        return {"baseline (rows of the [n, N] array)": np.empty(np.shape(baseline)[0])}
    return {}
