"""Signed three-node motifs of an interaction graph, counted and compared with the rewiring null.

    census = motif_census(signed_edges(graph), null_samples=50, seed=0)
    census.table            # motif, count, null mean, null sd, z, empirical p, fixed_by_degrees

Motifs (a, b, c distinct; signs + excitatory, - inhibitory):

- chain s1 s2:        a -s1-> b -s2-> c (whether or not a -> c exists)
- convergence s1 s2:  a -s1-> c <-s2- b (two inputs of one node)
- divergence s1 s2:   c <-s1- a -s2-> b (two outputs of one node)
- ffl coherent:       a -> b -> c and a -> c with sign(a->c) = sign(a->b) * sign(b->c) (the direct
                      and the indirect path agree); ffl incoherent: they disagree

Counts come from sparse matrix products (scipy.sparse), no loop over nodes or edges. Convergence
and divergence counts depend only on each node's in- and out-degree per sign, which the rewiring
keeps; so do chains, Σ_b in_s1(b) · out_s2(b), when no two nodes point at each other (every edge
forward in layer). Their null is then a single value: they are reported with `fixed_by_degrees` set
and no z. Against this null the feed-forward loops are the three-node structure a graph can have
beyond its degrees.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy import sparse

from ..errors import JfigError
from .rewire import SignedEdges, rewire

SIGNS = {"+": 1, "-": -1}
PAIRS = ("++", "+-", "-+", "--")
MOTIFS = (*(f"chain {p}" for p in PAIRS), "convergence ++", "convergence +-", "convergence --",
          "divergence ++", "divergence +-", "divergence --", "ffl coherent", "ffl incoherent")
FIXED_BY_DEGREES = tuple(m for m in MOTIFS if m.startswith(("convergence", "divergence")))
CHAINS = tuple(m for m in MOTIFS if m.startswith("chain"))


def _adjacency(source, target, keep, n) -> sparse.csr_matrix:
    ones = np.ones(int(keep.sum()))
    return sparse.csr_matrix((ones, (source[keep], target[keep])), shape=(n, n))


def motif_counts(edges: SignedEdges, target: np.ndarray | None = None) -> dict[str, int]:
    """Counts of every motif in MOTIFS; `target` replaces edges.target (a rewired copy)."""
    tgt = edges.target if target is None else target
    n = len(edges.layer)
    pos = _adjacency(edges.source, tgt, edges.sign > 0, n)
    neg = _adjacency(edges.source, tgt, edges.sign < 0, n)
    mats = {"+": pos, "-": neg}
    out = {}
    for p in PAIRS:
        path = mats[p[0]] @ mats[p[1]]
        out[f"chain {p}"] = int(path.sum() - path.diagonal().sum())
    d_in = {s: np.asarray(m.sum(0)).ravel() for s, m in mats.items()}
    d_out = {s: np.asarray(m.sum(1)).ravel() for s, m in mats.items()}
    for name, d in (("convergence", d_in), ("divergence", d_out)):
        out[f"{name} ++"] = int((d["+"] * (d["+"] - 1) // 2).sum())
        out[f"{name} +-"] = int((d["+"] * d["-"]).sum())
        out[f"{name} --"] = int((d["-"] * (d["-"] - 1) // 2).sum())
    total, signed = pos + neg, pos - neg
    n_ffl = int((total @ total).multiply(total).sum())
    agree = int(round((signed @ signed).multiply(signed).sum()))
    out["ffl coherent"], out["ffl incoherent"] = (n_ffl + agree) // 2, (n_ffl - agree) // 2
    return out


@dataclass(frozen=True)
class MotifCensus:
    """Motif counts of a graph against `null_samples` rewired copies. `table` has one row per motif:
    count, null_mean, null_sd, z ((count - mean) / sd; NaN where the null does not vary), p_over and
    p_under (empirical one-sided p-values, (1 + #null >= count) / (1 + samples) and the same for <=),
    fixed_by_degrees (the count is the same in every rewired copy; z is NaN)."""

    table: pa.Table
    null_samples: int
    preserve: str
    seed: int

    def z(self, motif: str) -> float:
        rows = self.table.column("motif").to_pylist()
        return self.table.column("z")[rows.index(motif)].as_py()


def motif_census(edges: SignedEdges, *, null_samples: int = 50, seed: int = 0, preserve: str = "layer_order",
                 swaps_per_edge: float = 10.0, copies: list[np.ndarray] | None = None) -> MotifCensus:
    """Every motif's count in the graph and in `null_samples` rewired copies (seeds seed, seed+1, ...);
    `copies` (rewired targets, e.g. shared with other statistics) replaces drawing them here."""
    if copies is None:
        if null_samples < 1:
            raise JfigError(f"null_samples must be >= 1, got {null_samples}")
        copies = [rewire(edges, seed=seed + k, preserve=preserve, swaps_per_edge=swaps_per_edge)[1]
                  for k in range(null_samples)]
    null_samples = len(copies)
    if null_samples < 1:
        raise JfigError("motif_census needs at least one rewired copy")
    real = motif_counts(edges)
    null = np.empty((null_samples, len(MOTIFS)))
    for k, target in enumerate(copies):
        copy = motif_counts(edges, target)
        null[k] = [copy[m] for m in MOTIFS]
    count = np.asarray([real[m] for m in MOTIFS], np.float64)
    mean, sd = null.mean(0), null.std(0, ddof=1) if null_samples > 1 else np.zeros(len(MOTIFS))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(sd > 0, (count - mean) / sd, np.nan)
    p_over = (1 + (null >= count).sum(0)) / (1 + null_samples)
    p_under = (1 + (null <= count).sum(0)) / (1 + null_samples)
    forward = bool((edges.layer[edges.source] < edges.layer[edges.target]).all())
    fixed = [m in FIXED_BY_DEGREES or (forward and m in CHAINS) for m in MOTIFS]
    z = np.where(fixed, np.nan, z)
    table = pa.table({"motif": list(MOTIFS), "count": count.astype(np.int64), "null_mean": mean, "null_sd": sd,
                      "z": z, "p_over": p_over, "p_under": p_under, "fixed_by_degrees": fixed})
    return MotifCensus(table, null_samples, preserve, seed)
