"""Degree-distribution fits: a planted power law is preferred to an exponential tail, a planted
geometric (exponential) one is not, per direction and sign."""
import numpy as np

from jfig.analysis.degrees import degree_fits, degree_sequence
from jfig.analysis.rewire import SignedEdges


def graph_with_out_degrees(deg, rng, sign=1):
    """Sources 0..n-1 with the given out-degrees onto a pool of targets in the next layer."""
    n_src, n_tgt = len(deg), int(deg.max()) + 10
    src = np.repeat(np.arange(n_src), deg)
    tgt = np.concatenate([n_src + rng.choice(n_tgt, d, replace=False) for d in deg])
    layer = np.concatenate([np.zeros(n_src, int), np.ones(n_tgt, int)])
    return SignedEdges(src, tgt, np.full(len(src), sign), layer)


def row(table, direction, sign):
    rows = [r for r in table.to_pylist() if r["direction"] == direction and r["sign"] == sign and not r["weighted"]]
    assert len(rows) == 1
    return rows[0]


def test_power_law_out_degrees_are_recognised():
    rng = np.random.default_rng(0)
    deg = np.minimum(rng.zipf(2.3, 2000), 1500)
    g = graph_with_out_degrees(deg, rng)
    assert sorted(degree_sequence(g, "out", None)) == sorted(deg)
    fits = degree_fits(g)
    r = row(fits, "out", "all")
    assert r["n_nodes"] == 2000 and 1.9 < r["alpha"] < 2.7
    assert r["vs_exponential"] == "power law" and r["r_exponential"] > 0
    assert row(fits, "out", "inhibitory")["vs_exponential"] == "no fit"      # no inhibitory edges


def test_exponential_out_degrees_are_not_called_a_power_law():
    rng = np.random.default_rng(1)
    deg = rng.geometric(0.08, 2000)
    r = row(degree_fits(graph_with_out_degrees(deg, rng, sign=-1)), "out", "inhibitory")
    assert r["vs_exponential"] == "exponential" and r["r_exponential"] < 0


def test_weighted_degrees_fit_strengths():
    """Every source has 3 edges (no degree tail), but its edges' |weights| follow a Pareto law: the
    weighted rows (strength = summed |weight|) find the heavy tail that the counts cannot show."""
    rng = np.random.default_rng(2)
    g = graph_with_out_degrees(np.full(2000, 3), rng)
    w = np.repeat(rng.pareto(1.5, 2000) + 1.0, 3)
    g = SignedEdges(g.source, g.target, g.sign, g.layer, weight=w)
    np.testing.assert_allclose(sorted(degree_sequence(g, "out", None, weighted=True)), sorted(w[::3] * 3))
    rows = [r for r in degree_fits(g).to_pylist() if r["direction"] == "out" and r["sign"] == "all"]
    plain, weighted = sorted(rows, key=lambda r: r["weighted"])
    assert plain["vs_exponential"] == "no fit" and weighted["weighted"]
    assert weighted["vs_exponential"] == "power law" and 2.0 < weighted["alpha"] < 3.0


def test_a_tail_powerlaw_cannot_compare_is_no_fit_not_a_crash():
    """Ten sources, nine of degree 1 and one of degree 2: powerlaw picks the tail {2} and cannot compare
    it ("No data points in defined range"); the row says so instead of raising."""
    rng = np.random.default_rng(0)
    g = graph_with_out_degrees(np.array([1] * 9 + [2]), rng)
    r = row(degree_fits(g), "out", "all")
    assert r["n_nodes"] == 10 and r["vs_lognormal"] == "no fit" and np.isnan(r["alpha"])
