"""predict_cascade on synthetic graphs: exact values along a chain and through a gate, hops, clamps,
activation bounds, agreement with a plain node-by-node sweep, and bad input."""
import jax
import numpy as np
import pyarrow as pa
import pytest

import jfig
from jfig.errors import JfigError, OptionError, ShapeError, SiteError
from jfig.steering import cascade_nodes, predict_cascade
from jfig.steering.observe import activation_threshold
from tests.support.graphs import graph_from_edges, random_layered

SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
S0, S1, S2 = SITES
A, M, B, D, C, E = (S0, 0), (S0, 1), (S1, 0), (S1, 1), (S2, 0), (S2, 1)
G = 1.5


def set_gating_weights(graph, weights):
    """The graph with its gating rows' weights (in row order) replaced by `weights`."""
    e = graph.edges
    weight = np.asarray(e["weight"].to_numpy(), np.float64).copy()
    weight[np.asarray(e["kind"].to_numpy(), object) == "gating"] = weights
    edges = e.set_column(e.schema.get_field_index("weight"), "weight", pa.array(weight))
    return jfig.InteractionGraph.from_tables(graph.nodes, edges, graph.manifest)


def chain_graph():
    """A -> B (2), B -> C (-0.5), D -> E (0.4), and the gate (A, M -> D) with weight G; 4 features per site."""
    graph = graph_from_edges(SITES, [0, 1, 1], [0, 0, 1], [1, 2, 2], [0, 0, 1], [1, -1, 1], [2.0, 0.5, 0.4],
                             n_features=4, gating=[(0, 1, 0, 0, 1, 1)])
    return set_gating_weights(graph, [G])


def as_floats(changes):
    return {k: float(v) for k, v in changes.items()}


def test_chain_and_gate_exact_values_in_forward_order():
    out = predict_cascade(chain_graph(), {M: 0.5, A: 1.5})
    expected = {A: 1.5, M: 0.5, B: 3.0, D: G * 1.5 * 0.5, C: -1.5, E: 0.4 * G * 1.5 * 0.5}
    assert list(out) == list(expected)                       # forward order, only nonzero changes
    assert as_floats(out) == pytest.approx(expected, abs=1e-12)
    assert all(np.ndim(v) == 0 for v in out.values())


def test_hops_and_gating_switches():
    graph = chain_graph()
    direct = as_floats(predict_cascade(graph, {A: 1.5, M: 0.5}, hops=1))
    assert direct == pytest.approx({A: 1.5, M: 0.5, B: 3.0, D: G * 0.75})     # no C, no E: one hop
    assert as_floats(predict_cascade(graph, {A: 1.5, M: 0.5}, hops=2))[C] == pytest.approx(-1.5)
    no_gate = as_floats(predict_cascade(graph, {A: 1.5, M: 0.5}, gating=False))
    assert no_gate == pytest.approx({A: 1.5, M: 0.5, B: 3.0, C: -1.5})


def test_clamped_features_are_not_overwritten():
    out = as_floats(predict_cascade(chain_graph(), {A: 1.0, B: 0.25}))
    assert out == pytest.approx({A: 1.0, B: 0.25, C: -0.125})


def test_per_token_deltas_broadcast_scalars():
    out = predict_cascade(chain_graph(), {A: np.array([1.0, 2.0, 3.0]), M: 0.5})
    a = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(out[M], [0.5] * 3)
    np.testing.assert_allclose(out[C], -a)
    np.testing.assert_allclose(out[D], G * a * 0.5)
    np.testing.assert_allclose(out[E], 0.4 * G * a * 0.5)


def test_a_gate_with_one_input_twice_adds_its_taylor_term():
    graph = graph_from_edges(SITES, [], [], [], [], [], n_features=2, gating=[(0, 0, 0, 0, 1, 1)])
    out = as_floats(predict_cascade(set_gating_weights(graph, [G]), {A: 2.0}))
    assert out == pytest.approx({A: 2.0, D: 0.5 * G * 2.0 ** 2})


def inhibition_graph():
    """A -> B (-1), B -> C (2)."""
    return graph_from_edges(SITES, [0, 1], [0, 0], [1, 2], [0, 0], [-1, 1], [1.0, 2.0], n_features=2)


