"""Feature circuit search on a planted model (jfig.testing.planted) whose circuit is known exactly.

Three sites of 8 features, identity ReLU SAEs. Planted edges: the chain 0#1 -> 1#2 -> 2#3 (2.0, 1.5), a
side edge 0#4 -> 2#3 (0.3), a weak direct edge 0#1 -> 2#3 (0.1) and an off-circuit edge 0#5 -> 1#6 (2.0).
The metric (answer minus distractor logit) reads 2#3 with weight 1 and every other feature with a small
random weight (noise everywhere). Clean and corrupted prompts differ at the last token only: the clean
one turns 0#1 and 0#4 on, the corrupted one off (others change at random). With corrupted ablation the
node effects are about 4.5 (0#1, 1#2, 2#3), 0.45 (0#4) and below 0.1 for everything else, and the edge
contributions are exact: 0#1 -> 2#3 is 0.1 x 0#1's change (the chain through 1#2 is held), and every
unplanted pair contributes exactly 0.
"""
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.behaviors import (SuiteTokens, compare_circuits, feature_circuit, khop_subgraph, logit_diff,
                            random_circuits, set_faithfulness)
from jfig.behaviors.circuit_search import greedy_prune
from jfig.edits import Clamp, ShiftFeatures
from jfig.errors import JfigError, SiteError
from jfig.testing.planted import planted_model, site_name
from tests.support.graphs import graph_from_edges

S0, S1, S2 = (site_name(i) for i in range(3))
ANSWER, DISTRACTOR = 0, 1
CHAIN = [(S0, 1, S1, 2), (S1, 2, S2, 3)]
PLANTED = {(S0, 1, S1, 2), (S1, 2, S2, 3), (S0, 4, S2, 3)}


@pytest.fixture(scope="module")
def planted():
    model, saes, truth = planted_model(
        3, 8, excitatory=[(0, 1, 1, 2, 2.0), (1, 2, 2, 3, 1.5), (0, 4, 2, 3, 0.3), (0, 1, 2, 3, 0.1),
                          (0, 5, 1, 6, 2.0)], vocab_size=64, seed=3)
    rng = np.random.default_rng(0)
    U = [np.zeros((8, 64), np.float32) for _ in range(3)]
    for s in range(3):
        U[s][:, ANSWER] = rng.normal(0, 0.02, 8)              # small direct effects of every feature
    U[2][3, ANSWER] = 1.0
    model = eqx.tree_at(lambda m: m.params["U"], model, [jnp.asarray(u) for u in U])
    X0 = np.asarray(model.params["X"][0])
    on = np.flatnonzero((X0[:, 1] > 0) & (X0[:, 4] > 0))
    off = np.flatnonzero((X0[:, 1] == 0) & (X0[:, 4] == 0))
    n, w = 12, 6
    tokens = rng.integers(0, 64, (n, w)).astype(np.int32)
    corrupted = tokens.copy()
    tokens[:, -1] = rng.choice(on, n)
    corrupted[:, -1] = rng.choice(off, n)
    batch = SuiteTokens(tokens, np.full(n, w - 1), np.full(n, ANSWER, np.int32), np.full(n, DISTRACTOR, np.int32),
                        corrupted, np.full(n, w - 1), np.ones(n, bool))
    return model, model.check_saes(saes), batch


@pytest.fixture(scope="module")
def circuit(planted):
    model, saes, batch = planted
    return feature_circuit(model, saes, batch, threshold=0.05, candidates=8)


def edge_set(c):
    return {(e.source_site, e.source, e.target_site, e.target) for e in c.edges}


def test_search_returns_the_planted_circuit_and_nothing_else(planted, circuit):
    model, saes, batch = planted
    c = circuit
    assert set(c.nodes) == {(S0, 1), (S0, 4), (S1, 2), (S2, 3)}
    assert edge_set(c) == PLANTED                    # not 0#1 -> 2#3 (0.1, below), nor 0#5 -> 1#6 (off-circuit)
    assert c.n_candidate_edges == 5                  # pairs of the 4 nodes at different sites
    deltas = {(e.source_site, e.source, e.target_site, e.target): e.delta for e in c.edges}
    assert deltas[(S0, 4, S2, 3)] < 0 and abs(deltas[(S0, 4, S2, 3)]) < abs(deltas[(S0, 1, S1, 2)])
    assert all(e.contribution > 0 for e in c.edges)  # excitatory edges: ablating the source lowers the target
    assert c.node_faithfulness > 0.98                 # what is left outside is the small noise
    assert 0.9 < c.faithfulness < c.node_faithfulness  # the pruned weak edge 0#1 -> 2#3 carried about 3 %
    g = c.to_graph(saes)
    assert g.n_nodes == 4 and g.n_edges == 3
    assert "Feature circuit" in c.summary() and c.table().num_rows == 3


