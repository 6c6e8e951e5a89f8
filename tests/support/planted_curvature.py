"""A planted model whose targets pass through a normalisation (as LayerNorm does in real models), with
per-token noise: every (source, target) pair has a small consistent effect, the planted ones a large one.

Same layout as `planted_graph`: sites `blocks.0.hook_resid_post` (sources x, D = 24) and
`blocks.1.hook_resid_post` (targets t, D = 24), each read by an identity ReLU SAE; every source fires
(value in [1, 2]) on half of a vocabulary of 256 tokens (`_sources`). The target site is an
RMS-normalised residual stream:

    u = C + x·(W ⊙ (1 + s ξ(tok))) + Σ_gates G (1 + s η(tok)) x_i x_k e_j + σ n(tok)    (the update, D wide)
    v = C + x + σ m(tok)                                                         (the sources' own copy, D wide)
    ρ = sqrt(mean([u, v]²))                                                      (rms over the 2D coordinates)
    t = 3 + C u / ρ

C = 16; W has planted weights ±2.5 (EXCITATORY, INHIBITORY); G = 3 for each AND gate (i, k -> j) in
GATES; ξ, η, n, m are standard normal per token, ξ and η clipped to ±2, s = 0.3, σ = 1: the input noise
that makes every per-input effect differ from input to input. C keeps ρ ≈ C, far from zero, and every
u_j ≥ C − 2.5·1.6·2 − a few σ > 0, so t > 3: no target is ever clipped by the ReLU, and inhibition is
visible with the default read="post".

Why every pair has an effect. To first order in the deviations from C (ρ ≈ C, u ≈ C),

    ∂t_j/∂x_i = C (∂u_j/∂x_i) / ρ − C u_j (∂ρ/∂x_i) / ρ²  ≈  ∂u_j/∂x_i − (1 + Σ_k ∂u_k/∂x_i) / (2D).

The first term is the planted interaction; the second is the normalisation's, about the same for
every target j: source i moves ρ through its own copy in v (the 1) and through what it writes into u.
1 + Σ_k ∂u_k/∂x_i is 1 for the sources without planted edges (17-23), 1 + 2.5 for the excitatory
ones, 1 − 2.5 (1 + 0.3 ξ) ≤ 0 for the inhibitory ones and 1 + G (1 + 0.3 η) x_k ≥ 1 for a gate input,
so every (source, target) pair has an effect of 0.02 to 0.15 in size (1/48 to 7/48) with the same sign
on (nearly) every input. With 64 inputs per source a sign-flip test finds such a pair significant;
the planted effects (2.5, and G·E[x_k | x_i fires] ≈ 3·1.1 for gate inputs) are 20 to 100 times larger,
and τ (the random-direction null, about 1.3 here) lies in between: only τ separates them.
"""
import jax
import jax.numpy as jnp
import numpy as np

import jfig

D = 24
SRC, TGT = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"

C = 16.0                       # offset and gain of the normalised stream
WEIGHT, GATE = 2.5, 3.0        # planted first-order weight (±) and AND-gate strength
NOISE_W, NOISE = 0.3, 1.0      # per-token relative noise on planted weights, additive noise before the norm

EXCITATORY = [(0, 0), (1, 4), (2, 6), (3, 8), (4, 10), (5, 21)]
INHIBITORY = [(6, 1), (7, 3), (8, 12), (9, 14), (10, 23)]
GATES = [(11, 12, 16), (13, 14, 18), (15, 16, 20)]      # (i, k, j): u_j += GATE x_i x_k


def _identity_sae(site):
    eye = jnp.eye(D)
    return jfig.SAE(W_enc=eye, b_enc=jnp.zeros(D), W_dec=eye, b_dec=jnp.zeros(D), threshold=None, site=site,
                    architecture="relu", apply_b_dec_to_input=False)


