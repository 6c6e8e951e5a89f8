"""The graph analysis recovers planted structure (feed-forward loops, communities, hubs, layer decay,
gating triangles) and gives z near 0 on graphs without it; the predictions' verdicts follow their
statistics; `jfig analyze` writes the report, JSON and figures."""
import json

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import pytest

from jfig import SAE, Ablate
from jfig.analysis import analyze, firing_rates, hub_ablation, hubs, motif_census, rewire, signed_edges
from jfig.analysis.communities import communities
from jfig.analysis.grammar import gating_triangles
from jfig.analysis.layers import layer_decay
from jfig.analysis.network import assortativity, clustering, reciprocity, undirected
from jfig.analysis.predictions import excitation_by_layer, heavy_tails, sparsity
from jfig.cli import main
from jfig.errors import JfigError
from tests.support.graphs import graph_from_edges, random_layered
from tests.support.tiny_models import tiny_model

SITES3 = [f"blocks.{l}.hook_resid_post" for l in range(3)]
ALL_PAIRS3 = [(0, 1), (1, 2), (0, 2)]


def copies_of(edges, n=20):
    return [rewire(edges, seed=k)[1] for k in range(n)]


def test_clustering_and_assortativity_equal_networkx():
    a, i, b, j, s = random_layered(SITES3, 30, 400, pairs=ALL_PAIRS3, seed=3)
    e = signed_edges(graph_from_edges(SITES3, a, i, b, j, s))
    und = nx.Graph()
    und.add_nodes_from(range(len(e.layer)))
    und.add_edges_from(zip(e.source.tolist(), e.target.tolist()))
    avg, trans, _ = clustering(undirected(len(e.layer), e.source, e.target))
    assert avg == pytest.approx(nx.average_clustering(und), abs=1e-12)
    assert trans == pytest.approx(nx.transitivity(und), abs=1e-12)
    d = nx.DiGraph()
    d.add_edges_from(zip(e.source.tolist(), e.target.tolist()))
    for x, y in (("out", "in"), ("in", "out"), ("out", "out"), ("in", "in")):
        assert assortativity(e, e.target, x, y) == pytest.approx(nx.degree_assortativity_coefficient(d, x=x, y=y),
                                                                 abs=1e-9)
    assert reciprocity(e)["structural"] and reciprocity(e)["value"] is None


def planted_ffl_graph(n_ffl, seed=0):
    a, i, b, j, s = random_layered(SITES3, 60, 700, pairs=ALL_PAIRS3, seed=seed)
    rng = np.random.default_rng(seed + 1)
    edges = set(zip(a.tolist(), i.tolist(), b.tolist(), j.tolist()))
    rows = list(zip(a.tolist(), i.tolist(), b.tolist(), j.tolist(), s.tolist()))
    for _ in range(n_ffl):
        x, y, z = rng.integers(60, size=3)
        for e in ((0, x, 1, y), (1, y, 2, z), (0, x, 2, z)):
            if e not in edges:
                edges.add(e)
                rows.append((*e, 1))
    a, i, b, j, s = map(np.asarray, zip(*rows))
    return graph_from_edges(SITES3, a, i, b, j, s)


def test_planted_feed_forward_loops_are_found_and_absent_ones_are_not():
    planted = signed_edges(planted_ffl_graph(80))
    z = motif_census(planted, copies=copies_of(planted)).z("ffl coherent")
    assert z > 4
    plain = signed_edges(planted_ffl_graph(0, seed=5))
    census = motif_census(plain, copies=copies_of(plain))
    assert abs(census.z("ffl coherent")) < 3 and abs(census.z("ffl incoherent")) < 3


