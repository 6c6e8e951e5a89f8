"""compensate: controls that cut the off-target part of a cascade while keeping the intended change, on a
synthetic graph (predicted) and on the planted linear model (observed with the returned edits)."""
import numpy as np
import pytest

from jfig.edits import Clamp
from jfig.errors import OptionError, ShapeError, SiteError
from jfig.steering import Compensation, cascade_nodes, compensate, observe_cascade, predict_cascade
from tests.steering.test_cascade import set_gating_weights
from tests.steering.test_observe import SITES as PLANTED_SITES
from tests.steering.test_observe import TOKENS, linear_model, true_graph
from tests.support.graphs import graph_from_edges

SITES = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
S0, S1, S2 = SITES
SRC, H1, H2, T, O1, O2, O3, O4 = (S0, 0), (S1, 0), (S1, 1), (S2, 0), (S2, 1), (S2, 2), (S2, 3), (S2, 4)
GATE = 0.9


def steering_graph():
    """s -> h1 (1), s -> h2 (1.2); h1 -> t (2), h1 -> o1 (0.3); h2 -> o2 (0.7), h2 -> o3 (-0.8), h2 -> t (0.5);
    the gate (s, h2 -> o4) with weight GATE. t is the intended target."""
    rows = [(0, 0, 1, 0, 1.0), (0, 0, 1, 1, 1.2), (1, 0, 2, 0, 2.0), (1, 0, 2, 1, 0.3), (1, 1, 2, 2, 0.7),
            (1, 1, 2, 3, -0.8), (1, 1, 2, 0, 0.5)]
    a, i, b, j, w = map(np.asarray, zip(*rows))
    graph = graph_from_edges(SITES, a, i, b, j, np.sign(w), np.abs(w), n_features=5, gating=[(1, 1, 0, 0, 2, 4)])
    return set_gating_weights(graph, [GATE])


def objective(graph, u, controls, intended, naive, ridge, keep_weight):
    """The least-squares objective, evaluated on the full predicted cascade with the controls clamped at u."""
    out = predict_cascade(graph, {SRC: 1.0, **dict(zip(controls, u))})
    off = sum(float(v) ** 2 for k, v in out.items() if k != SRC and k not in intended)
    keep = sum((float(out.get(t, 0.0)) - naive[t]) ** 2 for t in intended)
    return off + ridge * float(np.sum(np.square(u))) + keep_weight * keep


def test_compensation_lowers_off_target_and_keeps_the_intended_change():
    graph = steering_graph()
    comp = compensate(graph, {SRC: 1.0}, intended=[T], n_controls=3)
    naive = {k: float(v) for k, v in predict_cascade(graph, {SRC: 1.0}).items()}
    assert comp.predicted_naive == pytest.approx(naive)
    assert comp.controls == [H1, H2, O4]               # the three largest |changes| off target (1, 1.2, 1.08)
    assert comp.u.shape == (3,)
    assert compensate(graph, {SRC: 1.0}, intended=[T], n_controls=2).controls == [H2, O4]
    assert comp.predicted_compensated[T] == pytest.approx(naive[T], rel=0.01)
    assert comp.off_target_compensated < 0.8 * comp.off_target_naive
    off = [k for k in cascade_nodes(graph) if k not in (SRC, T)]
    assert comp.off_target_naive == pytest.approx(np.sqrt(np.mean([naive.get(k, 0.0) ** 2 for k in off])))
    assert comp.predicted_compensated[H1] == pytest.approx(comp.u[0])


def test_u_minimises_the_objective_through_a_gate():
    graph = steering_graph()
    controls = [H1, H2]                     # o4 = GATE·Δs·u_h2: linear in u, so the linear model is exact
    comp = compensate(graph, {SRC: 1.0}, intended=[T], controls=controls, ridge=0.05, keep_weight=20.0,
                      compose="all")
    naive = comp.predicted_naive
    best = objective(graph, comp.u, controls, [T], naive, 0.05, 20.0)
    for c in range(2):
        for step in (-1e-3, 1e-3):
            u = comp.u.copy()
            u[c] += step
            assert objective(graph, u, controls, [T], naive, 0.05, 20.0) > best
    assert comp.predicted_compensated[O4] == pytest.approx(GATE * comp.u[1])
    no_gate = compensate(set_gating_weights(graph, [0.0]), {SRC: 1.0}, intended=[T], controls=controls,
                         ridge=0.05, keep_weight=20.0, compose="all")
    assert abs(no_gate.u[1]) > abs(comp.u[1])        # the gate makes u_h2 costlier: the response includes it


