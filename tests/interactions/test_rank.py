"""The ranked list: rows of each metric against the metric results they come from (the strongest
neurons and heads per pair, the layer rows, frequencies from the data pass or the atlas), ranking
by strength × frequency within a metric, the per-pair summary and the figure."""
import numpy as np
import pyarrow as pa
import pytest

import jfig
from jfig.errors import JfigError
from jfig.interactions import (FeatureDistribution, NeuronInteractions, QKTerms, QueryOverlap, feature_distribution,
                               neuron_interactions, pair_frequency, pair_summary, plot_interactions, qk_terms,
                               rank_interactions)
from jfig.interactions.rank import RANK_SCHEMA
from jfig.testing import tiny_model
from tests.interactions.toys import random_sae, toy_tokens

SITE, LATER = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


def hand_neurons(data: bool = True) -> NeuronInteractions:
    """Two pairs, four neurons, values chosen so each pair's top neurons and the order are known."""
    err = np.array([[0.1, 0.9, np.nan, 0.4], [2.0, 0.0, 0.3, 0.2]])
    exp = np.array([[1.0, 0.5, 0.2, 3.0], [0.1, 0.2, 0.3, 0.4]])
    ratio = np.array([[-0.9, 0.1, 0.5, 0.0], [0.2, -0.7, 0.1, 0.3]])
    return NeuronInteractions(site=SITE, layer=1, mlp="gated", pairs=np.array([[3, 5], [2, 7]]), ratio=ratio,
                              i_dominant=np.ones((2, 4), bool), hadamard=np.array([0.5, 1.5]),
                              n_tokens=100 if data else 0, cooccurrence=np.array([0.5, 0.1]) if data else None,
                              expected=exp if data else None, error=np.array([1.0, np.nan]) if data else None,
                              neuron_error=err if data else None)


def rows_of(table, metric):
    return [r for r in table.to_pylist() if r["metric"] == metric]


def test_neuron_rows_keep_each_pairs_strongest_neurons_and_rank_by_score():
    t = rank_interactions(neurons=[hand_neurons()], per_pair=2)
    assert t.schema == RANK_SCHEMA
    err = rows_of(t, "neuron_error")
    # pair (3, 5): neurons 1 (0.9) and 3 (0.4), NaN skipped; pair (2, 7): neurons 0 (2.0) and 2 (0.3)
    got = {(r["feature_a"], r["index"]): r for r in err}
    assert set(got) == {(3, 1), (3, 3), (2, 0), (2, 2)}
    for (a, m), r in got.items():
        f = 0.5 if a == 3 else 0.1
        assert r["location"] == "neuron" and r["layer"] == 1 and r["frequency"] == f
        assert r["score"] == pytest.approx(r["strength"] * f)
    # score order, not strength order: 0.9*0.5=0.45 > 2.0*0.1=0.2 > 0.4*0.5=0.2 (strength breaks the tie) > 0.03
    assert [(r["feature_a"], r["index"]) for r in err] == [(3, 1), (2, 0), (3, 3), (2, 2)]
    assert [r["rank"] for r in err] == [1, 2, 3, 4]
    # layer rows: the MLP error (NaN pair left out) and the Hadamard overlap of both pairs
    assert [(r["feature_a"], r["strength"], r["index"]) for r in rows_of(t, "mlp_error")] == [(3, 1.0, -1)]
    had = rows_of(t, "hadamard")
    assert [r["strength"] for r in had] == [0.5, 1.5] and [r["score"] for r in had] == [0.25, pytest.approx(0.15)]
    # metrics follow the documented order, each block ranked from 1
    metrics = t["metric"].to_pylist()
    assert metrics == sorted(metrics, key=["neuron_error", "neuron_expected", "mlp_error", "hadamard"].index)
    assert not rows_of(t, "neuron_ratio")                 # with data the ratio is replaced by its expectation


def test_weight_only_neurons_use_the_ratio_and_have_no_frequency_without_an_atlas():
    t = rank_interactions(neurons=[hand_neurons(data=False)], per_pair=1)
    ratio = rows_of(t, "neuron_ratio")
    assert {(r["feature_a"], r["index"], r["strength"]) for r in ratio} == {(3, 0, 0.9), (2, 1, 0.7)}
    assert all(np.isnan(r["frequency"]) and np.isnan(r["score"]) for r in ratio)
    assert {r["metric"] for r in t.to_pylist()} == {"neuron_ratio", "hadamard"}
    # rows without a score are ranked by strength
    assert [r["strength"] for r in ratio] == [0.9, 0.7]


