"""diff_graphs: two graphs compared edge by edge, of the same SAEs or through a matching of their features."""
import jax
import numpy as np
import pyarrow as pa
import pytest

import jfig
from jfig.saes import FeatureMatching, match_sae_sets
from tests.support.graphs import graph_from_edges

SITES = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]


def with_saes(graph, fingerprints=("aa", "bb"), width=8):
    saes = [{"site": s, "d_sae": width, "fingerprint": f} for s, f in zip(SITES, fingerprints)]
    return jfig.InteractionGraph.from_tables(graph.nodes, graph.edges, {**graph.manifest, "saes": saes})


def test_statuses_match_planted_changes():
    rng = np.random.default_rng(0)
    pairs = rng.choice(64, 20, replace=False)
    src, tgt, sign = pairs // 8, pairs % 8, rng.choice([-1, 1], 20)
    a = with_saes(graph_from_edges(SITES, [0] * 20, src, [1] * 20, tgt, sign, n_features=8,
                                   gating=[(0, 2, 0, 3, 1, 4)]))
    # B: edges 0-3 lost, 4-5 flipped, two new pairs gained, the gating row kept
    free = [p for p in range(64) if p not in set(pairs.tolist())][:2]
    b_pairs = np.r_[pairs[4:], free]
    b_sign = np.r_[-sign[4:6], sign[6:], [1, -1]]
    b = with_saes(graph_from_edges(SITES, [0] * 18, b_pairs // 8, [1] * 18, b_pairs % 8, b_sign, n_features=8,
                                   gating=[(0, 2, 0, 3, 1, 4)]))
    d = jfig.diff_graphs(a, b)
    assert d.counts == {"same": 14 + 1, "gained": 2, "lost": 4, "flipped": 2} and d.notes == []
    t = d.table.to_pylist()
    status = {(r["source"], r["target"], r["modulator"]): r["status"] for r in t}
    assert [status[(p // 8, p % 8, None)] for p in pairs[:4]] == ["lost"] * 4
    assert [status[(p // 8, p % 8, None)] for p in pairs[4:6]] == ["flipped"] * 2
    assert [status[(p // 8, p % 8, None)] for p in free] == ["gained"] * 2
    assert status[(3, 4, 2)] == "same"
    flipped = [r for r in t if r["status"] == "flipped"]
    assert all(np.sign(r["weight_a"]) == -np.sign(r["weight_b"]) for r in flipped)
    assert all(r["weight_b"] is None for r in t if r["status"] == "lost")
    assert "2 gained, 4 lost, 2 sign-flipped" in d.summary()
    # the comparison is symmetric in what it finds
    back = jfig.diff_graphs(b, a)
    assert back.counts == {"same": 15, "gained": 4, "lost": 2, "flipped": 2}


def test_notes_and_refusals():
    g = graph_from_edges(SITES, [0, 0], [1, 2], [1, 1], [3, 4], [1, -1], n_features=8)
    a, b = with_saes(g), with_saes(g, fingerprints=("aa", "cc"))
    d = jfig.diff_graphs(a, b)
    assert d.counts["same"] == 2 and any("blocks.3.hook_resid_post have different weights" in n for n in d.notes)
    with pytest.raises(jfig.JfigError, match="differ in width"):
        jfig.diff_graphs(a, with_saes(g, width=16))
    rows = g.edges.to_pylist()
    dup = jfig.InteractionGraph.from_tables(g.nodes, pa.Table.from_pylist(rows + [dict(rows[0], weight=5.0)]),
                                            g.manifest)
    d = jfig.diff_graphs(dup, g)
    assert any("1 edge rows repeat" in n for n in d.notes)
    row = [r for r in d.table.to_pylist() if r["source"] == 1][0]
    assert row["weight_a"] == 5.0 and row["status"] == "same"


# ------------------------------------------------------------------------------ graphs of different SAEs

def planted(perms=None, scale=None, flip=(), width=8, extra=()):
    """A graph over SITES: 10 first-order edges among features 0..3 of each site, and one gating row;
    with `perms` (one permutation per site) every feature id i becomes perms[site][i]. `scale`
    multiplies edge weights, `flip` lists edges whose sign flips, `extra` adds edges (src, tgt, sign)."""
    rng = np.random.default_rng(3)
    pairs = rng.choice(16, 10, replace=False)
    src, tgt = pairs // 4, pairs % 4
    sign = rng.choice([-1, 1], 10)
    weight = rng.uniform(0.5, 2.0, 10) * (np.ones(10) if scale is None else np.asarray(scale))
    sign = np.where(np.isin(np.arange(10), flip), -sign, sign)
    gating = [(0, 2, 0, 1, 1, 3)]
    if perms is not None:
        src, tgt = perms[0][src], perms[1][tgt]
        gating = [(0, perms[0][2], 0, perms[0][1], 1, perms[1][3])]
    for s, t, sg in extra:
        src, tgt, sign, weight = np.r_[src, s], np.r_[tgt, t], np.r_[sign, sg], np.r_[weight, 1.0]
    g = graph_from_edges(SITES, [0] * len(src), src, [1] * len(src), tgt, sign, weight, n_features=width,
                         gating=gating)
    return g


def two_perms():
    """Per site, a permutation of 0..7 that sends the planted features 0..3 to 4..7."""
    rng = np.random.default_rng(4)
    return [np.r_[rng.permutation(4) + 4, rng.permutation(4)] for _ in SITES]


def permuted_saes(perms):
    """SAEs A at SITES and B with B feature perms[site][i] = A feature i, exactly."""
    a = [jfig.SAE.init_random(jax.random.PRNGKey(i), 16, 8, s) for i, s in enumerate(SITES)]
    b = [jfig.SAE(W_enc=s.W_enc[:, np.argsort(p)], b_enc=s.b_enc[np.argsort(p)], W_dec=s.W_dec[np.argsort(p)],
                  b_dec=s.b_dec, site=s.site) for s, p in zip(a, perms)]
    return a, b


def test_graphs_of_permuted_saes_are_the_same_once_matched():
    perms = two_perms()
    a = with_saes(planted())
    b = with_saes(planted(perms), fingerprints=("cc", "dd"))
    plain = jfig.diff_graphs(a, b)
    assert plain.counts == {"same": 0, "gained": 11, "lost": 11, "flipped": 0}
    assert sum("have different weights" in n for n in plain.notes) == 2
    saes_a, saes_b = permuted_saes(perms)
    matching = match_sae_sets(saes_a, saes_b)
    d = jfig.diff_graphs(a, b, matching=matching)
    assert d.counts == {"same": 11, "gained": 0, "lost": 0, "flipped": 0, "unmatched": 0}
    assert not any("have different weights" in n for n in d.notes)
    t = d.table.to_pylist()
    assert all(r["source_b"] == perms[0][r["source"]] and r["target_b"] == perms[1][r["target"]] for r in t)
    gate = [r for r in t if r["modulator"] is not None]
    assert len(gate) == 1 and (gate[0]["modulator"], gate[0]["modulator_b"]) == (2, perms[0][2])
    np.testing.assert_allclose([r["similarity"] for r in t], 1.0, atol=1e-6)
    assert all(r["change"] == 0.0 for r in t)
    # a plain {A id: B id} mapping per site says the same; B -> A is the inverse
    by_dict = jfig.diff_graphs(a, b, matching={s: dict(enumerate(p.tolist())) for s, p in zip(SITES, perms)})
    assert by_dict.counts == d.counts
    back = jfig.diff_graphs(b, a, matching={s: np.argsort(p) for s, p in zip(SITES, perms)})
    assert back.counts["same"] == 11


def test_strengthened_weakened_and_flipped_through_a_matching():
    perms = two_perms()
    matching = {s: p for s, p in zip(SITES, perms)}
    a = with_saes(planted())
    scale = np.ones(10)
    scale[0], scale[1], scale[2] = 3.0, 0.3, 1.5          # strengthened, weakened, within the ratio
    b = with_saes(planted(perms, scale=scale, flip=[3]))
    d = jfig.diff_graphs(a, b, matching=matching, ratio=2.0)
    assert d.counts == {"same": 8, "gained": 0, "lost": 0, "flipped": 1, "strengthened": 1, "weakened": 1,
                        "unmatched": 0}
    assert "1 strengthened, 1 weakened (by more than x2)" in d.summary()
    rows = a.edges.to_pylist()
    status = {(r["source"], r["target"], r["modulator"]): r["status"] for r in d.table.to_pylist()}
    key = lambda i: (rows[i]["source"], rows[i]["target"], None)  # noqa: E731
    assert [status[key(i)] for i in range(4)] == ["strengthened", "weakened", "same", "flipped"]
    # the largest change first: edge 0's weight tripled, edge 3's flipped (2|w|), edge 1 shrank by 0.7|w|
    w = np.abs([r["weight"] for r in rows[:4]])
    top = d.most_changed(3).to_pylist()
    want = sorted([(2 * w[0], 0), (2 * w[3], 3), (0.7 * w[1], 1), (0.5 * w[2], 2)], reverse=True)[:3]
    assert [(r["source"], r["target"]) for r in top] == [key(i)[:2] for _, i in want]
    np.testing.assert_allclose([abs(r["change"]) for r in top], [c for c, _ in want])
    # without a ratio the strength changes are 'same', as before
    assert jfig.diff_graphs(a, b, matching=matching).counts == {"same": 10, "gained": 0, "lost": 0, "flipped": 1,
                                                                  "unmatched": 0}
    # and the ratio applies to graphs of the same SAEs too
    same_saes = jfig.diff_graphs(a, with_saes(planted(scale=scale)), ratio=2.0)
    assert same_saes.counts["strengthened"] == 1 and same_saes.counts["weakened"] == 1
    with pytest.raises(jfig.OptionError, match="ratio must be > 1"):
        jfig.diff_graphs(a, b, ratio=1.0)


def test_edges_of_unmatched_features_are_counted_apart():
    perms = two_perms()
    a = with_saes(planted())
    # B is wider (10 features) and has an edge from its new feature 9, which nothing in A matches
    b = with_saes(planted(perms, width=10, extra=[(9, perms[1][0], 1)]), width=10)
    with pytest.raises(jfig.JfigError, match="differ in width"):
        jfig.diff_graphs(a, b)
    fwd = [p.copy() for p in perms]
    fwd[0][1] = -1                                       # A's feature 1 at site 0 matches nothing
    d = jfig.diff_graphs(a, b, matching=dict(zip(SITES, fwd)))
    rows = a.edges.to_pylist()
    k = sum(r["source"] == 1 for r in rows)              # A's edges from feature 1 (the gating row among them)
    assert k >= 2
    assert d.counts == {"same": 11 - k, "gained": 0, "lost": 0, "flipped": 0, "unmatched": 2 * k + 1}
    un = [r for r in d.table.to_pylist() if r["status"] == "unmatched"]
    from_a = [r for r in un if r["weight_a"] is not None]
    from_b = [r for r in un if r["weight_b"] is not None]
    assert len(from_a) == k and all(r["source"] == 1 and r["source_b"] is None for r in from_a)
    assert len(from_b) == k + 1 and all(r["source"] is None for r in from_b)
    assert sorted(r["source_b"] for r in from_b) == sorted([perms[0][1]] * k + [9])
    assert all(r["change"] is None and r["similarity"] is None for r in un)
    assert d.most_changed(100).num_rows == 11 - k
    assert f"{SITES[0]}: 7 of 8 A features matched to B's 10; edges touching the others count as unmatched" in d.notes


def test_most_changed_keeps_to_well_matched_features():
    perms = two_perms()
    sim = np.ones(8)
    sim[0] = 0.7                                          # A's feature 0 at site 0: matched, but loosely
    loose = FeatureMatching(site=SITES[0], method="decoder", min_similarity=0.5, best=perms[0], similarity=sim,
                            decoder_cosine=sim, correlation=np.full(8, np.nan), best_a=np.argsort(perms[0]),
                            match=perms[0])
    a = with_saes(planted())
    rows = a.edges.to_pylist()
    scale = np.where([r["source"] == 0 for r in rows[:10]], 10.0, 1.0)
    steady = int(np.flatnonzero(scale == 1.0)[0])
    scale[steady] = 3.0
    b = with_saes(planted(perms, scale=scale))
    d = jfig.diff_graphs(a, b, matching={SITES[0]: loose, SITES[1]: perms[1]}, ratio=2.0)
    assert d.counts["strengthened"] == int((scale > 1).sum())
    t = d.table.to_pylist()
    assert all(r["similarity"] == pytest.approx(0.7 if r["source"] == 0 else 1.0) for r in t)
    top = d.most_changed(1)["source"].to_pylist()
    assert top == [rows[steady]["source"]] and top != [0]
    assert d.most_changed(1, min_similarity=0.6)["source"].to_pylist() == [0]
    assert d.most_changed(0).num_rows == 0


def test_bad_matchings_are_refused():
    perms = two_perms()
    a, b = with_saes(planted()), with_saes(planted(perms))
    cases = [({SITES[0]: np.arange(6)}, "covers 6 A features, but graph A's SAE there has 8"),
             ({SITES[0]: np.r_[perms[0][:7], 9]}, "maps A feature 7 to 9, outside graph B's SAE there"),
             ({SITES[0]: np.r_[perms[0][:7], perms[0][0]]}, "several A features to B feature"),
             ({"blocks.7.hook_resid_post": perms[0]}, "names site 'blocks.7.hook_resid_post', which neither graph has"),
             ({SITES[0]: {9: 1}}, "names A feature 9, outside graph A's SAE"),
             ({SITES[0]: {0: -1}}, "leave an unmatched feature out"),
             (list(perms), "must be a mapping of site")]
    for matching, message in cases:
        with pytest.raises(jfig.JfigError, match=message):
            jfig.diff_graphs(a, b, matching=matching)
    wide = FeatureMatching(site=SITES[0], method="decoder", min_similarity=0.5, best=perms[0], similarity=np.ones(8),
                           decoder_cosine=np.ones(8), correlation=np.full(8, np.nan), best_a=np.zeros(16, np.int64),
                           match=perms[0])
    with pytest.raises(jfig.JfigError, match="made for a B SAE of 16 features, but graph B's SAE there has 8"):
        jfig.diff_graphs(a, b, matching={SITES[0]: wide})
    with pytest.raises(jfig.OptionError, match="n must be >= 0"):
        jfig.diff_graphs(a, b).most_changed(-1)


def test_edges_whose_source_the_other_build_did_not_measure_are_untested():
    perms = two_perms()
    a = with_saes(planted())
    rows = a.edges.to_pylist()
    f0 = rows[0]["source"]                                # B's build did not measure A's source f0 (its match)
    k = sum(r["source"] == f0 and r["source_site"] == SITES[0] for r in rows)
    full = planted(perms, extra=[(perms[0][5], perms[1][0], 1)])     # and B found an edge from A's feature 5
    keep = pa.array([not (r["source_site"] == SITES[0] and r["source"] == perms[0][f0])
                     for r in full.edges.to_pylist()])
    b = with_saes(jfig.InteractionGraph.from_tables(full.nodes, full.edges.filter(keep), full.manifest))
    matching = dict(zip(SITES, perms))
    plain = jfig.diff_graphs(a, b, matching=matching)
    assert plain.counts["lost"] == k and plain.counts["gained"] == 1
    src_a = {SITES[0]: range(4)}
    src_b = {SITES[0]: [perms[0][i] for i in range(4) if i != f0] + [perms[0][5]]}
    d = jfig.diff_graphs(a, b, matching=matching, measured=(src_a, src_b))
    assert d.counts == {"same": 11 - k, "gained": 0, "lost": 0, "flipped": 0, "unmatched": 0, "untested": k + 1}
    un = [r for r in d.table.to_pylist() if r["status"] == "untested"]
    assert sorted(r["source"] for r in un) == sorted([f0] * k + [5])
    assert all(r["change"] is None for r in un)
    assert d.most_changed(100).num_rows == 11 - k
    assert f"{k + 1} whose source the other build did not measure" in d.summary()
    # an edge whose source both builds measured stays lost or gained
    both = jfig.diff_graphs(a, b, matching=matching, measured=({SITES[0]: [0, 1, 2, 3, 5]},
                                                              {SITES[0]: perms[0].tolist()}))
    assert (both.counts["lost"], both.counts["gained"], both.counts["untested"]) == (k, 1, 0)
    # without a matching the ids are compared as they are
    same = jfig.diff_graphs(a, a, measured=({SITES[0]: [0]}, {SITES[0]: [0]}))
    assert same.counts["same"] == 11 and same.counts["untested"] == 0
    for bad, message in ((src_a, "must be a pair"), ((src_a, {SITES[0]: [9]}), "feature 9, outside its SAE"),
                         (({SITES[0]: [-1]}, src_b), "negative id")):
        with pytest.raises(jfig.JfigError, match=message):
            jfig.diff_graphs(a, b, matching=matching, measured=bad)