def test_no_controls_and_bad_options():
    graph = steering_graph()
    none = compensate(graph, {SRC: 1.0}, intended=[T], n_controls=0)
    assert none.controls == [] and none.u.shape == (0,)
    assert none.predicted_compensated == none.predicted_naive
    assert none.off_target_compensated == none.off_target_naive
    with pytest.raises(OptionError, match="control"):
        compensate(graph, {SRC: 1.0}, intended=[T], controls=[T])
    with pytest.raises(OptionError, match="intended"):
        compensate(graph, {SRC: 1.0}, intended=[SRC])
    with pytest.raises(OptionError, match="n_controls"):
        compensate(graph, {SRC: 1.0}, n_controls=-1)
    with pytest.raises(OptionError, match="ridge"):
        compensate(graph, {SRC: 1.0}, ridge=float("nan"))
    with pytest.raises(OptionError, match="finite"):
        compensate(graph, {SRC: np.array([1.0, np.nan])})


def test_edits_set_controls_to_clean_plus_u():
    model, saes = linear_model()
    comp = Compensation(controls=[(PLANTED_SITES[1], 2), (PLANTED_SITES[2], 5), (PLANTED_SITES[1], 0)],
                        u=np.array([0.5, -1.0, 2.0]), predicted_naive={}, predicted_compensated={},
                        off_target_naive=0.0, off_target_compensated=0.0)
    clean = {s: np.random.default_rng(i).uniform(size=(2, 3, 8)) for i, s in enumerate(PLANTED_SITES)}
    edits = comp.edits(saes, clean, positions=[1])
    assert [type(e) for e in edits] == [Clamp, Clamp] and [e.site for e in edits] == list(PLANTED_SITES[1:])
    np.testing.assert_array_equal(edits[0].feature, [2, 0])
    np.testing.assert_allclose(edits[0].value, clean[PLANTED_SITES[1]][..., [2, 0]] + [0.5, 2.0], rtol=1e-6)
    np.testing.assert_allclose(edits[1].value, np.maximum(clean[PLANTED_SITES[2]][..., [5]] - 1.0, 0), rtol=1e-6)
    np.testing.assert_array_equal(edits[0].positions, [1])
    with pytest.raises(SiteError, match="clean features"):
        comp.edits(saes, {PLANTED_SITES[1]: clean[PLANTED_SITES[1]]})
    with pytest.raises(ShapeError, match=r"\[batch, seq, 8\]"):
        comp.edits(saes, {**clean, PLANTED_SITES[1]: clean[PLANTED_SITES[1]][..., :4]})


def off_target_rms(observed, exclude):
    """RMS over every token and every feature of every site but `exclude`."""
    values = [np.delete(change, [f for t, f in exclude if t == site], axis=-1).ravel()
              for site, change in observed.changes.items()]
    return float(np.sqrt(np.mean(np.concatenate(values) ** 2)))


def test_returned_edits_lower_the_observed_off_target_change_on_the_planted_model():
    model, saes = linear_model()
    source, intended = (PLANTED_SITES[0], 0), (PLANTED_SITES[2], 0)
    clamp = Clamp(saes[0], 0, 4.0)
    naive = observe_cascade(model, saes, clamp, TOKENS)
    graph = true_graph()
    deltas = {source: naive.token_changes()[source]}
    comp = compensate(graph, deltas, intended=[intended], n_controls=4,
                      baseline=naive.clean_values(cascade_nodes(graph)), compose="all")   # direct-effect weights
    assert comp.off_target_compensated < comp.off_target_naive
    steered = observe_cascade(model, saes, [clamp, *comp.edits(saes, naive.clean)], TOKENS)
    before, after = off_target_rms(naive, [source, intended]), off_target_rms(steered, [source, intended])
    assert after < 0.75 * before
    assert after == pytest.approx(comp.off_target_compensated, rel=0.05)      # the edits do what was predicted
    kept = steered.at(*intended).mean() / naive.at(*intended).mean()
    assert kept == pytest.approx(1.0, abs=0.05)


def test_total_effect_compensation_replaces_the_controls_change():
    # total-effect graph over three sites, every pair tested: S -> C (1), S -> X (0.5 direct + 1 x 2 via C = 2.5),
    # C -> X (2), S -> T (1, intended). Clamping C at change u makes X change by 2.5 + 2 (u - 1).
    sites = PLANTED_SITES
    graph = graph_from_edges(sites, [0, 0, 1, 0], [0, 0, 0, 0], [1, 2, 2, 2], [0, 1, 1, 3], [1, 1, 1, 1],
                             [1.0, 2.5, 2.0, 1.0], n_features=4)
    s, c, x, t = (sites[0], 0), (sites[1], 0), (sites[2], 1), (sites[2], 3)
    comp = compensate(graph, {s: 1.0}, intended=[t], controls=[c], ridge=0.0)
    # minimise u^2 + (0.5 + 2u)^2: u = -0.2, X = 0.1
    assert comp.u[0] == pytest.approx(-0.2, abs=1e-6)
    assert comp.predicted_compensated[x] == pytest.approx(0.1, abs=1e-6)
    assert comp.predicted_compensated[t] == pytest.approx(1.0)
    assert comp.predicted_naive[x] == pytest.approx(2.5)      # the total effect, not 2.5 + 2 x 1 chained