def test_faithfulness_equals_a_direct_ablation_of_everything_outside(planted, circuit):
    model, saes, batch = planted
    c = circuit
    assert c.direct_metric == pytest.approx(c.metric, abs=1e-5)
    # by hand, with stock edits and the planted weights: every feature outside the nodes clamped to its
    # corrupted value, and the one ablated edge with a nonzero contribution (0#1 -> 2#3, 0.1 per unit)
    # added to 2#3
    tok, cor = jnp.asarray(batch.tokens), jnp.asarray(batch.corrupted)
    clean = model.run(tok, capture=(S0, S1, S2)).cache
    corr = model.run(cor, capture=(S0, S1, S2)).cache
    pos = np.ones(batch.tokens.shape, bool)
    pos[:, 0] = False
    nodes = {S0: [1, 4], S1: [2], S2: [3]}
    edits = []
    for s in (S0, S1, S2):
        out = np.asarray([f for f in range(8) if f not in nodes[s]], np.int32)
        edits.append(Clamp(saes[s], out, jnp.asarray(corr[s])[..., out], positions=jnp.asarray(pos)))
    shift = np.zeros(batch.tokens.shape + (8,), np.float32)
    shift[..., 3] = 0.1 * (np.asarray(corr[S0])[..., 1] - np.asarray(clean[S0])[..., 1]) * pos
    edits.append(ShiftFeatures(saes[S2], shift))
    m = logit_diff(model, tok, jnp.asarray(batch.last), jnp.asarray(batch.answer), jnp.asarray(batch.distractor), edits)
    assert float(np.mean(m)) == pytest.approx(c.metric, abs=1e-5)
    # and without the edge term the number is different: the check can tell
    assert abs(float(np.mean(logit_diff(model, tok, jnp.asarray(batch.last), jnp.asarray(batch.answer),
                                        jnp.asarray(batch.distractor), edits[:-1]))) - c.metric) > 1e-3


def test_larger_threshold_gives_a_subset(planted, circuit):
    model, saes, batch = planted
    small = circuit
    large = feature_circuit(model, saes, batch, threshold=0.2, candidates=8, check=False)
    assert set(large.nodes) < set(small.nodes)
    assert edge_set(large) < edge_set(small)
    assert set(large.nodes) == {(S0, 1), (S1, 2), (S2, 3)} and edge_set(large) == set(CHAIN)
    assert large.faithfulness < small.faithfulness
    zero = feature_circuit(model, saes, batch, threshold=0.0, candidates=8, edges=False, check=False)
    assert set(small.nodes) <= set(zero.nodes)


def test_bad_input_errors_before_any_work(planted, count_traces):
    model, saes, batch = planted
    with count_traces() as c:
        with pytest.raises(SiteError, match="unknown search site 'blocks.7.hook_resid_post'"):
            feature_circuit(model, saes, batch, threshold=0.1, sites=["blocks.7.hook_resid_post"])
        with pytest.raises(JfigError, match="threshold must be a finite number >= 0"):
            feature_circuit(model, saes, batch, threshold=-0.1)
        with pytest.raises(JfigError, match="empty list of prompts"):
            feature_circuit(model, saes, [], threshold=0.1)
        empty = SuiteTokens(*(a[:0] if a is not None else None for a in batch))
        with pytest.raises(JfigError, match="no rows"):
            feature_circuit(model, saes, empty, threshold=0.1)
        with pytest.raises(JfigError, match="unknown ablation"):
            feature_circuit(model, saes, batch, threshold=0.1, ablation="resample")
        no_corrupted = batch._replace(corrupted=None, corrupted_last=None, aligned=np.zeros(len(batch.tokens), bool))
        with pytest.raises(JfigError, match="needs corrupted prompts"):
            feature_circuit(model, saes, no_corrupted, threshold=0.1)
    assert c.count == 0                                       # nothing ran


def test_greedy_prune_is_sequential_acdc_in_order_of_effect():
    # additive effects with one interaction: b and c each change the metric by 0.3 alone but 1.0 together
    effect = {"a": 0.01, "b": 0.3, "c": 0.3, "d": 2.0}

    def metric_of(sets):
        return np.asarray([sum(effect[i] for i in s) + (0.4 if {"b", "c"} <= s else 0.0) for s in sets])

    kept, removed, change, _ = greedy_prune(list("abcd"), metric_of, 0.5)
    assert removed == ["a", "b"] and kept == ["c", "d"]       # c, tested after b went, changes by 0.7
    assert change["c"] == pytest.approx(0.7) and change["d"] == pytest.approx(2.0)
    kept, removed, _, _ = greedy_prune(list("abcd"), metric_of, 3.5)
    assert kept == []