def test_planted_communities_have_modularity_above_the_null():
    rng = np.random.default_rng(0)
    rows = set()
    while len(rows) < 900:
        a = int(rng.integers(2))
        group = int(rng.integers(2))
        inside = rng.random() < 0.9                    # 90 % of edges inside a group of features
        i = int(rng.integers(30)) + 30 * group
        j = int(rng.integers(30)) + 30 * (group if inside else 1 - group)
        rows.add((a, i, a + 1, j))
    a, i, b, j = map(np.asarray, zip(*rows))
    e = signed_edges(graph_from_edges(SITES3, a, i, b, j, np.ones(len(a), int)))
    res = communities(e, copies_of(e, 5), seed=0)
    for method in ("louvain", "leiden"):
        assert res["methods"][method]["z"] > 5
    truth = [{n for n in e.names if n[1] < 30}, {n for n in e.names if n[1] >= 30}]
    found = communities(e, [], seed=0, atlas_groups=truth)["methods"]["leiden"]["atlas_agreement"]
    assert found["nmi"] > 0.5

    a, i, b, j, s = random_layered(SITES3, 60, 900, seed=1)
    e = signed_edges(graph_from_edges(SITES3, a, i, b, j, s))
    assert abs(communities(e, copies_of(e, 5), seed=0)["methods"]["louvain"]["z"]) < 4     # 5 copies: a rough sd


def test_planted_hubs_are_listed_first():
    a, i, b, j, s = random_layered(SITES3, 80, 400, seed=2)
    rows = set(zip(a.tolist(), i.tolist(), b.tolist(), j.tolist()))
    for h in range(3):
        rows |= {(0, h, 1, t) for t in range(0, 80, 2)}             # 40 out-edges each
    a, i, b, j = map(np.asarray, zip(*sorted(rows)))
    top = hubs(graph_from_edges(SITES3, a, i, b, j, np.ones(len(a), int)), k=3, by="out")
    assert {(h["site"], h["feature"]) for h in top} == {(SITES3[0], 0), (SITES3[0], 1), (SITES3[0], 2)}
    assert all(h["out_degree"] >= 40 and h["contexts"] for h in top)


