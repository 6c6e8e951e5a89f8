"""match_features: two dictionaries of one site matched by decoder cosine, activation correlation or
both, one to one by mutual best; the streamed correlation against numpy's in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.saes import feature_correlation, match_features, match_sae_sets
from jfig.testing.models import tiny_model

SITE = "blocks.1.hook_resid_post"


def random_sae(seed, d_sae=40, d_in=16, site=SITE, b_enc=None):
    sae = jfig.SAE.init_random(jax.random.PRNGKey(seed), d_in, d_sae, site)
    if b_enc is not None:
        sae = jfig.SAE(W_enc=sae.W_enc, b_enc=jnp.asarray(b_enc, jnp.float32), W_dec=sae.W_dec, b_dec=sae.b_dec,
                       site=site)
    return sae


def permuted(sae, perm, W_dec=None):
    """B feature j is A feature perm[j] (its decoder row replaced by W_dec[j] when given)."""
    return jfig.SAE(W_enc=sae.W_enc[:, perm], b_enc=sae.b_enc[perm],
                    W_dec=sae.W_dec[perm] if W_dec is None else W_dec, b_dec=sae.b_dec, site=sae.site)


@pytest.fixture(scope="module")
def model_tokens():
    model = tiny_model(n_layers=2)
    return model, np.random.default_rng(1).integers(0, 64, (10, 16))


def reference_correlation(model_a, model_b, sae_a, sae_b, tokens, skip=0):
    """float64 numpy Pearson correlations of every A feature with every B feature (NaN -> 0)."""
    def feats(model, sae):
        x = model.run(jnp.asarray(tokens), capture=(sae.site,)).cache[sae.site][:, skip:]
        return np.asarray(sae.encode(x), np.float64).reshape(-1, sae.d_sae)
    fa, fb = feats(model_a, sae_a), feats(model_b, sae_b)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.corrcoef(fa.T, fb.T)[:sae_a.d_sae, sae_a.d_sae:]
    return np.nan_to_num(c)


def test_permuted_copy_is_matched_back_by_decoder():
    a = random_sae(0)
    perm = np.random.default_rng(0).permutation(40)
    b = permuted(a, perm)
    m = match_features(a, b)
    want = np.argsort(perm)                        # A feature i sits at B position want[i]
    assert np.array_equal(m.match, want) and np.array_equal(m.best, want)
    assert np.array_equal(m.best_a, perm) and m.n_matched == 40
    assert m.unmatched_a.size == 0 and m.unmatched_b.size == 0
    np.testing.assert_allclose(m.similarity, 1.0, atol=1e-6)
    assert np.isnan(m.correlation).all() and m.n_tokens == 0
    assert m.mapping() == dict(enumerate(want.tolist()))
    t = m.table()
    assert t.column_names == ["feature_a", "best_b", "similarity", "decoder_cosine", "correlation", "match_b"]
    assert t["match_b"].to_pylist() == want.tolist()
    # scored a few rows at a time (the last block overlapping the one before): the same answer
    small = match_features(a, b, block=7)
    assert np.array_equal(small.match, m.match) and np.array_equal(small.best_a, m.best_a)
    np.testing.assert_allclose(small.similarity, m.similarity)


def test_perturbed_wider_copy_matches_correctly_below_one():
    a = random_sae(1, d_sae=24)
    rng = np.random.default_rng(1)
    noisy = np.asarray(a.W_dec) + 0.05 * rng.standard_normal(a.W_dec.shape)
    extra = rng.standard_normal((8, 16))            # B is wider: 8 new features
    perm = rng.permutation(32)                       # B position j holds row perm[j] of [noisy A; extra]
    W_dec = np.concatenate([noisy, extra])[perm]
    W_enc = np.concatenate([np.asarray(a.W_enc), rng.standard_normal((16, 8))], axis=1)[:, perm]
    b = jfig.SAE(W_enc=W_enc, b_enc=np.zeros(32), W_dec=W_dec, b_dec=np.zeros(16), site=SITE)
    m = match_features(a, b)
    where = np.argsort(perm)
    assert np.array_equal(m.match, where[:24])
    assert np.array_equal(m.unmatched_b, np.sort(where[24:]))
    assert 0.9 < m.similarity.min() and m.similarity.max() < 0.99999
    cos = np.sum(np.asarray(a.W_dec) * noisy, 1) / np.linalg.norm(np.asarray(a.W_dec), axis=1) / np.linalg.norm(noisy, axis=1)
    np.testing.assert_allclose(m.decoder_cosine, cos, atol=1e-5)
    # a threshold above every pair's similarity leaves every feature unmatched
    assert match_features(a, b, min_similarity=0.99999).n_matched == 0


def test_mutual_best_leaves_the_second_half_of_a_split_unmatched():
    a = random_sae(2, d_sae=6)
    rows = np.asarray(a.W_dec)
    rng = np.random.default_rng(2)
    # B: A's features 0..5, and a second, noisier copy of feature 3 (a split) at position 6
    W_dec = np.concatenate([rows, rows[3:4] + 0.3 * rng.standard_normal((1, 16))])
    b = jfig.SAE(W_enc=W_dec.T, b_enc=np.zeros(7), W_dec=W_dec, b_dec=np.zeros(16), site=SITE)
    m = match_features(a, b)
    assert np.array_equal(m.match, np.arange(6)) and m.best_a[6] == 3
    assert m.unmatched_b.tolist() == [6]
    # and from B's side, B's feature 6 prefers A's 3, which prefers B's 3: unmatched, not forced elsewhere
    back = match_features(b, a)
    assert back.match.tolist() == [0, 1, 2, 3, 4, 5, -1] and back.best[6] == 3


def test_streamed_correlation_equals_numpy(model_tokens):
    model, tokens = model_tokens
    a, b = random_sae(3, d_sae=12), random_sae(4, d_sae=20)
    for batch in (3, 10):                           # a ragged last batch; one batch
        c = feature_correlation(a, b, model=model, tokens=tokens, batch_size=batch)
        np.testing.assert_allclose(c, reference_correlation(model, model, a, b, tokens), atol=2e-5)
    c = feature_correlation(a, b, model=model, tokens=tokens, batch_size=3, skip_positions=1)
    np.testing.assert_allclose(c, reference_correlation(model, model, a, b, tokens, skip=1), atol=2e-5)
    # a second model feeds SAE B: the same tokens through the fine-tuned model
    other = tiny_model(n_layers=2, seed=5)
    c = feature_correlation(a, b, model=model, model_b=other, tokens=tokens, batch_size=4)
    np.testing.assert_allclose(c, reference_correlation(model, other, a, b, tokens), atol=2e-5)
    # activations given as arrays (split into 1 x 128-row batches: the last one padded)
    x = np.asarray(model.run(jnp.asarray(tokens), capture=(SITE,)).cache[SITE]).reshape(-1, 16)
    c = feature_correlation(a, b, activations=x, batch_size=1)
    np.testing.assert_allclose(c, reference_correlation(model, model, a, b, tokens), atol=2e-5)
    with pytest.raises(jfig.ShapeError, match="different numbers of token rows"):
        feature_correlation(a, b, activations=x, activations_b=x[:-1])


def test_activation_matching_finds_what_the_decoders_hide(model_tokens):
    model, tokens = model_tokens
    b_enc = np.zeros(16)
    b_enc[5] = -100.0                               # feature 5 never fires
    a = random_sae(6, d_sae=16, b_enc=b_enc)
    perm = np.random.default_rng(6).permutation(16)
    want = np.argsort(perm)
    # B: A's encoder permuted (the same firing) with unrelated decoder rows
    b = permuted(a, perm, W_dec=np.asarray(random_sae(7, d_sae=16).W_dec))
    m = match_features(a, b, method="activation", model=model, tokens=tokens, batch_size=4)
    live = np.arange(16) != 5
    assert np.array_equal(m.match[live], want[live]) and m.match[5] == -1
    assert m.n_tokens == 160 and m.correlation[5] == 0.0
    np.testing.assert_allclose(m.similarity[live], 1.0, atol=1e-5)
    assert np.abs(m.decoder_cosine[live]).max() < 0.99
    by_decoder = match_features(a, b, model=model, tokens=tokens)
    assert (by_decoder.match == want).sum() <= 2 and not np.isnan(by_decoder.correlation).any()
    both = match_features(a, b, method="both", model=model, tokens=tokens)
    assert both.n_matched < 16 and np.all(both.similarity <= m.similarity + 1e-6)
    # a permuted copy (decoder too) matches by both, exactly
    same = match_features(a, permuted(a, perm), method="both", model=model, tokens=tokens)
    assert np.array_equal(same.match[live], want[live]) and same.match[5] == -1


def test_sae_sets_and_bad_inputs(model_tokens):
    model, tokens = model_tokens
    a0, a1 = random_sae(8, site="blocks.0.hook_resid_post"), random_sae(9)
    perm = np.random.default_rng(8).permutation(40)
    out = match_sae_sets([a0, a1], [permuted(a1, perm)])
    assert list(out) == [SITE] and np.array_equal(out[SITE].match, np.argsort(perm))
    with pytest.raises(jfig.JfigError, match="share no site"):
        match_sae_sets([a0], [a1])
    with pytest.raises(jfig.SiteError, match="SAE A reads blocks.0.hook_resid_post but SAE B reads"):
        match_features(a0, a1)
    with pytest.raises(jfig.ShapeError, match="SAE A has d_in 16 but SAE B has d_in 8"):
        match_features(a1, random_sae(10, d_in=8))
    with pytest.raises(jfig.OptionError, match="method must be one of"):
        match_features(a1, a1, method="cosine")
    with pytest.raises(jfig.OptionError, match="pass activations=, or model= and tokens="):
        match_features(a1, a1, method="activation")
    with pytest.raises(jfig.OptionError, match="min_similarity must be in"):
        match_features(a1, a1, min_similarity=2)
    with pytest.raises(jfig.OptionError, match="needs activations=, or model= and tokens="):
        match_features(a1, a1, method="both", model=model)
    with pytest.raises(jfig.ShapeError, match="the SAE reads 16 values per token"):
        feature_correlation(a1, a1, activations=np.zeros((4, 8)))
    wide = random_sae(11, d_in=32)
    with pytest.raises(jfig.ShapeError, match="does not match site"):
        match_features(wide, wide, method="activation", model=model, tokens=tokens)
