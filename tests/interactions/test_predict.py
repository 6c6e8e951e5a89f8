"""Scoring metrics against measured edges on synthetic data where the answer is known: a metric equal to
the truth gives AUC 1, precision 1 and Spearman 1; an independent one gives AUC 0.5 within its
interval (checked over many seeds); the statistics against brute-force references; pairs matched to
edges whichever way round, gating hyperedges through their modulator."""
import numpy as np
import pyarrow as pa
import pytest
from scipy import stats as sps

from jfig.errors import JfigError
from jfig.interactions import edge_labels, metric_predictions, precision_at_k, predictions_markdown, roc_auc
from tests.support.graphs import graph_from_edges

SITES = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]


def synthetic(seed=0, n=40, p_edge=0.08):
    """A graph with random first-order edges among n x n tested pairs, and the tested pairs' table
    (given target first, the other way round from the edges)."""
    rng = np.random.default_rng(seed)
    src, tgt = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    is_edge = rng.random(len(src)) < p_edge
    sign = np.where(rng.random(len(src)) < 0.5, 1, -1)
    w = rng.lognormal(size=len(src))
    g = graph_from_edges(SITES, [0] * is_edge.sum(), src[is_edge], [1] * is_edge.sum(), tgt[is_edge], sign[is_edge],
                         w[is_edge], n_features=n)
    table = {"site_a": np.full(len(src), SITES[1], object), "feature_a": tgt,
             "site_b": np.full(len(src), SITES[0], object), "feature_b": src}
    return g, table, is_edge, sign, w, rng


def by(t, metric, kind):
    return next(r for r in t.to_pylist() if r["metric"] == metric and r["kind"] == kind)


def test_a_metric_equal_to_the_truth_predicts_perfectly():
    g, table, is_edge, sign, w, rng = synthetic()
    table["truth"] = np.where(is_edge, w, 0.0)
    table["excitation"] = np.where(is_edge & (sign > 0), w, 0.0)
    t = metric_predictions(table, g, metrics=["truth", "excitation"])
    for kind in ("excitatory", "inhibitory", "any"):
        r = by(t, "truth", kind)
        assert r["auc"] == 1.0 and r["auc_lo"] == 1.0 and r["precision"] == 1.0 and r["spearman"] == pytest.approx(1)
        assert r["n_edges"] == int((is_edge & ((sign > 0) if kind == "excitatory" else (sign < 0) if
                                               kind == "inhibitory" else True)).sum())
        assert r["verdict"] == "predicts" and r["auc_p"] < 1e-20 and r["precision_p"] < 1e-20
    # a metric of excitation only: perfect for excitatory edges, at chance for inhibitory ones (all tied at 0)
    assert by(t, "excitation", "excitatory")["auc"] == 1.0
    inh = by(t, "excitation", "inhibitory")
    assert inh["auc"] == 0.5 and inh["verdict"] == "no better than chance"
    assert inh["precision"] == pytest.approx(inh["base_rate"])            # ties shared out in proportion
    gating = by(t, "truth", "gating")
    assert gating["n_edges"] == 0 and gating["verdict"] == "too few edges" and np.isnan(gating["auc"])
    md = predictions_markdown(t)
    assert md.count("\n") == len(t) + 2 and "| truth | excitatory |" in md


def test_an_independent_metric_is_at_chance_within_its_interval():
    covered, small_p = 0, 0
    for seed in range(60):
        g, table, is_edge, *_ = synthetic(seed=seed)
        rng = np.random.default_rng(1000 + seed)
        table["noise"] = rng.gamma(0.5, size=len(is_edge))                 # skewed, like real metrics
        r = by(metric_predictions(table, g, kinds=("any",)), "noise", "any")
        covered += r["auc_lo"] <= 0.5 <= r["auc_hi"]
        small_p += r["auc_p"] < 0.05
        assert abs(r["auc"] - 0.5) < 0.15
    assert covered >= 53 and small_p <= 7          # 95 % interval, 5 % test: binomial(60, 0.05) <= 7 w.p. 0.98


def test_a_reversed_metric_predicts_inversely_and_nan_rows_are_left_out():
    g, table, is_edge, _, w, _ = synthetic(seed=3)
    table["reversed"] = np.where(is_edge, -w, 0.0)
    table["partial"] = np.where(np.arange(len(is_edge)) % 2 == 0, np.where(is_edge, w, 0.0), np.nan)
    t = metric_predictions(table, g, kinds=("any",))
    assert by(t, "reversed", "any")["verdict"] == "predicts inversely"
    part = by(t, "partial", "any")
    assert part["n_pairs"] == (len(is_edge) + 1) // 2 and part["auc"] == 1.0


