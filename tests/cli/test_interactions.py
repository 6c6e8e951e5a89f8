"""`jfig interactions --graph` on the tiny project: the ranked table, the figure and the report, the
graph's gating pairs measured first, the atlas's co-active pairs after them, and the errors."""
import numpy as np
import pyarrow.parquet as pq
import pytest

import jfig
from jfig.cli import main
from jfig.data import tokens_from
from jfig.interactions.rank import RANK_SCHEMA
from jfig.interactions.distribution import MAX_STATE
from jfig.pipeline.interactions import GraphPairs, _distribution_features, graph_pairs
from tests.support.graphs import graph_from_edges
from tests.support.tiny_project import SAE_SITES


@pytest.fixture(scope="module")
def built(project, tmp_path_factory):
    """A graph over the tiny project's SAE sites (first-order edges and one gating hyperedge whose
    source and modulator share blocks.0) in OUT/graph, with an atlas in OUT/atlas."""
    root, model = project
    out = tmp_path_factory.mktemp("interactions") / "out"
    saes = [jfig.load_sae(root / "saes" / "l0"), jfig.load_sae(root / "saes" / "l2")]
    jfig.build_atlas(model, saes, tokens_from(str(root / "texts"), model, 16, max_tokens=16 * 16)).save(out / "atlas")
    rng = np.random.default_rng(3)
    pairs = rng.choice(256, 20, replace=False)
    g = graph_from_edges(list(SAE_SITES), [0] * 20, pairs // 16, [1] * 20, pairs % 16, rng.choice([-1, 1], 20),
                         rng.uniform(0.1, 2, 20), n_features=16, gating=[(0, 9, 0, 2, 1, 5)])
    g.save(out / "graph")
    return root, out, g


def args_for(root, out, *extra):
    return ["interactions", "--graph", str(out / "graph"), "--model", str(root / "model"), "--sae",
            str(root / "saes" / "l0"), "--sae", str(root / "saes" / "l2"), "--corpus", str(root / "texts"),
            "--tokens", "256", "--seq-len", "16", *extra]


def test_interactions_writes_the_ranked_table_figure_and_report(built, tmp_path, capsys):
    root, out, graph = built
    dest = tmp_path / "inter"
    assert main(args_for(root, out, "--out", str(dest), "--pairs", "12", "--edges", "8", "--top", "5")) == 0
    assert "ranked interactions written to" in capsys.readouterr().out
    table = pq.read_table(dest / "interactions.parquet")
    assert table.schema == RANK_SCHEMA and table.num_rows > 0
    metrics = set(table["metric"].to_pylist())
    assert {"neuron_error", "neuron_expected", "mlp_error", "hadamard", "qk_interaction", "query_overlap", "mi",
            "corr"} <= metrics
    rows = table.to_pylist()
    # blocks.2 of a 3-layer model is read by no later block: only blocks.0 pairs reach neurons and heads
    assert {r["site_a"] for r in rows if r["location"] in ("neuron", "head")} == {SAE_SITES[0]}
    assert any((r["feature_a"], r["feature_b"]) == (2, 9) for r in rows if r["metric"] == "mlp_error")
    cross = [r for r in rows if r["metric"] == "corr" and r["site_a"] != r["site_b"]]
    assert len(cross) == 8                                       # the 8 strongest first-order edges
    for m in metrics:                                           # each metric ranked by score from 1
        ranks = [r["rank"] for r in rows if r["metric"] == m]
        assert ranks == list(range(1, len(ranks) + 1))
    assert (dest / "interactions.png").stat().st_size > 10_000
    report = (dest / "report.md").read_text()
    assert "## neuron_error (neuron;" in report and "no MLP reads it" in report and report.count("| 1 |") >= 6


def test_graph_pairs_put_gating_pairs_first(built):
    root, out, graph = built
    atlas = jfig.Atlas.load(out / "atlas")
    p = graph_pairs(graph, atlas, list(SAE_SITES), pairs=5, edges=3)
    assert p.same_site[SAE_SITES[0]][0].tolist() == [2, 9] and len(p.same_site[SAE_SITES[0]]) == 5
    first = [r for r in graph.edges.to_pylist() if r["kind"] != "gating"]
    strongest = sorted(first, key=lambda r: -abs(r["weight"]))[:3]
    assert list(zip(p.cross["feature_a"].tolist(), p.cross["feature_b"].tolist())) == \
        [(r["source"], r["target"]) for r in strongest]
    no_atlas = graph_pairs(graph, None, list(SAE_SITES), pairs=6)       # the most connected features instead
    assert len(no_atlas.same_site[SAE_SITES[0]]) == 6 and no_atlas.same_site[SAE_SITES[0]][0].tolist() == [2, 9]


def test_the_distribution_keeps_the_strongest_edges_that_fit():
    a, b = SAE_SITES
    n = 3000                                                   # 6,000 distinct features: more than 8,192 / 4
    cross = {"site_a": np.full(n, a, object), "feature_a": np.arange(n), "site_b": np.full(n, b, object),
             "feature_b": np.arange(n)}
    same = {a: np.array([[0, 1], [1, 2]])}
    feats, rows, bins = _distribution_features(GraphPairs(same, cross), 4)
    kept = len(rows["site_a"])
    assert bins == 4 and sum(map(len, feats.values())) * 4 <= MAX_STATE < (sum(map(len, feats.values())) + 2) * 4
    # the same-site features 0..2 of site a come back in the edges: 1,024 edges fill 2,048 = 8,192 / 4 exactly
    assert kept - 2 == 1024 and rows["feature_a"][2:].tolist() == list(range(1024))
    def pairs_of(n_features):
        return GraphPairs({a: np.stack([np.arange(0, n_features, 2), np.arange(1, n_features, 2)], 1)})
    feats, rows, bins = _distribution_features(pairs_of(3000), 4)
    assert bins == 2 and len(rows["site_a"]) == 1500           # same-site pairs are kept: bins give way
    feats, rows, bins = _distribution_features(pairs_of(5000), 4)
    assert feats == {} and len(rows["site_a"]) == 0            # even 2 bins do not fit: no distribution


def test_interactions_errors(built, tmp_path, capsys):
    root, out, _ = built
    assert main(["interactions", "--graph", str(tmp_path / "none")]) == 2
    assert "is not a graph folder" in capsys.readouterr().err
    assert main(args_for(root, out, "--bins", "1")) == 2
    assert "--bins must be >= 2" in capsys.readouterr().err
    assert main(args_for(root, out, "--pairs", "0")) == 2
    assert "--pairs must be >= 1" in capsys.readouterr().err
    assert main(args_for(root, out, "--out", str(tmp_path / "missing" / "deeper"))) == 2
    assert "does not exist" in capsys.readouterr().err