def test_bounds_clip_the_drop_and_propagate_the_clipped_value():
    graph = inhibition_graph()
    assert as_floats(predict_cascade(graph, {A: 1.0})) == pytest.approx({A: 1.0, B: -1.0, C: -2.0})
    bounded = as_floats(predict_cascade(graph, {A: 1.0}, baseline={B: 0.3}))
    assert bounded == pytest.approx({A: 1.0, B: -0.3, C: -0.6})
    nodes = cascade_nodes(graph)
    assert nodes == [(S0, 0), (S0, 1), (S1, 0), (S1, 1), (S2, 0), (S2, 1)]
    as_array = np.full(len(nodes), np.inf)
    as_array[nodes.index(B)] = 0.3
    assert as_floats(predict_cascade(graph, {A: 1.0}, baseline=as_array)) == pytest.approx(bounded)
    per_token = predict_cascade(graph, {A: 1.0}, baseline={B: np.array([0.3, 2.0])})
    np.testing.assert_allclose(per_token[B], [-0.3, -1.0])
    np.testing.assert_allclose(per_token[C], [-0.6, -2.0])
    rows = np.tile(as_array, (2, 1))
    rows[1, nodes.index(B)] = 2.0
    np.testing.assert_allclose(predict_cascade(graph, {A: 1.0}, baseline=rows)[C], [-0.6, -2.0])


def reference_sweep(graph, deltas, lower):
    """Node by node in forward order, from the edge rows: the definition the vectorised code implements."""
    rows = graph.edges.to_pylist()
    value = dict(deltas)
    for node in cascade_nodes(graph):
        if node in deltas:
            continue
        total = 0.0
        for r in rows:
            if (r["target_site"], r["target"]) != node:
                continue
            i = value.get((r["source_site"], r["source"]), 0.0)
            if r["kind"] == "gating":
                total += r["weight"] * i * value.get((r["modulator_site"], r["modulator"]), 0.0)
            else:
                total += r["weight"] * i
        value[node] = max(total, lower.get(node, -np.inf))
    return {k: value[k] for k in cascade_nodes(graph) if k in deltas or value[k] != 0}


def test_equals_a_node_by_node_sweep_on_a_random_graph():
    sites = SITES + ["blocks.3.hook_resid_post"]
    pairs = [(0, 1), (1, 2), (2, 3), (0, 2), (1, 3)]
    a, i, b, j, sign = random_layered(sites, 6, 40, seed=3, pairs=pairs)
    rng = np.random.default_rng(0)
    gates = [(0, 1, 0, 2, 1, 3), (0, 4, 1, 0, 2, 5), (1, 2, 1, 5, 3, 1)]
    graph = graph_from_edges(sites, a, i, b, j, sign, rng.uniform(0.2, 1.0, len(a)), n_features=6, gating=gates)
    graph = set_gating_weights(graph, [0.7, -1.2, 0.5])
    deltas = {(sites[0], 1): 1.3, (sites[0], 2): -0.4, (sites[1], 5): 0.8, (sites[0], 4): 0.6}
    lower = {node: -rng.uniform(0.0, 1.0) for node in cascade_nodes(graph)[6:] if rng.random() < 0.5}
    # a graph of direct effects: every edge chains (compose='all')
    out = as_floats(predict_cascade(graph, deltas, baseline={k: -v for k, v in lower.items()}, compose="all"))
    want = reference_sweep(graph, deltas, lower)
    assert list(out) == list(want)
    assert out == pytest.approx(want, abs=1e-12)
    unbounded = as_floats(predict_cascade(graph, deltas, compose="all"))
    assert unbounded == pytest.approx(reference_sweep(graph, deltas, {}), abs=1e-12)
    assert unbounded != pytest.approx(out)                  # the bounds bind somewhere


def test_bad_input_is_refused_by_name():
    graph = chain_graph()
    with pytest.raises(SiteError, match="blocks.7.hook_resid_post"):
        predict_cascade(graph, {("blocks.7.hook_resid_post", 0): 1.0})
    with pytest.raises(JfigError, match=r"\('blocks.1.hook_resid_post', 9\) is not a node"):
        predict_cascade(graph, {(S1, 9): 1.0})
    with pytest.raises(OptionError, match="finite"):
        predict_cascade(graph, {A: float("nan")})
    with pytest.raises(OptionError, match="finite"):
        predict_cascade(graph, {A: np.array([1.0, np.inf])})
    with pytest.raises(ShapeError, match="expected 3"):
        predict_cascade(graph, {A: np.ones(3), M: np.ones(2)})
    with pytest.raises(ShapeError, match="expected 3"):
        predict_cascade(graph, {A: np.ones(3)}, baseline={B: np.ones(2)})
    with pytest.raises(ShapeError, match=r"1-D array \[n\]"):
        predict_cascade(graph, {A: np.ones((2, 2))})
    with pytest.raises(OptionError, match="hops"):
        predict_cascade(graph, {A: 1.0}, hops=0)
    with pytest.raises(OptionError, match="hops"):
        predict_cascade(graph, {A: 1.0}, hops=1.5)
    with pytest.raises(OptionError, match=r"\(site, feature\)"):
        predict_cascade(graph, {S0: 1.0})
    with pytest.raises(OptionError, match="non-empty"):
        predict_cascade(graph, {})
    with pytest.raises(OptionError, match=">= 0"):
        predict_cascade(graph, {A: 1.0}, baseline={B: -0.1})
    with pytest.raises(ShapeError, match="cascade_nodes"):
        predict_cascade(graph, {A: 1.0}, baseline=np.ones(5))


