"""Influence on the logits and pruning, as circuit-tracer defines them (numpy, float64).

A: the adjacency [n, n] (rows targets, columns sources). Normalised, each row holds the absolute
weights into its node divided by their sum (each node's inputs as fractions). A node's influence is
what it contributes to the logits through every path: w @ (Â + Â² + ...), with w the logit nodes'
probabilities; the graph has no cycles, so the series ends after at most depth terms.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import JfigError


def normalize(A: np.ndarray, floor: float = 1e-10, out: np.ndarray | None = None) -> np.ndarray:
    """|A| with each row divided by its sum (rows summing to less than `floor`: by `floor`); float64,
    written into `out` when given (one n x n buffer serves a whole pruning)."""
    a = np.abs(A, out=out, dtype=np.float64) if out is not None else np.abs(np.asarray(A, np.float64))
    a /= np.maximum(a.sum(axis=1, keepdims=True), floor)
    return a


def influence(A_norm: np.ndarray, weights: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """weights @ (Â + Â² + ...) [n], summed until a term is all zeros."""
    current = np.asarray(weights, np.float64) @ A_norm
    total = current.copy()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ A_norm
        total += current
    raise JfigError(f"influence did not converge after {max_iter} terms: the adjacency has a cycle")


def threshold(scores: np.ndarray, fraction: float) -> float:
    """The score above which the largest scores hold `fraction` of their sum: the first score, in
    descending order, whose cumulative share reaches it. Scores are >= 0; only the positive ones are
    sorted (zeros add nothing to the sum; past the positive ones the answer is 0 when there are zeros)."""
    flat = np.ravel(scores)
    ordered = np.sort(flat[flat > 0])[::-1]
    if not len(ordered):
        return 0.0
    share = np.cumsum(ordered) / ordered.sum()
    at = int(np.searchsorted(share, fraction))
    if at < len(ordered):
        return ordered[at]
    return 0.0 if len(ordered) < flat.size else ordered[-1]


class PruneResult(NamedTuple):
    node_mask: np.ndarray            # [n] bool: nodes kept
    edge_mask: np.ndarray            # [n, n] bool: edges kept (target, source)
    cumulative_scores: np.ndarray    # [n]: share of total influence of the nodes at least as influential


def logit_weights(n_nodes: int, probabilities) -> np.ndarray:
    """[n]: the logit nodes' (last) probabilities, zeros elsewhere."""
    w = np.zeros(n_nodes)
    p = np.asarray(probabilities, np.float64)
    w[n_nodes - len(p):] = p
    return w


def prune(A, probabilities, n_features: int, n_tokens: int, node_threshold: float = 0.8,
          edge_threshold: float = 0.98) -> PruneResult:
    """circuit-tracer's `prune_graph`: keep the nodes holding `node_threshold` of the influence (tokens
    and logits always), then the edges holding `edge_threshold` of the edge influence in the graph of
    kept nodes, then drop, until nothing changes, feature and error nodes left without an outgoing kept
    edge and feature nodes without an incoming one."""
    for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= t <= 1.0:
            raise JfigError(f"{name} must be between 0 and 1, got {t}")
    A = np.asarray(A)
    n = A.shape[0]
    n_logits = len(np.atleast_1d(probabilities))
    w = logit_weights(n, probabilities)
    buf = np.empty((n, n))                       # one float64 buffer: normalised, then pruned, then edge scores
    node_influence = influence(normalize(A, out=buf), w)
    node_mask = node_influence >= threshold(node_influence, node_threshold)
    node_mask[n - n_logits - n_tokens:] = True
    np.abs(A, out=buf, dtype=np.float64)
    buf[~node_mask] = 0
    buf[:, ~node_mask] = 0
    pruned_norm = normalize(buf, out=buf)
    pruned_norm *= (influence(pruned_norm, w) + w)[:, None]
    edge_mask = pruned_norm >= threshold(pruned_norm, edge_threshold)
    del buf, pruned_norm
    inner = n - n_logits - n_tokens
    while True:
        before = node_mask.copy()
        node_mask[:inner] &= edge_mask[:, :inner].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)
        if (node_mask == before).all():
            break
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
    order = np.argsort(-node_influence, kind="stable")
    cumulative = np.zeros(n)
    cumulative[order] = np.cumsum(node_influence[order]) / node_influence.sum()
    return PruneResult(node_mask, edge_mask, cumulative)


def graph_scores(A, probabilities, n_features: int, n_errors: int, n_tokens: int) -> tuple[float, float]:
    """circuit-tracer's (replacement, completeness) scores. Replacement: the tokens' share of the
    influence that tokens and error nodes have; completeness: the influence-weighted share (logit
    weights included) of each node's normalised inputs that do not come from error nodes."""
    A_norm = normalize(A)
    w = logit_weights(A_norm.shape[0], probabilities)
    infl = influence(A_norm, w)
    errors = slice(n_features, n_features + n_errors)
    tokens = slice(errors.stop, errors.stop + n_tokens)
    token_infl, error_infl = infl[tokens].sum(), infl[errors].sum()
    replacement = token_infl / (token_infl + error_infl)
    non_error = 1.0 - A_norm[:, errors].sum(axis=1)
    out = infl + w
    return float(replacement), float((non_error * out).sum() / out.sum())


def partial_influence(rows: np.ndarray, probabilities, row_nodes: np.ndarray) -> np.ndarray:
    """Influence [n] of every node from the rows computed so far (circuit-tracer's
    `compute_partial_influences`): rows [k, n] are the adjacency rows of nodes `row_nodes` [k], logit
    rows first; it ranks the features still to visit when a graph keeps only some of them."""
    a = np.abs(np.asarray(rows, np.float64))
    a /= np.maximum(a.sum(axis=1, keepdims=True), 1e-8)
    n = a.shape[1]
    prod = np.zeros(n)
    p = np.asarray(probabilities, np.float64)
    prod[n - len(p):] = p
    total = np.zeros(n)
    for _ in range(128):
        prod = prod[row_nodes] @ a
        if not prod.any():
            return total
        total += prod
    raise JfigError("partial influence did not converge in 128 terms")
