"""Attention metrics: the QK term and its interaction part against their closed forms on hand-built
layers (rotary and learned positions), against the scores of the model's own forward, the query
overlap against an explicit sum over every key feature, and the strict-dominance test on a head that
reads one feature, a head that reads two, and a float64 numpy re-implementation."""
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.testing import tiny_model
from jfig.errors import JfigError, ShapeError, SiteError
from jfig.interactions import dominance_test, qk_terms, query_overlap
from jfig.models.model import Prefix
from tests.interactions.toys import np_norm_parts, np_rope, params64, random_sae, site_acts, toy_tokens

PRE = "blocks.0.hook_resid_pre"


def hand_built(family: str, seed: int = 0, *, q_rows=None) -> jfig.Model:
    """One layer with explicit attention weights: norm weight, W_q, W_k drawn here; biases zero.
    `q_rows`: residual coordinates W_q reads (all when None)."""
    base = tiny_model(family, n_layers=1, seed=seed)
    cfg, rng = base.config, np.random.default_rng(seed + 10)
    blocks = {k: np.asarray(v).copy() for k, v in base.params["blocks"].items()}
    blocks["ln1_w"][0] = rng.uniform(0.5, 1.5, cfg.d_model) - cfg.norm_offset
    blocks["W_q"][0] = rng.normal(0, 0.7, blocks["W_q"][0].shape)
    blocks["W_k"][0] = rng.normal(0, 0.7, blocks["W_k"][0].shape)
    if q_rows is not None:
        keep = np.zeros(cfg.d_model, bool)
        keep[list(q_rows)] = True
        blocks["W_q"][0][~keep] = 0.0
    for name in ("ln1_b", "b_q", "b_k"):
        if name in blocks:
            blocks[name][0] = 0.0
    return jfig.Model.from_config(cfg, dict(base.params, blocks={k: jnp.asarray(v) for k, v in blocks.items()}))