def test_head_rows_take_the_largest_interaction_over_offsets_and_both_orders():
    rng = np.random.default_rng(0)
    inter = rng.normal(size=(2, 3, 3, 3))                      # [offsets, heads, queries, keys]
    terms = QKTerms(site=SITE, layer=1, queries=np.array([4, 9, 6]), keys=np.array([6, 4, 9]),
                    offsets=np.array([0, 2]), score=inter, interaction=inter)
    t = rank_interactions(qk=[terms], pairs={SITE: np.array([[9, 4]])}, per_pair=3)
    rows = rows_of(t, "qk_interaction")
    assert len(rows) == 3 and {r["index"] for r in rows} == {0, 1, 2}
    for r in rows:                                             # 9 is query 1 / key 2; 4 is query 0 / key 1
        want = max(np.abs(inter[:, r["index"], 1, 1]).max(), np.abs(inter[:, r["index"], 0, 2]).max())
        assert r["strength"] == pytest.approx(want) and r["location"] == "head"
    ov = rng.uniform(-1, 1, size=(1, 2, 3, 3))
    t = rank_interactions(overlaps=[QueryOverlap(site=SITE, layer=2, queries=np.array([1, 2, 3]),
                                                 offsets=np.array([0]), overlap=ov)], per_pair=1)
    rows = rows_of(t, "query_overlap")
    assert len(rows) == 3                                      # every pair of the queries by default
    for r in rows:
        a, b = r["feature_a"] - 1, r["feature_b"] - 1
        assert r["strength"] == pytest.approx(np.abs(ov[0, :, a, b]).max()) and r["layer"] == 2
    with pytest.raises(JfigError, match="not among the query features"):
        rank_interactions(qk=[terms], pairs={SITE: np.array([[9, 5]])})


def test_distribution_rows_sit_at_the_later_sites_layer():
    n = 3
    corr = np.array([[1.0, -0.6, 0.2], [-0.6, 1.0, 0.1], [0.2, 0.1, 1.0]])
    mi = np.array([[0, 0.3, 0.01], [0.3, 0, 0.02], [0.01, 0.02, 0]])
    dist = FeatureDistribution(sites=(SITE, SITE, LATER), features=np.array([2, 5, 1]), n_tokens=10,
                               edges=np.zeros((n, 0)), mean=np.zeros(n), cov=corr, corr=corr, gaussian_mi=mi,
                               mi=mi, mi_corrected=mi, p_value=mi, df=np.ones((n, n)))
    pairs = pa.table({"site_a": [LATER, SITE], "feature_a": [1, 2], "site_b": [SITE, SITE], "feature_b": [5, 5]})
    t = rank_interactions(distribution=dist, distribution_pairs=pairs)
    corr_rows = rows_of(t, "corr")
    assert [(r["layer"], r["strength"]) for r in sorted(corr_rows, key=lambda r: r["layer"])] == [(0, 0.6), (1, 0.1)]
    assert len(rows_of(t, "mi")) == 2 and all(r["location"] == "layer" for r in t.to_pylist())
    with pytest.raises(JfigError, match="is not tracked"):
        rank_interactions(distribution=dist, distribution_pairs={"site_a": [SITE], "feature_a": [9],
                                                                 "site_b": [SITE], "feature_b": [5]})


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("llama")
    saes = [random_sae(1, 16, 24, SITE, bias=-0.3), random_sae(2, 16, 20, LATER, bias=-0.3)]
    tokens = toy_tokens(n=16, seq=12, seed=4)
    atlas = jfig.build_atlas(model, saes, tokens, window=1, progress=False)
    return model, saes, tokens, atlas