def test_compare_with_a_behaviour_subgraph_and_random_sets(planted, circuit):
    model, saes, batch = planted
    c = circuit
    graph = graph_from_edges([S0, S1, S2], [0, 1, 0], [1, 2, 5], [1, 2, 1], [2, 3, 6], [1, 1, 1], [2.0, 1.5, 2.0],
                             n_features=8)
    sub = khop_subgraph(graph, [(S1, 2)], 1)
    cmp = compare_circuits(model, saes, batch, c, sub)
    o = cmp.overlap
    assert o["node_jaccard"] == pytest.approx(3 / 4)          # the subgraph misses 0#4
    assert o["edge_jaccard_shared_sites"] == pytest.approx(2 / 3)
    faith = {r["set"]: r["faithfulness"] for r in cmp.rows}
    assert faith["behaviour subgraph: its features alone"] < faith["feature circuit: its features alone"]
    assert "node Jaccard" in cmp.table().replace("Node", "node")
    sets = random_circuits(c, {s: range(8) for s in saes}, 20, seed=1)
    f = set_faithfulness(model, saes, batch, c, sets)
    assert f.shape == (20,) and np.mean(f) < c.faithfulness - 0.3


def test_a_second_search_compiles_nothing(planted, circuit, count_traces):
    model, saes, batch = planted
    with count_traces() as c:
        again = feature_circuit(model, saes, batch, threshold=0.2, candidates=8, check=False)
    assert c.count == 0                     # states, masks and edge contributions are traced leaves
    assert set(again.nodes) < set(circuit.nodes)


def test_search_on_a_built_in_model_runs_states_from_a_prefix_and_matches_direct_runs(tiny_llama):
    """A tiny Llama with random ReLU SAEs at attn_out and resid_post: the search's states run from a clean
    prefix at the first search site (which needs the residual before it), the direct check runs whole
    models; both give the same metric."""
    model = tiny_llama
    d, k = model.config.d_model, 24
    saes = []
    for i, site in enumerate(("blocks.1.hook_attn_out", "blocks.2.hook_resid_post")):
        w = jax.random.normal(jax.random.PRNGKey(i), (d, k)) / np.sqrt(d)
        saes.append(jfig.SAE(W_enc=w, b_enc=jnp.zeros(k), W_dec=w.T, b_dec=jnp.zeros(d), site=site))
    rng = np.random.default_rng(0)
    n, width = 6, 7
    tokens = rng.integers(1, model.config.vocab_size, (n, width)).astype(np.int32)
    corrupted = tokens.copy()
    corrupted[:, 2] = rng.integers(1, model.config.vocab_size, n)
    batch = SuiteTokens(tokens, np.full(n, width - 1), np.full(n, 3, np.int32), np.full(n, 5, np.int32), corrupted,
                        np.full(n, width - 1), np.ones(n, bool))
    c = feature_circuit(model, saes, batch, threshold=0.01, candidates=3, ablation="mean")   # stock SetFeatures
    assert c.sites == tuple(s.site for s in saes)                                             # in the check
    assert c.direct_metric == pytest.approx(c.metric, abs=2e-5)
    assert len(c.nodes) > 0 and c.n_candidate_edges > 0
    full = float(np.mean(logit_diff(model, jnp.asarray(tokens), jnp.asarray(batch.last), jnp.asarray(batch.answer),
                                    jnp.asarray(batch.distractor))))
    assert c.clean == pytest.approx(full, abs=2e-5)


def test_a_needed_feature_outside_the_candidates_keeps_its_site_rest_node(planted):
    model, saes, batch = planted
    c = feature_circuit(model, saes, batch, threshold=0.05, candidates={S0: [1], S1: [2], S2: [3]})
    assert set(c.nodes) == {(S0, 1), (S1, 2), (S2, 3)} and edge_set(c) == set(CHAIN)
    assert c.rest_sites == (S0,)                       # 0#4 (0.45 of 4.9) is in site 0's rest, noise elsewhere
    assert c.rest_delta[S0] < -0.2 and max(abs(c.rest_delta[S1]), abs(c.rest_delta[S2])) < 0.2
    assert c.direct_metric == pytest.approx(c.metric, abs=1e-5)
    assert c.sparse_faithfulness < c.faithfulness - 0.05    # without the rest node 0#4's path is gone
    without = feature_circuit(model, saes, batch, threshold=0.05, candidates={S0: [1], S1: [2], S2: [3]},
                              rest=False, check=False)
    assert without.rest_sites == () and without.metric == pytest.approx(c.sparse_metric, abs=1e-5)
