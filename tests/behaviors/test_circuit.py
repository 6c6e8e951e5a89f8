"""Behaviour circuits on a planted model with a known circuit (tests/support/planted_circuit.py)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.behaviors import (behavior_subgraph, circuit_test, feature_scores, khop_subgraph, logit_diff,
                            overlap, set_metrics)
from jfig.errors import JfigError
from tests.support.graphs import graph_from_edges
from tests.support.planted_circuit import CIRCUIT, D, S0, circuit_graph, circuit_model, circuit_prompts


@pytest.fixture(scope="module")
def planted():
    model, saes = circuit_model()
    return model, model.check_saes(saes), circuit_prompts(16), circuit_graph()


def test_behavior_subgraph_recovers_the_planted_circuit(planted, tmp_path):
    model, saes, batch, graph = planted
    c = behavior_subgraph(model, saes, graph, batch, k=2, n_random=20, n_null=10, min_effect=0.05)
    assert {(s.site, s.feature) for s in c.seeds} == set(CIRCUIT)
    assert set(c.subgraph.nodes) == set(CIRCUIT)          # the walk does not leak into the copy edges
    assert c.subgraph.edges.num_rows == 2
    t = c.test
    assert t.sufficiency == pytest.approx(1.0, abs=0.02)   # other features do not move the metric
    assert t.necessity == pytest.approx(1.0, abs=0.02)     # with the circuit ablated the answer is gone
    assert np.abs(t.random_sufficiency).max() < 0.2 and np.abs(t.random_necessity).max() < 0.2
    assert t.p_sufficiency < 0.05 and t.p_necessity < 0.05
    out = c.write(tmp_path / "circuit")
    data = json.loads((out / "circuit.json").read_text())
    assert data["circuit_test"]["sufficiency"] == pytest.approx(t.sufficiency)
    assert "Sufficiency" in (out / "report.md").read_text() and (out / "subgraph_edges.csv").exists()


def test_attribution_ranks_circuit_features_and_matches_exact_ablation_on_a_linear_metric(planted):
    model, saes, batch, _ = planted
    scores = feature_scores(model, saes, batch)
    # the metric is linear in every feature here, so attribution (first order) is the exact ablation drop
    exact0 = 2.0 * 0.8 * 1.5                                        # x0 = 1.5 at the cue, relayed with 0.8, x2 logit
    assert scores.attribution[S0][0] == pytest.approx(exact0, rel=1e-4)
    assert scores.attribution[S0][1] == pytest.approx(2.0 * 0.8 * 1.0, rel=1e-4)
    assert np.abs(scores.attribution[S0][2:]).max() < 1e-4
    clean = np.asarray(logit_diff(model, jnp.asarray(batch.tokens), jnp.asarray(batch.last),
                                  jnp.asarray(batch.answer), jnp.asarray(batch.distractor)))
    np.testing.assert_allclose(clean, 2.0 * 0.8 * 2.5, rtol=1e-5)


def test_set_metrics_vmap_equals_one_set_at_a_time(planted):
    model, saes, batch, _ = planted
    rng = np.random.default_rng(0)
    masks = {s: rng.random((3, D)) < 0.5 for s in saes}
    means = {s: rng.uniform(0, 1, D) for s in saes}
    together = set_metrics(model, saes, batch, masks, means, chunk=2, batch_size=5)
    one = [set_metrics(model, saes, batch, {s: m[i:i + 1] for s, m in masks.items()}, means, chunk=1)[0]
           for i in range(3)]
    np.testing.assert_allclose(together, one, rtol=1e-5, atol=1e-6)


def test_circuit_test_of_part_of_the_circuit_is_partial(planted):
    model, saes, batch, _ = planted
    scores = feature_scores(model, saes, batch)
    t = circuit_test(model, saes, batch, [(S0, 0)], scores.mean, scores.firing_rate, n_random=5)
    assert 0.4 < t.necessity < 0.8          # x0 carries 1.5 of the 2.5 relayed: 60 % of the logit difference


def test_khop_follows_directions_and_hop_limits():
    # chain a -> b -> c -> d over four sites, and a side branch e -> c; gate (m, b -> c)
    sites = [f"blocks.{i}.hook_resid_post" for i in range(4)]
    g = graph_from_edges(sites, [0, 1, 2, 1], [0, 0, 0, 5], [1, 2, 3, 2], [0, 0, 0, 0], [1, -1, 1, 1], n_features=8,
                         gating=[(0, 7, 1, 0, 2, 0)])
    sub = khop_subgraph(g, [(sites[2], 0)], k=1)
    assert set(sub.nodes) == {(sites[1], 0), (sites[1], 5), (sites[0], 7), (sites[2], 0), (sites[3], 0)}
    assert sub.hop[(sites[3], 0)] == 1 and sub.hop[(sites[1], 0)] == -1
    assert "gating" in sub.edges["kind"].to_pylist()
    sub2 = khop_subgraph(g, [(sites[2], 0)], k=2)
    assert (sites[0], 0) in sub2.nodes and sub2.hop[(sites[0], 0)] == -2
    only_strongest = khop_subgraph(g, [(sites[2], 0)], k=1, per_node=1)
    assert len(only_strongest) < len(sub)


def test_overlap_against_chance():
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    g = graph_from_edges(sites, [0], [0], [1], [0], [1], n_features=50)
    a = [(sites[0], i) for i in range(10)]
    same = overlap(g, {"a": a, "b": a}, n_null=200)
    assert same[0]["jaccard"] == 1.0 and same[0]["p_more"] < 0.01
    apart = overlap(g, {"a": a, "b": [(sites[0], i) for i in range(20, 30)]}, n_null=200)
    assert apart[0]["jaccard"] == 0.0 and apart[0]["p_more"] == 1.0


def test_bad_input_errors(planted, tmp_path):
    model, saes, batch, graph = planted
    with pytest.raises(JfigError, match="unknown behaviour 'nope'"):
        jfig.behavior_suite("nope")
    with pytest.raises(JfigError, match="not nodes of the graph"):
        khop_subgraph(graph, [(S0, 99)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "The capital of France is", "answer": " Paris"}\n')
    with pytest.raises(jfig.FormatError, match=r"line 1: missing or empty field\(s\) \['distractor'\]"):
        jfig.load_suite(bad)
    bad.write_text('{"text": "a", "answer": " b", "distractor": " c", "colour": 1}\n')
    with pytest.raises(jfig.FormatError, match="unknown field"):
        jfig.load_suite(bad)
    bad.write_text("not json\n")
    with pytest.raises(jfig.FormatError, match="line 1: not JSON"):
        jfig.load_suite(bad)
    with pytest.raises(JfigError, match="k must be an int >= 0, got -1"):
        behavior_subgraph(model, saes, graph, batch, k=-1)
    with pytest.raises(JfigError, match="per_node must be an int >= 1, got 0"):
        behavior_subgraph(model, saes, graph, batch, per_node=0)
    with pytest.raises(JfigError, match="min_effect and min_weight"):
        behavior_subgraph(model, saes, graph, batch, min_effect=float("nan"))


def test_jsonl_suite_round_trip(tmp_path):
    path = tmp_path / "capitals.jsonl"
    rows = [{"text": "The capital of France is", "answer": " Paris", "distractor": " Rome", "label": "capital",
             "corrupted": "The capital of Italy is"}, {"text": "Hi", "answer": "I", "distractor": "Sure", "chat": True}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    suite = jfig.load_suite(path)
    assert suite.name == "capitals" and len(suite) == 2
    assert suite.prompts[0].corrupted == "The capital of Italy is" and suite.prompts[1].chat
    assert jfig.behavior_suite(str(path)) == suite


def test_control_sets_do_not_retrace(planted, monkeypatch):
    """New masks and values of the same shapes reuse the compiled pass (the count is taken inside the
    traced function, so it counts traces, not calls)."""
    model, saes, _, _ = planted
    batch = circuit_prompts(7, seed=3)                   # a batch size no other test compiles
    traces = []

    def counting(*args, **kw):
        traces.append(1)
        return logit_diff(*args, **kw)

    monkeypatch.setattr("jfig.behaviors.validate.logit_diff", counting)
    rng = np.random.default_rng(1)
    for _ in range(3):
        masks = {s: rng.random((4, D)) < 0.5 for s in saes}
        set_metrics(model, saes, batch, masks, {s: rng.uniform(0, 1, D) for s in saes}, chunk=4, batch_size=7)
    assert len(traces) == 1


def test_a_suite_from_rows():
    suite = jfig.behaviors.as_suite([{"text": "a b a", "answer": " b", "distractor": " c"}])
    assert suite.name == "custom" and suite.prompts[0].answer == " b"
    with pytest.raises(jfig.FormatError, match=r"suite row 0: missing or empty field\(s\) \['answer'\]"):
        jfig.behaviors.as_suite([{"text": "a", "answer": "", "distractor": " c"}])