def _sources(vocab, seed):
    """[vocab, D] source activations: each source fires (value in [1, 2]) on exactly half the tokens. The
    two inputs i, k of a gate fire together on 3/4 of the tokens of each, evenly spread over the other's
    values: ranked by i's value, three tokens in every four on which i fires have k firing too, and
    ranked by k's value, k's tokens go three with i, one without. So on the inputs where either one is
    strongest the other fires 3/4 of the time and a gate input's first-order slope, GATE·E[partner] ≈
    GATE·1.1, stands well above τ, while the random-direction null on a gate target only sees the
    partner's unconditional mean (0.75)."""
    rng = np.random.default_rng(seed)
    half = vocab // 2
    x = np.zeros((vocab, D), np.float32)
    for f in range(D):
        x[rng.permutation(vocab)[:half], f] = rng.uniform(1.0, 2.0, half)
    with_i = np.arange(half) % 4 != 3                              # k's value ranks that go to tokens with i
    for i, k, _ in GATES:
        on_i = np.flatnonzero(x[:, i])
        both = on_i[np.argsort(-x[on_i, i])][with_i]               # 3 in 4 of i's tokens, by i's value
        only_k = rng.permutation(np.flatnonzero(x[:, i] == 0))[: half - len(both)]
        order = np.empty(half, np.int64)                           # k's tokens, by k's value
        order[with_i], order[~with_i] = rng.permutation(both), only_k
        x[:, k] = 0.0
        x[order, k] = np.sort(rng.uniform(1.0, 2.0, half))[::-1]
    return jnp.asarray(x)


def curvature_model(vocab=256, seed=0):
    """(model, saes) of the normalised planted model described in the module docstring."""
    rng = np.random.default_rng(seed + 11)
    W = np.zeros((D, D), np.float32)            # W[i, j]: source i -> target j
    for i, j in EXCITATORY:
        W[i, j] = WEIGHT
    for i, j in INHIBITORY:
        W[i, j] = -WEIGHT
    gi, gk, gj = (np.array(a) for a in zip(*GATES))
    params = {
        "X": _sources(vocab, seed),
        "W": jnp.asarray(W),
        "XiW": jnp.asarray(np.clip(rng.standard_normal((vocab, D, D)), -2, 2), jnp.float32),
        "XiG": jnp.asarray(np.clip(rng.standard_normal((vocab, len(GATES))), -2, 2), jnp.float32),
        "N": jnp.asarray(NOISE * rng.standard_normal((vocab, 2 * D)), jnp.float32),
        "U": jax.random.normal(jax.random.PRNGKey(seed), (D, vocab)),
    }

    def apply(p, tokens, hook):
        x = hook(SRC, p["X"][tokens])                                         # [b, s, D]
        w = p["W"] * (1.0 + NOISE_W * p["XiW"][tokens])                       # [b, s, D, D]
        g = GATE * (1.0 + NOISE_W * p["XiG"][tokens]) * x[..., gi] * x[..., gk]
        noise = p["N"][tokens]
        u = (C + jnp.einsum("bsi,bsij->bsj", x, w) + noise[..., :D]).at[..., gj].add(g)
        v = C + x + noise[..., D:]
        rho = jnp.sqrt(jnp.mean(jnp.concatenate([u, v], -1) ** 2, -1, keepdims=True))
        return hook(TGT, 3.0 + C * u / rho) @ p["U"]

    model = jfig.Model.from_function(apply, params, sites=(SRC, TGT), vocab_size=vocab,
                                     site_widths={SRC: D, TGT: D})
    return model, [_identity_sae(SRC), _identity_sae(TGT)]


def curvature_truth():
    """(first-order {(i, j): kind}, gates {(min(i, k), max(i, k), j)}). A gate's inputs are first-order
    inputs of its target too: their mean slope is GATE·E[partner] > 0."""
    first = {(i, j): "excitatory" for i, j in EXCITATORY}
    first.update({(i, j): "inhibitory" for i, j in INHIBITORY})
    for i, k, j in GATES:
        first[(i, j)] = first[(k, j)] = "excitatory"
    return first, {(min(i, k), max(i, k), j) for i, k, j in GATES}
