"""Crosscoder features as sources and targets: crosscoder_effects against hand-run full forwards."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfig.edits import Steer
from jfig.errors import JfigError, ShapeError
from jfig.measure.crosscoder import crosscoder_effects
from jfig.saes import Crosscoder
from jfig.testing import tiny_model

SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post")


def random_crosscoder(d=16, n=12, seed=0, homes=None, architecture="relu"):
    """A crosscoder with every feature's largest decoder row at `homes[i]` (so home layers are known)."""
    k = jax.random.split(jax.random.key(seed), 3)
    L = len(SITES)
    W_enc = jax.random.normal(k[0], (L, d, n)) * 0.3
    W_dec = jax.random.normal(k[1], (n, L, d)) * 0.2
    homes = np.arange(n) % L if homes is None else np.asarray(homes)
    W_dec = W_dec.at[np.arange(n), homes].multiply(6.0)
    b_enc = jax.random.normal(k[2], (n,)) * 0.1 + 0.3
    return Crosscoder(W_enc, b_enc, W_dec, jnp.zeros((L, d)), SITES, architecture=architecture,
                      k=4 if architecture == "topk" else None)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", n_layers=3, d_model=16)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (6, 8), 0, 64))
    return model, random_crosscoder(), tokens


def hand_values(model, cc, tokens, seq, p, h, feat, coef, read):
    """Every crosscoder feature at position p of sequence seq after adding coef * W_dec[feat, h] there."""
    site = cc.sites[h]
    delta = jnp.zeros((1, tokens.shape[1], cc.d_model)).at[0, p].set(coef * cc.W_dec[feat, h])
    out = model.run(tokens[seq:seq + 1], edits=(Steer(site, delta, 1.0),), capture=cc.sites).cache
    xs = jnp.stack([out[s][0, p] for s in cc.sites])
    pre = cc.pre_activations(xs)
    return np.asarray(pre if read == "pre" else cc.activation(pre))


@pytest.mark.parametrize("method,read", [("clamp", "post"), ("clamp", "pre"), ("ablate", "post"),
                                         ("jacobian", "pre")])
def test_matches_full_runs(setup, method, read):
    model, cc, tokens = setup
    homes = cc.home_layers()
    sources = [0, 1, 3]                           # homes 0, 1, 0
    eff = crosscoder_effects(model, cc, tokens, sources, method=method, read=read, inputs_per_source=4,
                             chunk_size=2, progress=False)
    clean_xs = model.run(tokens, capture=cc.sites).cache
    f_clean = np.asarray(cc.encode(jnp.stack([clean_xs[s] for s in cc.sites], axis=-2)))    # [N, S, n]
    checked = 0
    for r, feat in enumerate(sources):
        h = homes[feat]
        lo, hi = eff.alphas[r]
        for m in range(4):
            if eff.input_weight[r, m] == 0:
                continue
            seq = int(eff.input_index[r, m])
            p = int(np.argmax(f_clean[seq, :, feat]))
            fi = f_clean[seq, p, feat]
            if method == "clamp":
                want = (hand_values(model, cc, tokens, seq, p, h, feat, hi - fi, read)
                        - hand_values(model, cc, tokens, seq, p, h, feat, lo - fi, read)) / (hi - lo)
            elif method == "ablate":
                want = (hand_values(model, cc, tokens, seq, p, h, feat, 0.0, read)
                        - hand_values(model, cc, tokens, seq, p, h, feat, -fi, read)) / fi
            else:
                eps = 1e-3
                want = (hand_values(model, cc, tokens, seq, p, h, feat, eps, read)
                        - hand_values(model, cc, tokens, seq, p, h, feat, -eps, read)) / (2 * eps)
            later = homes > h
            tol = 2e-3 if method == "jacobian" else 1e-4
            np.testing.assert_allclose(eff.per_input[r, m][later], want[later], atol=tol, rtol=tol)
            assert np.all(eff.n[r][~later] == 0) and np.all(np.isnan(eff.mean[r][~later]))
            checked += 1
    assert checked >= 6


def test_sites_and_nonzero(setup):
    model, cc, tokens = setup
    eff = crosscoder_effects(model, cc, tokens, [0, 1], inputs_per_source=4, read="pre", progress=False)
    assert eff.sources.sites == (SITES[0], SITES[1])
    assert eff.targets.sites[:3] == SITES
    later = cc.home_layers() > 0
    assert np.nanmax(np.abs(eff.mean[0][later])) > 1e-3          # clamping does reach later features


def test_random_direction_differs_and_is_seeded(setup):
    model, cc, tokens = setup
    a = crosscoder_effects(model, cc, tokens, [0], inputs_per_source=4, read="pre", direction="random",
                           progress=False)
    b = crosscoder_effects(model, cc, tokens, [0], inputs_per_source=4, read="pre", direction="random",
                           progress=False)
    d = crosscoder_effects(model, cc, tokens, [0], inputs_per_source=4, read="pre", progress=False)
    np.testing.assert_array_equal(a.mean, b.mean)
    ok = np.isfinite(d.mean)
    assert not np.allclose(a.mean[ok], d.mean[ok])


def test_errors(setup):
    model, cc, tokens = setup
    with pytest.raises(JfigError, match="out of range"):
        crosscoder_effects(model, cc, tokens, [99], progress=False)
    with pytest.raises(JfigError, match="unknown method"):
        crosscoder_effects(model, cc, tokens, [0], method="mean_ablate", progress=False)
    with pytest.raises(JfigError, match="repeat"):
        crosscoder_effects(model, cc, tokens, [0, 0], progress=False)
    wide = Crosscoder(jnp.zeros((3, 8, 4)), jnp.zeros(4), jnp.ones((4, 3, 8)), jnp.zeros((3, 8)), SITES)
    with pytest.raises(ShapeError, match="width"):
        crosscoder_effects(model, wide, tokens, [0], progress=False)


def test_no_retrace_for_other_sources(setup, count_traces):
    model, cc, tokens = setup
    homes = cc.home_layers()
    first, second = np.flatnonzero(homes == 0)[:2], np.flatnonzero(homes == 0)[2:4]
    crosscoder_effects(model, cc, tokens, first, inputs_per_source=4, chunk_size=2, progress=False)
    with count_traces() as traces:                # same home layer and shapes, other features: no trace
        crosscoder_effects(model, cc, tokens, second, inputs_per_source=4, chunk_size=2, progress=False)
    assert traces.count == 0
