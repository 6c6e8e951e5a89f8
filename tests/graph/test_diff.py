"""diff_graphs: two graphs of the same SAEs compared edge by edge."""
import numpy as np
import pyarrow as pa
import pytest

import jfig
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
