"""Planted models for graph-level tests (TransformerLens site names, built with Model.from_function).

Two sites, `blocks.0.hook_resid_post` (sources) and `blocks.1.hook_resid_post` (targets), each read
by an identity ReLU SAE over D = 24 features. Source i fires (value in [1, 2]) on about half of
the tokens, independently. Targets carry a bias of 3 so they are always active.

- `recovery_model()`: t = 3 + W x + 2 Σ_gates x_i x_k, with a few planted ±2 weights in W and two
  AND gates; every other pair has no interaction.
- `null_model()`: t_j = 40 + Σ_i x_i g_ij(token) with g_ij(token) = ±1, exactly balanced over the
  tokens on which source i fires (it fires with a constant value on exactly half the vocabulary),
  so every clamp effect has mean zero over uniform tokens: no interactions, only noise.
"""
import jax
import jax.numpy as jnp
import numpy as np

import jfig

D = 24
SRC, TGT = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
EXCITATORY = [(0, 0), (1, 5), (2, 7), (3, 9), (4, 11), (5, 2)]
INHIBITORY = [(6, 1), (7, 3), (8, 13), (9, 15)]
GATES = [(10, 11, 17), (12, 13, 19)]          # (i, k, j): t_j += 2 x_i x_k


def _identity_sae(site):
    eye = jnp.eye(D)
    return jfig.SAE(W_enc=eye, b_enc=jnp.zeros(D), W_dec=eye, b_dec=jnp.zeros(D), threshold=None, site=site,
                    architecture="relu", apply_b_dec_to_input=False)


def _sources(vocab, seed):
    rng = np.random.default_rng(seed)
    on = rng.random((vocab, D)) < 0.5
    return jnp.asarray(np.where(on, rng.uniform(1.0, 2.0, (vocab, D)), 0.0), jnp.float32)


def _wrap(apply, params, vocab):
    model = jfig.Model.from_function(apply, params, sites=(SRC, TGT), vocab_size=vocab,
                                     site_widths={SRC: D, TGT: D})
    return model, [_identity_sae(SRC), _identity_sae(TGT)]


def recovery_model(vocab=64, seed=0):
    W = np.zeros((D, D), np.float32)          # W[i, j]: source i -> target j
    for i, j in EXCITATORY:
        W[i, j] = 2.0
    for i, j in INHIBITORY:
        W[i, j] = -2.0
    params = {"X": _sources(vocab, seed), "W": jnp.asarray(W), "U": jax.random.normal(jax.random.PRNGKey(seed), (D, vocab))}

    def apply(p, tokens, hook):
        x = hook(SRC, p["X"][tokens])
        t = 3.0 + x @ p["W"]
        for i, k, j in GATES:
            t = t.at[..., j].add(2.0 * x[..., i] * x[..., k])
        return hook(TGT, t) @ p["U"]

    return _wrap(apply, params, vocab)


def _additive_model(x, g, vocab, seed):
    """t_j = 40 + Σ_i x_i g_ij(token) with source values x [vocab, D] and token-wise weights g [vocab, D, D]."""
    params = {"X": jnp.asarray(x), "G": jnp.asarray(g), "U": jax.random.normal(jax.random.PRNGKey(seed), (D, vocab))}

    def apply(p, tokens, hook):
        x = hook(SRC, p["X"][tokens])
        t = 40.0 + jnp.einsum("bsi,bsij->bsj", x, p["G"][tokens])     # > 0 always: ReLU never clips
        return hook(TGT, t) @ p["U"]

    return _wrap(apply, params, vocab)