def np_terms(model, sae):
    """float64 (Q [n, H, e], K [n, H, e]) of every feature, keys repeated per query head."""
    cfg, p = model.config, params64(model)
    D = np.asarray(sae.W_dec, np.float64)
    Nd = (D - D.mean(-1, keepdims=True) if cfg.norm == "layer" else D) * (cfg.norm_offset + p["ln1_w"])
    Q = (Nd @ p["W_q"]).reshape(len(D), cfg.n_heads, cfg.d_head)
    K = (Nd @ p["W_k"]).reshape(len(D), cfg.n_kv_heads, cfg.d_head)
    return Q, np.repeat(K, cfg.n_heads // cfg.n_kv_heads, axis=1)


def np_scores(model, Q, K, delta):
    """[H, n, n] c·(R_Δ q_a)·k_b, with an explicit rotation when the model uses rotary embeddings."""
    cfg = model.config
    Qr = np_rope(cfg, Q, delta) if cfg.positional == "rope" else Q
    return cfg.q_scale * np.einsum("ahe,bhe->hab", Qr, K)


def centred(A, w):
    """Double-centre A [H, n, n] with feature weights w [n]."""
    rows, cols = np.einsum("hab,b->ha", A, w), np.einsum("hab,a->hb", A, w)
    return A - rows[:, :, None] - cols[:, None, :] + np.einsum("ha,a->h", rows, w)[:, None, None]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_qk_terms_equal_closed_form(family):
    model = hand_built(family)
    sae = random_sae(3, 16, 12, PRE)
    w = np.random.default_rng(4).uniform(0.1, 1.0, 12)
    queries, keys, offsets = [0, 3, 7], [1, 3, 5, 11], [0, 1, 5]
    terms = qk_terms(model, sae, queries, keys, offsets=offsets, weights=w)
    assert terms.score.shape == (3, 4, 3, 4) and terms.interaction.shape == (3, 4, 3, 4)
    Q, K = np_terms(model, sae)
    for r, delta in enumerate(offsets):
        A = np_scores(model, Q, K, delta)
        np.testing.assert_allclose(terms.score[r], A[:, queries][:, :, keys], rtol=1e-5, atol=1e-6)
        I = centred(A, w / w.sum())
        np.testing.assert_allclose(terms.interaction[r], I[:, queries][:, :, keys], rtol=1e-4, atol=1e-5)
    if family != "gpt2":                    # rotary: the relative position matters
        assert np.abs(terms.score[0] - terms.score[2]).max() > 1e-2
    else:
        np.testing.assert_array_equal(terms.score[0], terms.score[2])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_qk_term_is_the_forward_score(family):
    """A residual holding d_i at the query position and d_j at the key position: the model's own
    q·k (hook_q, hook_k, after rotary at absolute positions) is g_q g_k A(i, j; p_q − p_k)."""
    model, sae = hand_built(family, seed=1), random_sae(5, 16, 12, PRE)
    cfg = model.config
    i, j, pk, pq = 2, 9, 3, 10
    X = np.random.default_rng(2).normal(size=(1, 12, 16)).astype(np.float32)
    D = np.asarray(sae.W_dec)
    X[0, pk], X[0, pq] = D[j], D[i]
    out = model.run_suffix(Prefix(PRE, jnp.asarray(X), None), capture=("blocks.0.attn.hook_q", "blocks.0.attn.hook_k"),
                           stop_at="blocks.0.attn.hook_k")
    q = np.asarray(out.cache["blocks.0.attn.hook_q"], np.float64)[0, pq]                 # [H, e]
    k = np.asarray(out.cache["blocks.0.attn.hook_k"], np.float64)[0, pk]                 # [G, e]
    k = np.repeat(k, cfg.n_heads // cfg.n_kv_heads, axis=0)
    forward = cfg.q_scale * (q * k).sum(-1)                                              # [H]
    g = np_norm_parts(cfg, D[[i, j]].astype(np.float64))[0]
    term = qk_terms(model, sae, [i], [j], offsets=pq - pk).score[0, :, 0, 0]
    np.testing.assert_allclose(forward, g[0] * g[1] * term, rtol=1e-4, atol=1e-6)


def test_query_overlap_equals_sum_over_keys():
    model, sae = hand_built("llama", seed=2), random_sae(6, 16, 10, PRE)
    w = np.random.default_rng(7).uniform(0, 1, 10)
    w /= w.sum()
    queries = [1, 4, 6, 8]
    got = query_overlap(model, sae, queries, offsets=[0, 3], weights=w)
    assert got.overlap.shape == (2, 4, 4, 4)
    Q, K = np_terms(model, sae)
    for r, delta in enumerate((0, 3)):
        I = centred(np_scores(model, Q, K, delta), w)[:, queries]                        # [H, n_q, all keys]
        gram = np.einsum("hak,hbk,k->hab", I, I, w)
        d = np.sqrt(np.einsum("haa->ha", gram))
        np.testing.assert_allclose(got.overlap[r], gram / (d[:, :, None] * d[:, None, :]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.einsum("rhaa->rha", got.overlap), 1.0, rtol=1e-5)


def coordinate_sae(n: int = 8) -> jfig.SAE:
    D = np.eye(16, dtype=np.float32)[:n]
    return jfig.SAE(W_enc=jnp.asarray(D.T), b_enc=jnp.zeros(n), W_dec=jnp.asarray(D), b_dec=jnp.zeros(16), site=PRE)


def test_dominance_on_hand_built_heads():
    """A query that reads one feature (and non-feature coordinates) is exactly dominated; one that reads
    two features is not."""
    sae, tokens = coordinate_sae(), toy_tokens(n=16, seq=12)
    one = dominance_test(hand_built("llama", q_rows=[0, *range(8, 16)]), sae, tokens, skip_positions=1)
    assert one.n_queries > 50
    assert one.tv_dominant.max() < 1e-5 and one.tv_none.min() > 1e-2
    np.testing.assert_allclose(one.explained, 1.0, atol=1e-3)
    assert (one.same_top_key == 1.0).all()
    two = dominance_test(hand_built("llama", q_rows=[0, 1, *range(8, 16)]), sae, tokens, skip_positions=1)
    assert two.tv_dominant.min() > 1e-3 and (two.explained < 0.99).all()


def np_softmax_pattern(cfg, q, k):
    """[H, s, s] causal softmax of c·q·k with q [s, H, e], k [s, H, e] (rotary applied already)."""
    s = q.shape[0]
    scores = cfg.q_scale * np.einsum("qhe,khe->hqk", q, k)
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_dominance_equals_numpy():
    model = tiny_model("llama", n_layers=1, seed=3, scale=0.5)
    cfg, p = model.config, params64(model)
    sae = random_sae(8, 16, 24, PRE, bias=-0.1)
    tokens = toy_tokens(n=3, seq=7, seed=5)
    got = dominance_test(model, sae, tokens)
    x, f = site_acts(model, sae, tokens, PRE)
    D, gamma = np.asarray(sae.W_dec, np.float64), cfg.norm_offset + p["ln1_w"]
    H, e, rep = cfg.n_heads, cfg.d_head, cfg.n_heads // cfg.n_kv_heads
    Qf = ((D * gamma) @ p["W_q"]).reshape(-1, H, e)
    sums, n = np.zeros((3, H)), 0
    for row in range(3):
        xs, fs = x[row * 7:(row + 1) * 7], f[row * 7:(row + 1) * 7]
        g = np_norm_parts(cfg, xs)[0]
        h = g[:, None] * xs * gamma
        q, k = (h @ p["W_q"]).reshape(7, H, e), np.repeat((h @ p["W_k"]).reshape(7, -1, e), rep, axis=1)
        a = fs * g[:, None]
        q_rest = q - np.einsum("sn,nhe->she", a, Qf)
        top = np.argmax(a[:, :, None] * np.linalg.norm(Qf, axis=-1)[None], axis=1)       # [s, H]
        q_dom = q_rest + np.take_along_axis(a, top, 1)[..., None] * Qf[top, np.arange(H)]
        rot = lambda t: np.stack([np_rope(cfg, t[pos], pos) for pos in range(7)])  # noqa: E731
        kr = rot(k)
        P, Pd, Pn = (np_softmax_pattern(cfg, rot(t), kr) for t in (q, q_dom, q_rest))
        count = (fs > 0).sum(-1) >= 2
        n += count.sum()
        sums[0] += (0.5 * np.abs(P - Pd).sum(-1) * count).sum(-1)
        sums[1] += (0.5 * np.abs(P - Pn).sum(-1) * count).sum(-1)
        sums[2] += ((P.argmax(-1) == Pd.argmax(-1)) * count).sum(-1)
    assert got.n_queries == n > 10
    np.testing.assert_allclose(got.tv_dominant, sums[0] / n, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.tv_none, sums[1] / n, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.same_top_key, sums[2] / n)


def test_bad_input_is_refused():
    model = tiny_model("llama")                                              # 2 layers
    sae = random_sae(0, 16, 8, PRE)
    with pytest.raises(SiteError, match="no attention reads"):
        qk_terms(model, random_sae(0, 16, 8, "blocks.1.hook_resid_post"), [0])
    with pytest.raises(SiteError, match="residual basis"):
        qk_terms(model, jfig.SAE(W_enc=jnp.zeros((16, 4)), b_enc=jnp.zeros(4), W_dec=jnp.zeros((4, 16)),
                                 b_dec=jnp.zeros(16), site="blocks.0.attn.hook_z", reshape_hook_z=True), [0])
    with pytest.raises(JfigError, match="out of range"):
        qk_terms(model, sae, [0, 8])
    with pytest.raises(ShapeError, match="offsets"):
        qk_terms(model, sae, [0], offsets=1.5)
    with pytest.raises(JfigError, match="beyond"):
        query_overlap(model, sae, [0], offsets=[model.config.max_seq_len])
    with pytest.raises(ShapeError, match="weights"):
        query_overlap(model, sae, [0], weights=np.ones(5))
    with pytest.raises(JfigError, match="NaN"):
        query_overlap(model, sae, [0], weights=np.full(8, np.nan))
    with pytest.raises(ShapeError, match="does not match site"):
        dominance_test(model, random_sae(0, 24, 8, PRE), toy_tokens(n=2))
    nan_model = jfig.Model.from_config(model.config, dict(model.params, blocks=dict(
        model.params["blocks"], W_q=model.params["blocks"]["W_q"].at[0, 0, 0].set(jnp.nan))))
    with pytest.raises(JfigError, match="W_q"):
        dominance_test(nan_model, sae, toy_tokens(n=2))
