"""Head-level circuits from clean/corrupted prompt pairs: PatchHeads, head_patching, edge_heads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.behaviors import heads as heads_mod
from jfig.behaviors.heads import EdgeHeads, HeadEffects, can_carry, edge_heads, head_patching
from jfig.edits import PatchHeads
from jfig.edits import Ablate, Steer
from jfig.errors import JfigError, ShapeError, SiteError
from tests.support.tiny_models import tiny_model

Z = "blocks.{}.attn.hook_z"


def _pairs(seed=0, n=5, w=6, vocab=50):
    """Random prompt pairs: the corrupted prompt differs from the clean one at two positions."""
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, vocab, (n, w)).astype(np.int32)
    corrupted = clean.copy()
    corrupted[:, 1] = rng.integers(0, vocab, n)
    corrupted[:, 3] = rng.integers(0, vocab, n)
    last = rng.integers(3, w, n)
    answer, distractor = rng.integers(0, vocab, n), rng.integers(0, vocab, n)
    return clean, corrupted, last, answer, distractor


def _metric(logits, last, answer, distractor):
    """Logit difference per row, float64, from the model's own logits [n, w, V]."""
    lg = np.asarray(logits, np.float64)[np.arange(len(last)), last]
    rows = np.arange(len(last))
    return lg[rows, answer] - lg[rows, distractor]


def _one_hot(h, n_heads):
    return jnp.zeros(n_heads, bool).at[h].set(True)


@pytest.fixture(scope="module")
def llama():
    """The tiny random Llama every Llama test shares (building one costs seconds of eager ops)."""
    return tiny_model("llama", n_layers=4)


# ----------------------------------------------------------------------------------------------- PatchHeads


def test_patch_heads_with_clean_values_changes_nothing(llama):
    clean = _pairs(1)[0]
    site = Z.format(1)
    base = llama.run(clean, capture=site)
    rng = np.random.default_rng(0)
    for _ in range(6):       # the masks are leaves: one compilation for every trial
        heads, positions = rng.random(4) < 0.5, rng.random(clean.shape) < 0.7
        out = llama.run(clean, edits=PatchHeads(site, base.cache[site], heads, positions=positions))
        np.testing.assert_allclose(np.asarray(out.logits), np.asarray(base.logits), atol=1e-6)


def test_patch_heads_replaces_only_the_masked_heads_and_positions(llama):
    clean, corrupted = _pairs(2)[:2]
    site = Z.format(1)
    zc, zr = (np.asarray(llama.run(t, capture=site, stop_at=site).cache[site]) for t in (clean, corrupted))

    def patched(heads, positions):
        return np.asarray(llama.run(clean, edits=PatchHeads(site, zr, heads, positions=positions),
                                    capture=site, stop_at=site).cache[site])

    heads = np.array([True, False, True, False])
    positions = np.random.default_rng(0).random(clean.shape) < 0.5
    want = np.where(heads[None, None, :, None] & positions[:, :, None, None], zr, zc)
    np.testing.assert_array_equal(patched(heads, positions), want)
    np.testing.assert_array_equal(patched(np.ones(4, bool), np.ones(clean.shape, bool)), zr)
    np.testing.assert_array_equal(patched(np.zeros(4, bool), np.ones(clean.shape, bool)), zc)


def test_patch_heads_refuses_bad_input(llama):
    clean = _pairs()[0]
    site = Z.format(0)
    z = jnp.zeros((5, 6, 4, 4))
    with pytest.raises(SiteError, match="hook_z"):
        PatchHeads("blocks.0.hook_resid_post", z, np.ones(4, bool))
    with pytest.raises(ShapeError, match="bool mask"):
        PatchHeads(site, z, np.array([0, 2]))
    with pytest.raises(ShapeError, match="bool mask"):
        PatchHeads(site, z, np.ones((2, 4), bool))
    with pytest.raises(ShapeError, match="3 entries, expected n_heads 4"):
        llama.run(clean, edits=PatchHeads(site, z, np.ones(3, bool)))
    with pytest.raises(ShapeError, match="does not broadcast"):
        llama.run(clean, edits=PatchHeads(site, jnp.zeros((5, 7, 4, 4)), np.ones(4, bool)))
    with pytest.raises(ShapeError, match="position mask"):
        llama.run(clean, edits=PatchHeads(site, z, np.ones(4, bool), positions=np.ones(7, bool)))


# ----------------------------------------------------------------------------------------------- head_patching