def null_model(vocab=512, seed=0):
    rng = np.random.default_rng(seed + 1)
    x = np.zeros((vocab, D), np.float32)
    g = np.empty((vocab, D, D), np.float32)
    quarter = np.array([1.0] * (vocab // 4) + [-1.0] * (vocab // 4), np.float32)
    for i in range(D):
        on = rng.permutation(vocab)[: vocab // 2]     # source i fires (value 1.5) on half the tokens
        x[on, i] = 1.5
        for j in range(D):                            # g_ij balanced over exactly those tokens
            g[:, i, j] = rng.choice([-1.0, 1.0], size=vocab)
            g[on, i, j] = rng.permutation(quarter)
    return _additive_model(x, g, vocab, seed)


def truth():
    """Planted first-order pairs (incl. gate inputs, whose mean effect is E[partner] > 0) and gates."""
    first = {(i, j): "excitatory" for i, j in EXCITATORY}
    first.update({(i, j): "inhibitory" for i, j in INHIBITORY})
    for i, k, j in GATES:
        first[(i, j)] = first[(k, j)] = "excitatory"
    gates = {(min(i, k), max(i, k), j) for i, k, j in GATES}
    return first, gates


def curvature_model(vocab=64, seed=0):
    """No gate at all: the planted first-order edges of `recovery_model` plus curvature along each
    input, t_j = 3 + Σ_i W_ij x_i + 0.1 Σ_{i: W_ij ≠ 0} x_i². Decoder directions (one coordinate each)
    have no mixed term; a random modulator direction r does (0.2 r_i), so the random-modulator null is
    not zero."""
    W = np.zeros((D, D), np.float32)
    for i, j in EXCITATORY:
        W[i, j] = 2.0
    for i, j in INHIBITORY:
        W[i, j] = -2.0
    params = {"X": _sources(vocab, seed), "W": jnp.asarray(W), "A": jnp.asarray((W != 0).astype(np.float32)),
              "U": jax.random.normal(jax.random.PRNGKey(seed), (D, vocab))}

    def apply(p, tokens, hook):
        x = hook(SRC, p["X"][tokens])
        return hook(TGT, 3.0 + x @ p["W"] + 0.1 * (x * x) @ p["A"]) @ p["U"]

    return _wrap(apply, params, vocab)


def skewed_null_model(vocab=512, seed=0):
    """Like `null_model`, but g_ij(token) is a centred exponential (skewness ±2, the sign drawn per
    pair), exactly mean zero over the tokens on which source i fires: every clamp effect has mean
    zero over uniform tokens, while the per-input effects are skewed rather than symmetric."""
    rng = np.random.default_rng(seed + 11)
    x = np.zeros((vocab, D), np.float32)
    g = np.empty((vocab, D, D), np.float32)
    for i in range(D):
        on = rng.permutation(vocab)[: vocab // 2]
        x[on, i] = 1.5
        v = rng.exponential(1.0, (vocab, D)) * rng.choice([-1.0, 1.0], size=D)
        v[on] -= v[on].mean(0)
        g[:, i, :] = v
    return _additive_model(x, g, vocab, seed)


MOD_I, MOD_K, MOD_J = 0, 1, 2     # source, pure modulator, target of `modulator_model`


def modulator_model(vocab=64, seed=0):
    """A pure modulator: t_J = 3 + 2 x_I + 2 x_K (x_I − 1.5), every other target 3. On the tokens where
    K fires, x_I is 1 or 2, half each, so K's own slope on J, 2 (x_I − 1.5) = ±1, averages to zero (K is no
    first-order input of J) while K changes I's slope on J from 2 to 2 + 2 x_K: a gate (i, k -> j) with
    factorial contrast 2."""
    x = np.array(_sources(vocab, seed))
    rng = np.random.default_rng(seed + 7)
    on = np.flatnonzero(x[:, MOD_K] > 0)
    x[on, MOD_I] = rng.permutation(np.resize([1.0, 2.0], len(on)))
    params = {"X": jnp.asarray(x), "U": jax.random.normal(jax.random.PRNGKey(seed), (D, vocab))}

    def apply(p, tokens, hook):
        x = hook(SRC, p["X"][tokens])
        t = jnp.full(x.shape, 3.0).at[..., MOD_J].add(2 * x[..., MOD_I] + 2 * x[..., MOD_K] * (x[..., MOD_I] - 1.5))
        return hook(TGT, t) @ p["U"]

    return _wrap(apply, params, vocab)


MID = "blocks.1.hook_resid_post"
FAR = "blocks.2.hook_resid_post"


def two_scale_model(vocab=64, seed=0):
    """Two source sites of different scale feeding one target site: SRC (blocks.0) reaches the targets
    (blocks.2) through a dense random map with entries of standard deviation 10, so any direction there,
    random or not, moves every target a lot; MID (blocks.1) reaches them only through the planted
    ±2 weights of `recovery_model` (EXCITATORY, INHIBITORY). Sources at both sites fire independently.
    A null pooled over both source sites is dominated by SRC's and hides MID's planted edges."""
    W = np.zeros((D, D), np.float32)
    for i, j in EXCITATORY:
        W[i, j] = 2.0
    for i, j in INHIBITORY:
        W[i, j] = -2.0
    rng = np.random.default_rng(seed + 5)
    params = {"X": _sources(vocab, seed), "Y": _sources(vocab, seed + 1), "W": jnp.asarray(W),
              "M": jnp.asarray(10.0 * rng.normal(size=(D, D)), jnp.float32),
              "U": jax.random.normal(jax.random.PRNGKey(seed), (D, vocab))}

    def apply(p, tokens, hook):
        x = hook(SRC, p["X"][tokens])
        y = hook(MID, p["Y"][tokens])
        return hook(FAR, 3.0 + x @ p["M"] + y @ p["W"]) @ p["U"]

    model = jfig.Model.from_function(apply, params, sites=(SRC, MID, FAR), vocab_size=vocab,
                                     site_widths={SRC: D, MID: D, FAR: D})
    return model, [_identity_sae(SRC), _identity_sae(MID), _identity_sae(FAR)]
