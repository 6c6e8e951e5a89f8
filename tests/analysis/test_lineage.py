"""Feature lineage: cross-site matching (decoder, streamed correlation with both sites in one run,
standardised causal effect) on a model whose layers copy the residual stream unchanged; chains,
emergence and stops through three sites; feature splitting against a planted parent map."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.analysis import causal_similarity, feature_chains, feature_splitting, match_layers
from jfig.errors import OptionError, ShapeError, SiteError
from jfig.saes.matching import match_across, moments_correlation, site_moments
from jfig.testing.models import tiny_config, tiny_model

D = 16
SITES = tuple(f"blocks.{l}.hook_resid_post" for l in range(3))


@pytest.fixture(scope="module")
def copy_model():
    """A 3-layer tiny Llama whose layers 1 and 2 write nothing (attention and MLP outputs zeroed), so
    resid_post of layers 0, 1 and 2 are equal."""
    cfg = tiny_config(n_layers=3, d_model=D)
    model = tiny_model(n_layers=3, d_model=D)
    blocks = dict(model.params["blocks"])
    for name in ("W_o", "W_down"):
        blocks[name] = blocks[name].at[1:].set(0.0)
    return jfig.Model.from_config(cfg, {**model.params, "blocks": blocks})


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 64, (12, 16))


BASIS = np.linalg.qr(np.random.default_rng(3).standard_normal((D, D)))[0].T    # orthonormal rows


def sae_of(rows, site, scale=None, perm=None):
    """A ReLU SAE whose feature k reads and writes BASIS[rows[k]] (times scale[k] on the encoder, 1 /
    scale[k] on the decoder: the same reconstruction, activations scale[k] times larger), features
    reordered by perm."""
    rows = np.asarray(rows)
    scale = np.ones(len(rows)) if scale is None else np.asarray(scale, np.float64)
    perm = np.arange(len(rows)) if perm is None else np.asarray(perm)
    W_dec = (BASIS[rows] / scale[:, None])[perm]
    W_enc = (BASIS[rows] * scale[:, None])[perm].T
    return jfig.SAE(W_enc=W_enc, b_enc=np.zeros(len(rows)), W_dec=W_dec, b_dec=np.zeros(D), site=site)


def test_the_copy_model_copies(copy_model, tokens):
    cache = copy_model.run(jnp.asarray(tokens), capture=SITES).cache
    np.testing.assert_array_equal(np.asarray(cache[SITES[0]]), np.asarray(cache[SITES[1]]))
    np.testing.assert_array_equal(np.asarray(cache[SITES[1]]), np.asarray(cache[SITES[2]]))


def test_cross_layer_matching_recovers_the_permutation_by_every_criterion(copy_model, tokens):
    rng = np.random.default_rng(1)
    perm = rng.permutation(8)                    # B feature j is A feature perm[j]
    scale = rng.uniform(0.5, 3.0, 8)             # B's features are these times larger than A's
    a = sae_of(np.arange(8), SITES[0])
    b = sae_of(np.arange(8), SITES[1], scale=scale, perm=perm)
    want = np.argsort(perm)
    dec = match_across(a, b)
    assert np.array_equal(dec.match, want) and dec.site_b == SITES[1]
    act = match_across(a, b, method="activation", model=copy_model, tokens=tokens)
    assert np.array_equal(act.match, want)
    np.testing.assert_allclose(act.correlation, 1.0, atol=1e-5)
    causal = causal_similarity(copy_model, a, b, tokens, inputs_per_source=8)
    assert causal.shape == (8, 8)
    # the path coefficient of a copied feature is 1 whatever its scale (slope scale x sd_a / (scale sd_a))
    np.testing.assert_allclose(causal[np.arange(8), want], 1.0, atol=1e-3)
    off = causal.copy()
    off[np.arange(8), want] = 0.0
    assert np.abs(off).max() < 1e-3              # orthogonal features: no effect on each other
    m = match_across(a, b, method="all", model=copy_model, tokens=tokens, causal=causal)
    assert np.array_equal(m.match, want) and m.table().column_names[-1] == "causal"
    np.testing.assert_allclose(m.causal, 1.0, atol=1e-3)
    # only some sources measured: the others are NaN rows and stay unmatched by the causal score
    part = causal_similarity(copy_model, a, b, tokens, features=[0, 3], inputs_per_source=8)
    assert np.isnan(part[[1, 2, 4, 5, 6, 7]]).all() and np.isfinite(part[[0, 3]]).all()
    pm = match_across(a, b, method="causal", causal=part)
    assert np.flatnonzero(pm.match >= 0).tolist() == [0, 3] and pm.match[3] == want[3]


def test_chains_emergence_and_stops_through_three_layers(copy_model, tokens):
    a = sae_of(np.arange(8), SITES[0])                                          # basis rows 0..7
    b_rows = np.array([5, 8, 0, 7, 3, 1, 6, 2, 4])                               # + row 8 emerges at layer 1
    b = sae_of(b_rows, SITES[1], scale=np.linspace(0.5, 2.0, 9))
    c_rows = np.array([9, 2, 8, 4, 0, 6, 1, 7, 5])                               # row 3 stops, row 9 emerges
    c = sae_of(c_rows, SITES[2])
    for method in ("decoder", "both"):
        ms = match_layers(copy_model, [c, a, b], tokens, method=method)        # any order: sorted by site
        assert [m.site for m in ms] == list(SITES[:2]) and ms[1].site_b == SITES[2]
        ch = feature_chains(ms)
        assert ch.sites == SITES and ch.d_sae == (8, 9, 9)
        assert ch.emerge.tolist() == [8, 1, 1] and ch.persist.tolist() == [8, 8, 0] and ch.stop.tolist() == [0, 1, 0]
        rows_of = [np.arange(8), b_rows, c_rows]
        # every chain follows one basis row through the sites where it is present
        for chain in ch.chains:
            present = np.flatnonzero(chain >= 0)
            assert len({int(rows_of[i][chain[i]]) for i in present}) == 1
        by_row = {int(rows_of[int(ch.start[k])][ch.chains[k, ch.start[k]]]): k for k in range(len(ch.chains))}
        assert ch.length[by_row[3]] == 2 and ch.start[by_row[8]] == 1 and ch.length[by_row[8]] == 2
        assert ch.start[by_row[9]] == 2 and ch.length[by_row[9]] == 1
        assert ch.length_counts() == {1: 1, 2: 2, 3: 7}
        t = ch.table(min_length=3)
        assert t.num_rows == 7 and t.column_names == ["start_site", "length", *SITES]
        assert ch.summary_table()["chains_through"].to_pylist() == [0, 8, 8]


def test_streamed_cross_site_correlation_equals_numpy_in_one_run():
    model = tiny_model(n_layers=2, d_model=D)
    toks = np.random.default_rng(2).integers(0, 64, (7, 16))      # the last batch of 3 padded
    a = jfig.SAE.init_random(jax.random.PRNGKey(0), D, 10, "blocks.0.hook_resid_post")
    outputs = ("blocks.1.hook_attn_out", "blocks.1.hook_mlp_out")
    cache = model.run(jnp.asarray(toks), capture=(a.site, *outputs)).cache
    for site in outputs:
        b = jfig.SAE.init_random(jax.random.PRNGKey(1), D, 12, site)
        fa = np.asarray(a.encode(cache[a.site]), np.float64)[:, 1:].reshape(-1, 10)
        fb = np.asarray(b.encode(cache[site]), np.float64)[:, 1:].reshape(-1, 12)
        with np.errstate(invalid="ignore", divide="ignore"):
            want = np.nan_to_num(np.corrcoef(fa.T, fb.T)[:10, 10:])
        got, n = moments_correlation(site_moments(a, b, model=model, tokens=toks, batch_size=3, skip_positions=1))
        assert n == 7 * 15
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
        if site.endswith("attn_out"):          # the same tokens given as the two sites' activations
            given = site_moments(a, b, activations=np.asarray(cache[a.site])[:, 1:],
                                 activations_b=np.asarray(cache[site])[:, 1:])
            np.testing.assert_allclose(np.asarray(moments_correlation(given)[0]), want, atol=2e-5)


def test_splitting_recovers_the_planted_parent_map():
    rng = np.random.default_rng(4)
    narrow_rows = rng.standard_normal((24, 32))
    narrow_rows /= np.linalg.norm(narrow_rows, axis=1, keepdims=True)
    copies = np.array([2] * 10 + [1] * 8 + [3] * 2 + [0] * 4)                     # children planted per parent
    parents = np.repeat(np.arange(24), copies)
    wide_rows = narrow_rows[parents] + 0.25 * rng.standard_normal((len(parents), 32)) / np.sqrt(32)
    extra = rng.standard_normal((6, 32))                                          # 6 wide features of no parent
    order = rng.permutation(len(parents) + 6)
    wide_rows = np.concatenate([wide_rows, extra])[order]
    true_parent = np.concatenate([parents, -np.ones(6, np.int64)])[order]
    site = "blocks.0.hook_resid_post"
    narrow = jfig.SAE(W_enc=narrow_rows.T, b_enc=np.zeros(24), W_dec=narrow_rows, b_dec=np.zeros(32), site=site)
    wide = jfig.SAE(W_enc=wide_rows.T, b_enc=np.zeros(len(order)), W_dec=wide_rows, b_dec=np.zeros(32), site=site)
    s = feature_splitting(narrow, wide, min_similarity=0.6)
    assert np.array_equal(s.parent, true_parent)
    assert np.array_equal(s.split_counts, copies)
    assert s.distribution() == {0: 4, 1: 8, 2: 10, 3: 2}
    assert np.array_equal(np.sort(s.children(0)), np.sort(np.flatnonzero(true_parent == 0)))
    assert s.parent_cosine[true_parent >= 0].min() > 0.9 and s.parent_cosine[true_parent < 0].max() < 0.6
    assert s.table()["siblings"].to_pylist() == [int(copies[p]) if p >= 0 else 0 for p in true_parent]
    # a threshold above every cosine leaves every wide feature an orphan, with its best parent kept
    none = feature_splitting(narrow, wide, min_similarity=0.99999)
    assert (none.parent == -1).all()
    assert np.array_equal(none.best_parent[true_parent >= 0], true_parent[true_parent >= 0])


def test_bad_input_is_refused_before_any_work(copy_model, tokens):
    a = sae_of(np.arange(8), SITES[0])
    b = sae_of(np.arange(8), SITES[1])
    narrow_in = jfig.SAE.init_random(jax.random.PRNGKey(0), 8, 4, "blocks.1.attn.hook_z")
    with pytest.raises(ShapeError, match="d_in 16.*d_in 8"):
        match_across(a, narrow_in)
    with pytest.raises(OptionError, match="causal="):
        match_across(a, b, method="causal")
    with pytest.raises(ShapeError, match=r"\[8, 8\]"):
        match_across(a, b, method="causal", causal=np.zeros((8, 7)))
    with pytest.raises(OptionError, match="correlates activations"):
        match_across(a, b, method="both")
    with pytest.raises(OptionError, match="method must be one of"):
        match_across(a, b, method="cosine")
    with pytest.raises(OptionError, match="earlier SAE"):
        causal_similarity(copy_model, b, a, tokens)
    with pytest.raises(OptionError, match="non-empty"):
        causal_similarity(copy_model, a, b, tokens, features=[])
    with pytest.raises(OptionError, match="at least two SAEs"):
        match_layers(copy_model, [a], tokens)
    with pytest.raises(OptionError, match="pass model and tokens"):
        match_layers(None, [a, b], method="both")
    m1 = match_across(a, b)
    with pytest.raises(ShapeError, match="do not follow on"):
        feature_chains([m1, m1])
    wide = sae_of(np.arange(10), SITES[0])
    with pytest.raises(ShapeError, match="narrower dictionary first"):
        feature_splitting(wide, a)
    with pytest.raises(SiteError, match="same site"):
        feature_splitting(a, sae_of(np.arange(10), SITES[1]))
    with pytest.raises(OptionError, match="0..7"):
        feature_splitting(a, wide).children(8)