@pytest.mark.parametrize("law", ["exponential", "power law"])
def test_layer_decay_prefers_the_planted_law(law):
    sites = [f"blocks.{l}.hook_resid_post" for l in range(7)]
    counts = {d: int(400 * (np.exp(-(d - 1) / 1.5) if law == "exponential" else d ** -2.0)) for d in range(1, 7)}
    rows = []
    for d, c in counts.items():
        rows += [(0, k % 100, d, k // 100 + 7 * d) for k in range(c)]
    a, i, b, j = map(np.asarray, zip(*rows))
    g = graph_from_edges(sites, a, i, b, j, np.ones(len(a), int), n_features=200,
                         tested={(0, d): 20_000 for d in range(1, 7)})
    decay = layer_decay(g)
    assert decay["density_fit"]["preferred"] == law
    assert [r["tested"] for r in decay["rows"]] == [20_000] * 6
    if law == "exponential":
        assert decay["density_fit"]["exponential"]["length"] == pytest.approx(1.5, rel=0.1)
    else:
        assert decay["density_fit"]["power_law"]["beta"] == pytest.approx(2.0, rel=0.1)


def test_gating_triangles_close_on_first_order_edges():
    a, i, b, j, s = random_layered(SITES3, 40, 300, pairs=ALL_PAIRS3, seed=4)
    on_edges = [(0, 39 - k, int(a[k]), int(i[k]), int(b[k]), int(j[k])) for k in range(40) if a[k] == 0 and b[k] == 1]
    g = graph_from_edges(SITES3, a, i, b, j, s, gating=on_edges)
    e = signed_edges(g)
    res = gating_triangles(g, e, copies_of(e))
    assert res["count"] == res["hyperedges"] == len(on_edges) > 5
    assert res["z"] > 3


def test_sparsity_verdicts_follow_the_interval():
    assert sparsity(5, 10_000)["verdict"] == "supported"
    assert sparsity(500, 10_000)["verdict"] == "not supported"
    assert sparsity(100, 10_000)["verdict"] == "inconclusive"
    lo, hi = sparsity(100, 10_000)["statistic"]["ci95"]
    assert lo < 0.01 < hi
    assert sparsity(0, 0)["verdict"] == "inconclusive"


def within_layer_graph(p_cross, p_within, n=400, seed=0):
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
    rng = np.random.default_rng(seed)
    a, i, b, j, _ = random_layered(sites, 50, n, seed=seed, pairs=[(0, 1), (1, 2)])
    s = np.where(rng.random(n) < np.where(a == 0, p_cross, p_within), 1, -1)
    return graph_from_edges(sites, a, i, b, j, s)


def test_excitation_by_layer_verdicts():
    assert excitation_by_layer(within_layer_graph(0.8, 0.4))["verdict"] == "supported"
    assert excitation_by_layer(within_layer_graph(0.3, 0.3))["verdict"] == "not supported"
    assert excitation_by_layer(within_layer_graph(0.8, 0.9))["verdict"] == "not supported"
    a, i, b, j, s = random_layered(SITES3, 30, 100, seed=0)
    res = excitation_by_layer(graph_from_edges(SITES3, a, i, b, j, s))
    assert res["verdict"] == "inconclusive" and "no within-layer pairs" in res["reason"]


def test_heavy_tail_verdicts():
    row = dict(direction="out", sign="all", vs_exponential="power law", vs_lognormal="undecided")
    hub = dict(hub_median=0.1, matched_median=0.01, ratio=10.0, hubs_above_matched=10, p=0.001)
    assert heavy_tails([row], hub, None)["verdict"] == "supported"
    assert heavy_tails([row], {**hub, "p": 0.4}, None)["verdict"] == "not supported"
    assert "not run" in heavy_tails([row], None, None)["reason"]
    assert heavy_tails([{**row, "vs_exponential": "exponential"}], hub, None)["verdict"] == "not supported"
    assert heavy_tails([{**row, "vs_exponential": "undecided"}], hub, None)["verdict"] == "inconclusive"


def test_analyze_checks_its_options():
    a, i, b, j, s = random_layered(SITES3, 30, 100, seed=0)
    g = graph_from_edges(SITES3, a, i, b, j, s)
    with pytest.raises(JfigError, match="null_samples"):
        analyze(g, null_samples=0)
    empty = graph_from_edges(SITES3, np.zeros(0, int), np.zeros(0, int), np.zeros(0, int), np.zeros(0, int),
                             np.zeros(0, int), n_features=4)
    with pytest.raises(JfigError, match="no excitatory or inhibitory edges"):
        analyze(empty)


def test_jfig_analyze_writes_report_json_and_figures(tmp_path):
    """A demo-sized graph (10,000 edges over four sites): the command writes report.md, analysis.json
    and figures/; the JSON has the documented keys and types."""
    sites = [f"blocks.{l}.hook_resid_post" for l in (6, 10, 14, 18)]
    a, i, b, j, s = random_layered(sites, 2048, 10_000, seed=0)
    g = graph_from_edges(sites, a, i, b, j, s, n_features=2048, gating=[(0, 1, int(a[0]), int(i[0]), int(b[0]),
                                                                         int(j[0]))])
    g.save(tmp_path / "graph")
    assert main([ "analyze", str(tmp_path / "graph"), "--out", str(tmp_path / "report"), "--null-samples", "5",
                 "--community-nulls", "2"]) == 0
    out = tmp_path / "report"
    doc = json.loads((out / "analysis.json").read_text())
    assert set(doc) == {"graph", "settings", "degrees", "network", "reciprocity", "communities", "signs",
                        "layer_decay", "hubs", "hub_ablation", "motifs", "predictions", "figures"}
    assert doc["graph"]["edges"] == {"excitatory": int((s > 0).sum()), "inhibitory": int((s < 0).sum()), "gating": 1}
    assert set(doc["predictions"]) == {"sparsity", "heavy_tails", "excitation_by_layer"}
    assert all(p["verdict"] in ("supported", "not supported", "inconclusive") for p in doc["predictions"].values())
    assert isinstance(doc["predictions"]["sparsity"]["statistic"]["fraction"], float)
    assert all(isinstance(r["statistic"], str) and (r["z"] is None or isinstance(r["z"], float)) for r in doc["network"])
    assert {m["motif"] for m in doc["motifs"]} >= {"ffl coherent", "ffl incoherent", "gating triangle"}
    assert isinstance(doc["communities"]["methods"]["leiden"]["n_communities"], int)
    assert doc["hub_ablation"] is None and len(doc["hubs"]) == 10
    assert set(doc["signs"]["network"]) == {"excitatory", "inhibitory"}
    assert {r["statistic"] for r in doc["signs"]["network"]["inhibitory"]} >= {"average_clustering", "mean_path_length"}
    assert doc["settings"]["null_samples"] == 5
    for f in doc["figures"]:
        assert (out / f).stat().st_size > 5_000 and (out / f).read_bytes()[:4] == b"\x89PNG"
    assert {"figures/degree_ccdf.png", "figures/layer_decay.png", "figures/motif_z.png",
            "figures/community_sizes.png", "figures/adjacency.png"} <= set(doc["figures"])
    report = (out / "report.md").read_text()
    assert "## Predictions" in report and "![motif z-scores](figures/motif_z.png)" in report


def test_jfig_analyze_names_a_bad_folder_and_bad_options(tmp_path, capsys):
    assert main(["analyze", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "not a graph folder" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path), "--out", str(tmp_path / "r"), "--null-samples", "0"]) == 2
    assert "null_samples must be an integer >= 1" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path), "--out", str(tmp_path / "r"), "--hub-matched", "0"]) == 2
    assert "matched must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_hub_ablation_measures_each_hub_against_rate_matched_features():
    """On a tiny Llama: every effect is the mean |Δ next-token loss| per token of ablating the feature
    where it is active (computed here directly with an Ablate edit), and the matched features are the
    non-hub features with the nearest firing rates."""
    model = tiny_model("llama", n_layers=2, d_model=16, vocab_size=50)
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    saes = [SAE.init_random(jax.random.PRNGKey(k), 16, 32, s) for k, s in enumerate(sites)]
    tokens = np.random.default_rng(0).integers(0, 50, size=(6, 10))
    rows = [(0, h, 1, t) for h in (3, 7) for t in range(0, 20, 2 + h % 3)] + [(0, 11, 1, 1)]
    a, i, b, j = map(np.asarray, zip(*rows))
    g = graph_from_edges(sites, a, i, b, j, np.ones(len(a), int), n_features=32)
    res = hub_ablation(model, saes, g, tokens, k=2, matched=4, by="out")
    assert [(h["site"], h["feature"]) for h in res["hubs"]] == [(sites[0], 3), (sites[0], 7)]

    def nll(logits):
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        return -jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], -1)[..., 0]

    base = nll(model.run(tokens).logits)
    acts = saes[0].encode(model.run(tokens, capture=(sites[0],)).cache[sites[0]])
    rates = firing_rates(model, saes[0], tokens)
    for h in res["hubs"]:
        mask = acts[..., h["feature"]] > 0
        edited = nll(model.run(tokens, edits=(Ablate(saes[0], h["feature"], positions=mask),)).logits)
        assert h["effect"] == pytest.approx(float(jnp.abs(edited - base).sum()) / tokens.size, rel=1e-4, abs=1e-7)
        assert h["firing_rate"] == pytest.approx(float(mask.mean()))
        others = np.delete(np.flatnonzero(rates > 0), np.isin(np.flatnonzero(rates > 0), [3, 7]))
        gap = np.sort(np.abs(rates[others] - rates[h["feature"]]))[:4]
        assert np.sort(np.abs(np.asarray(h["matched_rates"]) - rates[h["feature"]])) == pytest.approx(gap)
    assert 0 <= res["p"] <= 1 and res["matched"] == 4
    with pytest.raises(JfigError, match="no SAE given"):
        hub_ablation(model, saes[1:], g, tokens, k=2)
    with pytest.raises(JfigError, match="matched must be integers >= 1"):
        hub_ablation(model, saes, g, tokens, k=2, matched=0)
