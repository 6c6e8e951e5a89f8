"""Signed three-node motifs: counts equal a brute-force enumeration; planted feed-forward loops stand
out against the rewiring null, and a graph drawn from the null does not."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings

from jfig.analysis.motifs import CHAINS, FIXED_BY_DEGREES, MOTIFS, motif_census, motif_counts
from jfig.analysis.rewire import SignedEdges, rewire
from jfig.errors import JfigError
from tests.analysis.test_rewire import layered_graphs

SYM = {1: "+", -1: "-"}


def brute_force(g: SignedEdges) -> dict:
    sign = {(int(a), int(b)): int(s) for a, b, s in zip(g.source, g.target, g.sign)}
    out = dict.fromkeys(MOTIFS, 0)
    nodes = range(len(g.layer))
    for a, b, c in itertools.permutations(nodes, 3):
        if (a, b) in sign and (b, c) in sign:
            out[f"chain {SYM[sign[(a, b)]]}{SYM[sign[(b, c)]]}"] += 1
            if (a, c) in sign:
                coherent = sign[(a, c)] == sign[(a, b)] * sign[(b, c)]
                out["ffl coherent" if coherent else "ffl incoherent"] += 1
    for c in nodes:            # unordered pairs of inputs / outputs
        for name, edges in (("convergence", [sign[(a, c)] for a in nodes if (a, c) in sign]),
                            ("divergence", [sign[(c, b)] for b in nodes if (c, b) in sign])):
            for s1, s2 in itertools.combinations(edges, 2):
                key = "".join(sorted((SYM[s1], SYM[s2])))
                out[f"{name} {key}"] += 1
    return out


@settings(max_examples=60, deadline=None)
@given(layered_graphs())
def test_counts_equal_brute_force(g):
    assert motif_counts(g) == brute_force(g)


def random_layered(rng, n_per=40, n_layers=3, p=0.08):
    layer = np.repeat(np.arange(n_layers), n_per)
    src, tgt = np.nonzero((rng.random((len(layer), len(layer))) < p) & (layer[:, None] < layer[None, :]))
    return layer, src, tgt


def test_planted_feed_forward_loops_stand_out_and_null_graphs_do_not():
    rng = np.random.default_rng(0)
    layer, src, tgt = random_layered(rng)
    base = SignedEdges(src, tgt, rng.choice([-1, 1], len(src)), layer)
    # a graph drawn from the null itself: no motif should stand out
    plain = SignedEdges(src, rewire(base, seed=99)[1], base.sign, layer)
    census = motif_census(plain, null_samples=30, seed=1)
    t = census.table.to_pydict()
    assert [m for m, f in zip(t["motif"], t["fixed_by_degrees"]) if not f] == ["ffl coherent", "ffl incoherent"]
    assert all(abs(census.z(m)) < 3.5 for m in ("ffl coherent", "ffl incoherent")), t
    # plant 60 coherent feed-forward loops a -> b -> c, a -> c (all excitatory) across the three layers
    edges = set(zip(src.tolist(), tgt.tolist()))
    sign = dict(zip(zip(src.tolist(), tgt.tolist()), base.sign.tolist()))
    for a, b, c in zip(rng.integers(0, 40, 60), rng.integers(40, 80, 60), rng.integers(80, 120, 60)):
        for e in ((a, b), (b, c), (a, c)):
            edges.add((int(e[0]), int(e[1])))
            sign[(int(e[0]), int(e[1]))] = 1
    s, t = map(np.asarray, zip(*sorted(edges)))
    planted = SignedEdges(s, t, np.asarray([sign[e] for e in zip(s.tolist(), t.tolist())]), layer)
    census = motif_census(planted, null_samples=30, seed=1)
    assert census.z("ffl coherent") > 5
    assert census.table.column("p_over")[MOTIFS.index("ffl coherent")].as_py() == pytest.approx(1 / 31)
    fixed = census.table.filter(census.table.column("fixed_by_degrees")).to_pydict()
    assert set(fixed["motif"]) == set(FIXED_BY_DEGREES) | set(CHAINS)       # every edge goes forward in layer
    assert all(sd == 0 for sd in fixed["null_sd"]) and all(np.isnan(z) for z in fixed["z"])


def test_census_needs_a_null_sample():
    g = SignedEdges(np.array([0, 1]), np.array([1, 2]), np.array([1, -1]), np.array([0, 1, 2]))
    with pytest.raises(JfigError, match="null_samples must be >= 1"):
        motif_census(g, null_samples=0)
