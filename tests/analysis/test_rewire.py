"""The rewiring null keeps degrees per sign, signs and the layer order, and forgets the wiring."""
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jfig

from jfig.analysis.rewire import SignedEdges, rewire, signed_edges
from jfig.errors import JfigError, ShapeError


@st.composite
def layered_graphs(draw):
    """A random signed graph on nodes in 2-5 layers, edges only forward in layer (or, sometimes,
    also within a layer), no repeated (source, target)."""
    n_layers = draw(st.integers(2, 5))
    per_layer = draw(st.lists(st.integers(1, 8), min_size=n_layers, max_size=n_layers))
    layer = np.repeat(np.arange(n_layers), per_layer)
    same_layer = draw(st.booleans())
    pairs = [(a, b) for a in range(len(layer)) for b in range(len(layer))
             if a != b and (layer[a] < layer[b] or (same_layer and layer[a] == layer[b] and a < b))]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=60)) if pairs else []
    signs = draw(st.lists(st.sampled_from([-1, 1]), min_size=len(chosen), max_size=len(chosen)))
    src = np.asarray([a for a, _ in chosen], np.int64)
    tgt = np.asarray([b for _, b in chosen], np.int64)
    return SignedEdges(src, tgt, np.asarray(signs, np.int64), layer)


def degrees(src, tgt, sign):
    return Counter(zip(src.tolist(), sign.tolist())), Counter(zip(tgt.tolist(), sign.tolist()))


@settings(max_examples=80, deadline=None)
@given(layered_graphs(), st.integers(0, 2 ** 16), st.sampled_from(["layer_order", "layer_pairs"]))
def test_rewiring_keeps_degrees_signs_and_layer_order(g, seed, preserve):
    src, tgt = rewire(g, seed=seed, preserve=preserve)
    assert degrees(src, tgt, g.sign) == degrees(g.source, g.target, g.sign)
    assert (src == g.source).all()                                   # sources (and signs) stay with their edge
    assert len(set(zip(src.tolist(), tgt.tolist()))) == len(src)     # no repeated edge
    assert (src != tgt).all()
    if (g.layer[g.source] < g.layer[g.target]).all():
        assert (g.layer[src] < g.layer[tgt]).all()
    else:
        assert (g.layer[src] <= g.layer[tgt]).all()
    if preserve == "layer_pairs":
        key = lambda s, t: Counter(zip(g.layer[s].tolist(), g.layer[t].tolist(), g.sign.tolist()))  # noqa: E731
        assert key(src, tgt) == key(g.source, g.target)


def test_rewiring_forgets_the_wiring_and_is_reproducible():
    rng = np.random.default_rng(0)
    layer = np.repeat(np.arange(4), 50)
    pairs = {(int(a), int(b)) for a, b in zip(rng.integers(0, 50, 3000), rng.integers(50, 200, 3000))}
    src, tgt = map(np.asarray, zip(*sorted(pairs)))
    g = SignedEdges(src, tgt, rng.choice([-1, 1], len(src)), layer)
    a, b = rewire(g, seed=1), rewire(g, seed=1)
    assert (a[1] == b[1]).all()                                      # same seed, same copy
    assert (a[1] != g.target).mean() > 0.9                           # most targets moved
    assert (rewire(g, seed=2)[1] != a[1]).mean() > 0.9               # another seed, another copy
    assert (rewire(g, swaps_per_edge=0)[1] == g.target).all()


def test_bad_input_is_named():
    layer = np.zeros(3, np.int64)
    with pytest.raises(ShapeError, match="node ids in"):
        SignedEdges(np.array([0]), np.array([5]), np.array([1]), layer)
    with pytest.raises(JfigError, match="sign must be"):
        SignedEdges(np.array([0]), np.array([1]), np.array([0]), layer)
    g = SignedEdges(np.array([0, 1]), np.array([1, 2]), np.array([1, 1]), np.array([0, 1, 2]))
    with pytest.raises(JfigError, match="unknown preserve"):
        rewire(g, preserve="degrees")


def test_signed_edges_of_a_graph():
    nodes = {"site": ["a", "a", "b"], "feature": [0, 1, 5], "layer": [0, 0, 1], "firing_rate": [0.1, 0.2, 0.3],
             "label": [None] * 3, "top_contexts": [None] * 3}
    edges = {"source_site": ["a", "a"], "source": [0, 1], "target_site": ["b", "b"], "target": [5, 5],
             "kind": ["excitatory", "inhibitory"], "weight": [1.0, -2.0], "p_value": [1e-6, 1e-6],
             "p_bonferroni": [1e-5, 1e-5], "q_value": [1e-5, 1e-5], "variance": [0.1, 0.1], "n": [32, 32],
             "estimator": ["clamp"] * 2, "positions": ["same"] * 2, "source_layer": [0, 0], "target_layer": [1, 1],
             "modulator_site": [None, None], "modulator": [None, None]}
    g = signed_edges(jfig.InteractionGraph.from_tables(nodes, edges, {}))
    assert g.source.tolist() == [0, 1] and g.target.tolist() == [2, 2] and g.sign.tolist() == [1, -1]
    assert g.layer.tolist() == [0, 0, 1] and g.names == [("a", 0), ("a", 1), ("b", 5)]