def test_auc_and_its_interval_against_brute_force():
    rng = np.random.default_rng(5)
    pos, neg = rng.normal(0.4, 1, 37).round(1), rng.normal(0, 1, 53).round(1)        # rounding makes ties
    auc, lo, hi, p = roc_auc(pos, neg)
    pairs = (pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])
    assert auc == pytest.approx(pairs.mean(), abs=1e-12)
    v10, v01 = pairs.mean(1), pairs.mean(0)                                           # DeLong's placements
    se = np.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))
    assert (lo, hi) == (pytest.approx(auc - 1.96 * se), pytest.approx(auc + 1.96 * se))
    assert p == pytest.approx(sps.mannwhitneyu(pos, neg, alternative="two-sided").pvalue)
    assert all(np.isnan(roc_auc([], neg)))


def test_precision_at_k_shares_ties_and_its_null_is_hypergeometric():
    scores = np.array([5, 4, 3, 3, 3, 3, 1, 0])
    labels = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
    prec, p = precision_at_k(scores, labels, 4)
    assert prec == pytest.approx((1 + 0 + 2 * 2 / 4) / 4)                # two of the four places among the 3s
    assert p == pytest.approx(sps.hypergeom.sf(1, 8, 4, 4))
    assert precision_at_k(scores, labels, 2)[0] == 0.5 and precision_at_k(scores, labels, 100)[0] == 0.5


def test_pairs_match_edges_either_way_round_and_gating_through_the_modulator():
    # edges: 0#1 -> 2#4 excitatory (0.5), 0#2 -> 2#4 inhibitory (-2), and the gating hyperedges
    # (source 0#3, modulator 0#1) -> 2#4 and -> 2#5 with weights 0.2 and 0.7
    g = graph_from_edges(SITES, [0, 0], [1, 2], [1, 1], [4, 4], [1, -1], [0.5, 2.0], n_features=6,
                         gating=[(0, 1, 0, 3, 1, 4), (0, 1, 0, 3, 1, 5)])
    rows = g.edges.to_pylist()
    rows[-2]["weight"], rows[-1]["weight"] = 0.2, 0.7
    g = type(g).from_tables(g.nodes, pa.Table.from_pylist(rows, schema=g.edges.schema), g.manifest)
    table = {"site_a": [SITES[1], SITES[0], SITES[0], SITES[0], SITES[0]], "feature_a": [4, 2, 1, 3, 0],
             "site_b": [SITES[0], SITES[1], SITES[0], SITES[0], SITES[1]], "feature_b": [1, 4, 3, 1, 4]}
    present, weight = edge_labels(table, g.edges)
    assert present["excitatory"].tolist() == [True, False, False, False, False]
    assert present["inhibitory"].tolist() == [False, True, False, False, False]
    assert present["gating"].tolist() == [False, False, True, True, False]        # (1, 3) and (3, 1): one pair
    assert present["any"].tolist() == [True, True, True, True, False]
    assert weight["inhibitory"][1] == 2.0 and weight["gating"][2] == pytest.approx(0.7)   # the largest |weight|
    table["m"] = [1.0, 2.0, 3.0, 4.0, 0.0]
    assert metric_predictions(table, g).num_rows == 4
    with pytest.raises(JfigError, match="lacks column"):
        metric_predictions({"site_a": [], "m": []}, g)
    with pytest.raises(JfigError, match="is not a column"):
        metric_predictions(table, g, metrics=["nope"])
    with pytest.raises(JfigError, match="edge kind"):
        metric_predictions(table, g, kinds=("strong",))


def test_a_weight_column_gives_the_correlation_over_every_tested_pair():
    g, table, is_edge, sign, w, rng = synthetic(seed=7)
    measured = np.where(is_edge, sign * w, rng.normal(0, 0.05, len(w)))         # non-edges measured near 0
    table["weight"] = measured
    table["truth"] = np.abs(measured)
    t = metric_predictions(table, g)
    assert by(t, "truth", "any")["spearman_tested"] == pytest.approx(1)
    assert np.isnan(by(t, "truth", "excitatory")["spearman_tested"])              # reported once, on 'any'
    assert "weight" not in set(t["metric"].to_pylist())