def test_activation_patching_equals_a_loop_over_heads(llama):
    clean, corrupted, last, answer, distractor = _pairs(3)
    r = head_patching(llama, clean, corrupted, last, answer, distractor, batch_size=2)   # 5 rows: a padded batch
    assert isinstance(r, HeadEffects) and r.activation.shape == r.path_to_logits.shape == (4, 4)
    m_clean = _metric(llama.run(clean).logits, last, answer, distractor).mean()
    sites = tuple(Z.format(l) for l in range(4))
    corr = llama.run(corrupted, capture=sites)
    m_corr = _metric(corr.logits, last, answer, distractor).mean()
    assert r.clean_metric == pytest.approx(m_clean, abs=1e-5)
    assert r.corrupted_metric == pytest.approx(m_corr, abs=1e-5)
    # one head patched per run; the other layers' PatchHeads have empty masks (one compilation for all)
    want = np.zeros((4, 4))
    for l in range(4):
        for h in range(4):
            edits = [PatchHeads(sites[k], corr.cache[sites[k]], _one_hot(h, 4) & (k == l)) for k in range(4)]
            out = llama.run(clean, edits=edits)
            want[l, h] = _metric(out.logits, last, answer, distractor).mean() - m_clean
    np.testing.assert_allclose(r.activation_change, want, atol=1e-5)
    np.testing.assert_allclose(r.activation, want / (m_corr - m_clean), atol=1e-5)
    assert r.note == ""
    top = r.top(3)
    assert [v for _, v in top] == sorted((v for _, v in top), key=abs, reverse=True)
    assert abs(top[0][1]) == pytest.approx(np.abs(r.activation).max())
    assert r.activation[top[0][0]] == top[0][1]


