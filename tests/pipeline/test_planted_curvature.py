"""Planted recovery with curvature: targets pass through an RMS normalisation, so every (source, target)
pair has a small, consistent effect (tests/support/planted_curvature.py), plus per-token noise.

Significance alone reports nearly every pair; the random-direction threshold τ is what keeps only
the planted edges, under every estimator. The planted effects are 20-100 times the normalisation's
and 64 inputs per source make them significant under any valid sign-flip or t test, so the test does
not depend on the details of the p-values.
"""
import numpy as np
import pytest

from jfig import build_graph
from tests.support.planted_curvature import TGT, curvature_model, curvature_truth

OPTS = dict(seq_len=8, top_k=24, min_alignment=0.0, max_sequences=128, inputs_per_source=64, progress=False)
METHODS = ("clamp", "ablate", "mean_ablate", "jacobian")


@pytest.fixture(scope="module")
def planted():
    model, saes = curvature_model()
    tokens = np.random.default_rng(0).integers(0, 256, size=(128, 8))
    return model, saes, tokens


def _edges(graph):
    """({(source, target): (kind, weight)} of first-order edges, {(min(i, k), max(i, k), j)} of gates)."""
    e = graph.edges.to_pydict()
    first = {(s, t): (k, w) for s, t, k, w in zip(e["source"], e["target"], e["kind"], e["weight"]) if k != "gating"}
    gates = {(min(s, m), max(s, m), t) for s, m, t, k in zip(e["source"], e["modulator"], e["target"], e["kind"])
             if k == "gating"}
    return first, gates


def _precision_recall(found: dict, truth: dict) -> tuple[float, float]:
    """A found edge counts when its pair and its kind are right."""
    tp = sum(1 for pair, kind in found.items() if truth.get(pair) == kind)
    return tp / max(len(found), 1), tp / len(truth)


@pytest.mark.parametrize("method", METHODS)
def test_planted_edges_found_only_through_tau(planted, method):
    model, saes, tokens = planted
    true_first, true_gates = curvature_truth()

    g = build_graph(model, saes, tokens, method=method, **OPTS)
    first, gates = _edges(g)
    stats = g.manifest["statistics"]
    precision, recall = _precision_recall({p: k for p, (k, _) in first.items()}, true_first)
    assert precision >= 0.95 and recall >= 0.95, (method, first)
    g_precision, g_recall = _precision_recall({p: "gating" for p in gates}, {p: "gating" for p in true_gates})
    assert g_precision >= 0.95 and g_recall >= 0.95, (method, gates)
    assert stats["n_tested"] == 24 * 24                                 # every source on every target
    tau = stats["tau"][TGT]
    assert tau > 0 and stats["tau_gate"] > 0

    # The same measurement without the random-direction control (tau = 0): significance alone.
    bare = build_graph(model, saes, tokens, method=method, null_every=0, gating=False, **OPTS)
    assert not any(bare.manifest["statistics"]["tau"].values())
    found, _ = _edges(bare)
    false = {p: w for p, (_, w) in found.items() if p not in true_first}
    planted_w = [abs(w) for p, (_, w) in found.items() if p in true_first]
    n_null_pairs = bare.manifest["statistics"]["n_tested"] - len(true_first)
    assert len(false) >= 0.8 * n_null_pairs, (method, len(false), n_null_pairs)  # the normalisation's effects
    assert len(planted_w) == len(true_first)
    # ... are small and consistent: significant, but below tau, and every planted effect is above it
    assert max(abs(w) for w in false.values()) < tau < min(planted_w), (method, tau)