def test_atlas_frequency_is_the_share_of_tokens_where_both_fire(tiny):
    model, saes, tokens, atlas = tiny
    out = model.run(tokens, capture=(SITE, LATER))
    f0 = np.asarray(saes[0].encode(out.cache[SITE])).reshape(-1, 24) > 0
    f1 = np.asarray(saes[1].encode(out.cache[LATER])).reshape(-1, 20) > 0
    a, b = np.array([0, 3, 7, 3]), np.array([5, 1, 2, 19])
    same = pair_frequency(atlas, [SITE] * 4, a, [SITE] * 4, b)
    np.testing.assert_allclose(same, (f0[:, a] & f0[:, b]).mean(0))
    np.testing.assert_allclose(pair_frequency(atlas, [SITE] * 4, b, [SITE] * 4, a), same)      # either order
    cross = pair_frequency(atlas, [LATER] * 4, b, [SITE] * 4, a)                                 # later site first
    np.testing.assert_allclose(cross, (f0[:, a] & f1[:, b]).mean(0))
    assert np.isnan(pair_frequency(None, [SITE], [0], [SITE], [1])).all()


def test_metrics_of_a_tiny_model_rank_into_one_table(tiny, tmp_path):
    model, saes, tokens, atlas = tiny
    pairs = np.array([[0, 3], [3, 7], [1, 12], [4, 5]])
    neurons = neuron_interactions(model, saes[0], pairs, tokens, skip_positions=1)
    terms = qk_terms(model, saes[0], np.unique(pairs), offsets=[0, 2])
    dist = feature_distribution(model, saes, tokens, {SITE: np.unique(pairs), LATER: [0, 1, 2]}, bins=2,
                                skip_positions=1)
    t = rank_interactions(neurons=[neurons], qk=[terms], distribution=dist, pairs={SITE: pairs}, atlas=atlas,
                          per_pair=2)
    assert set(t["location"].to_pylist()) == {"neuron", "head", "layer"}
    for p, (a, b) in enumerate(pairs):
        rows = [r for r in rows_of(t, "neuron_error") if (r["feature_a"], r["feature_b"]) == (a, b)]
        top2 = np.sort(neurons.neuron_error[p])[-2:]
        np.testing.assert_allclose(sorted(r["strength"] for r in rows), top2, rtol=1e-12)
        assert all(r["frequency"] == neurons.cooccurrence[p] for r in rows)
    heads = rows_of(t, "qk_interaction")
    assert len(heads) == 2 * len(pairs) and all(r["layer"] == 1 for r in heads)
    assert all(np.isfinite(r["frequency"]) for r in heads)
    assert len(rows_of(t, "corr")) == 10 * 9 // 2            # every pair of the 7 + 3 tracked features

    s = pair_summary(t)
    assert s.num_rows == len(set(zip(t["site_a"].to_pylist(), t["feature_a"].to_pylist(), t["site_b"].to_pylist(),
                                     t["feature_b"].to_pylist())))
    first = s.to_pylist()[0]
    assert (first["site_a"], first["feature_a"]) == (SITE, 0)           # forward order: site, then id
    summed = pair_summary(t, value="score", how="sum").to_pylist()
    row = next(r for r in summed if (r["feature_a"], r["feature_b"]) == (0, 3) and r["site_b"] == SITE)
    want = sum(r["score"] for r in rows_of(t, "neuron_error") if (r["feature_a"], r["feature_b"]) == (0, 3))
    assert row["neuron_error"] == pytest.approx(want)
    with pytest.raises(JfigError, match="how must be"):
        pair_summary(t, how="mean")

    fig = plot_interactions(t, tmp_path / "fig.png", title="tiny")
    assert (tmp_path / "fig.png").stat().st_size > 10_000 and len(fig.axes) == len(set(t["metric"].to_pylist()))
    plot_interactions(RANK_SCHEMA.empty_table(), tmp_path / "empty.png")
    assert (tmp_path / "empty.png").exists()


def test_pairs_given_either_way_round_are_one_pair():
    t = pa.table({"site_a": [LATER, SITE], "feature_a": [4, 9], "site_b": [SITE, LATER], "feature_b": [9, 4],
                  "metric": ["corr", "mi"], "location": ["layer"] * 2, "layer": [1, 1], "index": [-1, -1],
                  "strength": [0.5, 0.2], "frequency": [0.1, 0.1], "score": [0.05, 0.02], "rank": [1, 1]})
    s = pair_summary(t).to_pylist()
    assert s == [dict(site_a=SITE, feature_a=9, site_b=LATER, feature_b=4, mi=0.2, corr=0.5)]
    with pytest.raises(JfigError, match="per_pair"):
        rank_interactions(per_pair=0)