def test_path_to_logits_equals_a_float64_computation(llama):
    """(z_corr - z_clean)[h] @ W_O[h] added to the clean final residual, then the final RMSNorm and the
    unembedding by hand in float64."""
    clean, corrupted, last, answer, distractor = _pairs(4)
    r = head_patching(llama, clean, corrupted, last, answer, distractor, batch_size=2)
    cfg, params = llama.config, jax.tree.map(lambda a: np.asarray(a, np.float64), llama.params)
    final = "blocks.3.hook_resid_post"
    sites = tuple(Z.format(l) for l in range(4))
    c, rr = (llama.run(t, capture=sites + (final,)) for t in (clean, corrupted))
    rows = np.arange(len(last))
    W_U = params["unembed"] if "unembed" in params else params["embed"].T

    def metric(x):                                            # x [n, d] final residual at `last`
        h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * (cfg.norm_offset + params["ln_f_w"])
        logits = h @ W_U
        return logits[rows, answer] - logits[rows, distractor]

    x = np.asarray(c.cache[final], np.float64)[rows, last]
    m_clean = _metric(c.logits, last, answer, distractor).mean()
    m_corr = _metric(rr.logits, last, answer, distractor).mean()
    hd = cfg.d_head
    want = np.zeros((4, 4))
    for l in range(4):
        dz = (np.asarray(rr.cache[sites[l]], np.float64) - np.asarray(c.cache[sites[l]], np.float64))[rows, last]
        for h in range(4):
            delta = dz[:, h] @ params["blocks"]["W_o"][l][h * hd:(h + 1) * hd]
            want[l, h] = (metric(x + delta).mean() - m_clean) / (m_corr - m_clean)
    np.testing.assert_allclose(r.path_to_logits, want, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
def test_path_to_logits_equals_a_steered_run(family):
    """With LayerNorm and output biases (GPT-2), post-attention norms and soft-capped logits (Gemma-2): the
    change of the layer's attention output when one head is patched, steered into the final residual."""
    model = tiny_model(family, n_layers=1)
    clean, corrupted, last, answer, distractor = _pairs(5, n=3)
    r = head_patching(model, clean, corrupted, last, answer, distractor)
    z, out = Z.format(0), "blocks.0.hook_attn_out"
    c, rr = (model.run(t, capture=(z, out)) for t in (clean, corrupted))
    m_clean = _metric(c.logits, last, answer, distractor).mean()
    m_corr = _metric(rr.logits, last, answer, distractor).mean()
    for h in (1, 2):
        patched = model.run(clean, edits=PatchHeads(z, rr.cache[z], _one_hot(h, 4)), capture=out,
                            stop_at=out).cache[out]
        steered = model.run(clean, edits=Steer("blocks.0.hook_resid_post", patched - c.cache[out])).logits
        want = (_metric(steered, last, answer, distractor).mean() - m_clean) / (m_corr - m_clean)
        assert r.path_to_logits[0, h] == pytest.approx(want, abs=1e-5)


def test_one_compilation_per_layer(llama, monkeypatch):
    """A second call with other prompts, answers and `last` of the same shapes traces nothing; heads
    are vmapped, so the first call traces each layer's function once (not once per head), and the
    direct-path function (layer index traced) once for every layer."""
    calls = {"head": 0, "path": 0}
    head_run, attn_out = heads_mod._head_run, heads_mod._attn_out

    def counted_head_run(*args, **kw):
        calls["head"] += 1
        return head_run(*args, **kw)

    def counted_attn_out(*args, **kw):
        calls["path"] += 1
        return attn_out(*args, **kw)

    monkeypatch.setattr(heads_mod, "_head_run", counted_head_run)
    monkeypatch.setattr(heads_mod, "_attn_out", counted_attn_out)
    # width 7 and batches of 4 rows: shapes no other test in this module runs (two batches, one padded)
    head_patching(llama, *_pairs(6, n=7, w=7), batch_size=4)
    assert calls == {"head": 4, "path": 2}                          # _attn_out: twice per trace of the path
    head_patching(llama, *_pairs(7, n=7, w=7), batch_size=4)
    assert calls == {"head": 4, "path": 2}


def test_equal_metrics_give_nan_with_a_note(llama):
    clean, _, last, answer, distractor = _pairs(8)
    r = head_patching(llama, clean, clean, last, answer, distractor, batch_size=2)
    assert np.isnan(r.activation).all() and np.isnan(r.path_to_logits).all()
    assert "too close" in r.note
    np.testing.assert_allclose(r.activation_change, 0, atol=1e-6)


def test_head_patching_refuses_bad_input(llama):
    clean, corrupted, last, answer, distractor = _pairs(9)
    call = lambda **kw: head_patching(llama, **{**dict(clean=clean, corrupted=corrupted, last=last,  # noqa: E731
                                                      answer=answer, distractor=distractor), **kw})
    with pytest.raises(ShapeError, match="same shape"):
        call(corrupted=corrupted[:, :5])
    with pytest.raises(ShapeError, match="0 <= last < 6"):
        call(last=np.full(5, 6))
    with pytest.raises(ShapeError, match="0 <= last < 6"):
        call(last=np.full(5, -1))
    with pytest.raises(ShapeError, match="one entry per prompt"):
        call(last=last[:4])
    with pytest.raises(ShapeError, match="integer dtype"):
        call(answer=answer.astype(float))
    with pytest.raises(ShapeError, match="vocabulary"):
        call(distractor=np.full(5, 50))
    with pytest.raises(ShapeError, match="integer dtype"):
        call(clean=clean.astype(np.float32))
    with pytest.raises(ShapeError, match="rank 2"):
        call(clean=clean[0], corrupted=corrupted[0])
    with pytest.raises(JfigError, match="batch_size"):
        call(batch_size=0)
    with pytest.raises(ShapeError, match="no prompts"):
        call(clean=clean[:0], corrupted=corrupted[:0], last=last[:0], answer=answer[:0], distractor=distractor[:0])
    wrapped = jfig.Model.from_function(lambda p, t, hook: hook("hook_embed", p[t]), jnp.zeros((50, 8)),
                                       sites=("hook_embed",), vocab_size=50)
    with pytest.raises(JfigError, match="from_function"):
        head_patching(wrapped, clean, corrupted, last, answer, distractor)
    with pytest.raises(JfigError, match="from_function"):
        edge_heads(wrapped, None, 0, None, 0, clean, last, [])


# ----------------------------------------------------------------------------------------------- edge_heads


def _identity_sae(site, seed, d=16):
    """An SAE whose decoder rows are an orthonormal basis (W_enc = W_dec.T), ReLU."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    q = jnp.asarray(q, jnp.float32)
    return jfig.SAE(W_enc=q.T, b_enc=jnp.zeros(d), W_dec=q, b_dec=jnp.zeros(d), site=site)


@pytest.fixture(scope="module")
def edge_setup(llama):
    """The 4-layer model, SAEs at blocks.0/2.hook_resid_post, a source feature active before `last`, and the
    target feature whose cross-position effect is largest."""
    model = llama
    sae_s, sae_t = _identity_sae("blocks.0.hook_resid_post", 1), _identity_sae("blocks.2.hook_resid_post", 2)
    clean, _, last, _, _ = _pairs(10, n=5, w=8)
    before = np.arange(8)[None] < last[:, None]
    f_s = np.asarray(sae_s.encode(model.run(clean, capture=sae_s.site, stop_at=sae_s.site).cache[sae_s.site]))
    source = int(np.argmax(f_s[before].mean(0)))
    rows = np.arange(len(last))
    f_clean = _target_feats(model, sae_t, clean, (), rows, last)
    f_abl = _target_feats(model, sae_t, clean, (Ablate(sae_s, source, positions=before),), rows, last)
    target = int(np.argmax(np.abs((f_abl - f_clean).mean(0))))
    return model, sae_s, source, sae_t, target, clean, last, before


def _target_feats(model, sae_t, tokens, edits, rows, last):
    """Every target feature at `last`, float64 [n, d_sae]."""
    out = model.run(tokens, edits=edits, capture=sae_t.site, stop_at=sae_t.site).cache[sae_t.site]
    return np.asarray(sae_t.encode(out), np.float64)[rows, last]


HEADS = [(l, h) for l in range(4) for h in range(4)]


def test_edge_heads_shares_equal_direct_runs(edge_setup):
    model, sae_s, source, sae_t, target, clean, last, before = edge_setup
    r = edge_heads(model, sae_s, source, sae_t, target, clean, last, HEADS, batch_size=2)
    assert isinstance(r, EdgeHeads) and r.share.shape == (16,) and r.note == "" and r.heads == tuple(HEADS)
    rows = np.arange(len(last))
    ablate = Ablate(sae_s, source, positions=before)
    f_clean = _target_feats(model, sae_t, clean, (), rows, last)[:, target]
    E = (_target_feats(model, sae_t, clean, (ablate,), rows, last)[:, target] - f_clean).mean()
    assert abs(E) > 1e-3
    assert r.effect == pytest.approx(E, abs=1e-6)
    zs = model.run(clean, capture=tuple(Z.format(l) for l in range(3)), logits=False).cache

    def blocked(mask_by_layer):
        """E with the heads in {layer: mask} held at their clean z (layers 0-2, one compilation for all)."""
        edits = (ablate,) + tuple(PatchHeads(Z.format(l), zs[Z.format(l)], mask_by_layer.get(l, np.zeros(4, bool)))
                                  for l in range(3))
        return (_target_feats(model, sae_t, clean, edits, rows, last)[:, target] - f_clean).mean()

    assert blocked({}) == pytest.approx(E, abs=1e-6)
    for i, (l, h) in enumerate(HEADS):
        if l in (0, 3):        # before the source site's block / after the target site's: cannot carry the edge
            assert r.share[i] == 0 and r.blocked[i] == r.effect
        else:
            E_h = blocked({l: _one_hot(h, 4)})
            assert r.blocked[i] == pytest.approx(E_h, abs=1e-6)
            assert r.share[i] == pytest.approx((E - E_h) / E, abs=1e-4)
    # the zero shares are what a run gives: holding heads before the source at their clean z changes nothing
    assert blocked({0: np.ones(4, bool)}) == pytest.approx(E, abs=1e-6)
    # only attention moves information between positions: with every head of blocks 1 and 2 held clean,
    # the target at `last` (whose own position is not ablated) is clean
    assert blocked({1: np.ones(4, bool), 2: np.ones(4, bool)}) == pytest.approx(0, abs=1e-6)


def test_edge_heads_without_an_effect_gives_nan_with_a_note(edge_setup):
    """No position before `last` (last = 0): nothing is ablated, E = 0."""
    model, sae_s, source, sae_t, target, clean, last, _ = edge_setup
    r = edge_heads(model, sae_s, source, sae_t, target, clean, np.zeros(len(last), int), HEADS, batch_size=2)
    assert r.effect == 0 and np.isnan(r.share).all() and "too small" in r.note


def test_can_carry():
    s, t = "blocks.0.hook_resid_post", "blocks.2.hook_resid_post"
    assert [can_carry(l, s, t) for l in range(4)] == [False, True, True, False]
    assert can_carry(1, "blocks.1.hook_resid_pre", "blocks.1.hook_attn_out")
    assert not can_carry(1, "blocks.1.attn.hook_z", "blocks.2.hook_resid_pre")
    assert not can_carry(1, "blocks.0.hook_resid_post", "blocks.1.attn.hook_z")


def test_edge_heads_refuses_bad_input(edge_setup):
    model, sae_s, source, sae_t, target, clean, last, _ = edge_setup
    with pytest.raises(SiteError, match="before the target"):
        edge_heads(model, sae_t, target, sae_s, source, clean, last, [(1, 0)])
    with pytest.raises(SiteError, match="before the target"):
        edge_heads(model, sae_s, source, sae_s, target, clean, last, [(1, 0)])
    with pytest.raises(ShapeError, match="does not match site"):
        edge_heads(model, sae_s, source, _identity_sae("blocks.2.hook_resid_post", 3, d=8), 0, clean, last, [])
    with pytest.raises(ShapeError, match="out of range"):
        edge_heads(model, sae_s, source, sae_t, target, clean, last, [(4, 0)])
    with pytest.raises(JfigError, match="pairs"):
        edge_heads(model, sae_s, source, sae_t, target, clean, last, [1])
    with pytest.raises(ShapeError, match="feature index"):
        edge_heads(model, sae_s, 16, sae_t, target, clean, last, [(1, 0)])
    with pytest.raises(ShapeError, match="0 <= last < 8"):
        edge_heads(model, sae_s, source, sae_t, target, clean, last + 8, [(1, 0)])