def test_total_effect_edges_are_not_chained_twice():
    # A -> B (2), B -> C (-0.5) and the measured total effect A -> C (-1 = 2 x -0.5): every site pair was
    # tested, so the A -> C weight already holds the path through B
    graph = graph_from_edges(SITES, [0, 1, 0], [0, 0, 0], [1, 2, 2], [0, 0, 0], [1, -1, -1], [2.0, 0.5, 1.0],
                             n_features=2)
    total = as_floats(predict_cascade(graph, {(SITES[0], 0): 1.0}))                      # auto = untested
    assert total[(SITES[2], 0)] == pytest.approx(-1.0) and total[(SITES[1], 0)] == pytest.approx(2.0)
    chained = as_floats(predict_cascade(graph, {(SITES[0], 0): 1.0}, compose="all"))
    assert chained[(SITES[2], 0)] == pytest.approx(-2.0)                                  # the path counted twice
    # without the tested A -> C pair (only adjacent pairs tested), the path through B is composed
    adjacent = graph_from_edges(SITES, [0, 1], [0, 0], [1, 2], [0, 0], [1, -1], [2.0, 0.5], n_features=2)
    assert as_floats(predict_cascade(adjacent, {(SITES[0], 0): 1.0}))[(SITES[2], 0)] == pytest.approx(-1.0)
    with pytest.raises(OptionError, match="unknown compose"):
        predict_cascade(graph, {(SITES[0], 0): 1.0}, compose="some")


def test_pre_activation_changes_pass_through_each_features_activation():
    # A -> B (-2), A -> C (+0.2), A -> D (+0.5); B on (pre 0.5), C off below 0 (pre -0.3), D off below a
    # TopK-style threshold 1.0 (pre 0.8)
    graph = graph_from_edges(SITES[:2], [0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 2, 3], [-1, 1, 1], [2.0, 0.2, 0.5],
                             n_features=4)
    nodes = cascade_nodes(graph)
    pre = np.zeros(len(nodes))
    thr = np.zeros(len(nodes))
    for (site, f), p, t in (((SITES[1], 1), 0.5, 0.0), ((SITES[1], 2), -0.3, 0.0), ((SITES[1], 3), 0.8, 1.0)):
        pre[nodes.index((site, f))], thr[nodes.index((site, f))] = p, t
    out = as_floats(predict_cascade(graph, {(SITES[0], 0): 1.0}, pre=pre, threshold=thr))
    assert out[(SITES[1], 1)] == pytest.approx(-0.5)         # switched off: loses its whole activation
    assert (SITES[1], 2) not in out                          # pushed up, but stays below 0
    assert out[(SITES[1], 3)] == pytest.approx(1.3)          # pushed past its threshold: turns on at 1.3
    bounded = as_floats(predict_cascade(graph, {(SITES[0], 0): 1.0}, baseline=np.maximum(pre, 0)))
    assert bounded[(SITES[1], 2)] == pytest.approx(0.2)      # bounds alone would turn C on
    with pytest.raises(OptionError, match="go together"):
        predict_cascade(graph, {(SITES[0], 0): 1.0}, pre=pre)


def test_topk_thresholds_reproduce_the_encoder():
    sae = jfig.SAE.init_random(jax.random.PRNGKey(0), 8, 32, "blocks.0.hook_resid_post", architecture="topk", k=4)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (3, 5, 8)))
    pre = np.asarray(sae.pre_activations(x))
    on = pre > np.maximum(activation_threshold(sae, pre), 0)
    np.testing.assert_array_equal(on, np.asarray(sae.encode(x)) > 0)
