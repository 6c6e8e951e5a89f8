"""A planted model with a known behaviour circuit, built with Model.from_function.

Two sites read by identity ReLU SAEs over D features. Prompts are [BOS, content..., CUE]; the
metric is logit(ANSWER) − logit(DISTRACTOR) at the last token.

- Site 0: a cue feature pair (0, 1) fires only on the CUE token (values 1.5 and 1.0); features
  2..D-1 fire on content tokens at random (values in [0.5, 1.5], about half the vocabulary each).
- Site 1: feature 0 = 0.8·(x0 + x1) (the circuit's relay), features j >= 2 copy x_j, plus a small
  term not aligned with any feature (0.05·x2 added to relay feature 0 would couple them; instead a
  0.1·x3·x4 product feeds feature 5: an interaction outside the circuit).
- Logits: every site-1 feature writes to the vocabulary, but only relay feature 0 writes more to
  ANSWER than to DISTRACTOR (by 2.0); the other features write the same amount to both, so they
  move every logit but not the metric.

The circuit is {site0#0, site0#1, site1#0}; the graph built by `circuit_graph` holds its edges and
the copy edges j -> j (j >= 2), so a k-hop walk from the circuit stays inside it.
"""
import jax
import jax.numpy as jnp
import numpy as np

import jfig
from jfig.behaviors import SuiteTokens
from tests.support.graphs import graph_from_edges

D = 12
V = 16
BOS, CUE, ANSWER, DISTRACTOR = 0, 1, 14, 15
S0, S1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
CIRCUIT = [(S0, 0), (S0, 1), (S1, 0)]


def _identity_sae(site):
    eye = jnp.eye(D)
    return jfig.SAE(W_enc=eye, b_enc=jnp.zeros(D), W_dec=eye, b_dec=jnp.zeros(D), threshold=None, site=site,
                    architecture="relu", apply_b_dec_to_input=False)


def circuit_model(seed: int = 0):
    rng = np.random.default_rng(seed)
    X = np.where(rng.random((V, D)) < 0.5, rng.uniform(0.5, 1.5, (V, D)), 0.0)
    X[:, :2] = 0.0
    X[CUE] = 0.0
    X[CUE, 0], X[CUE, 1] = 1.5, 1.0
    X[BOS] = 0.0
    U = rng.normal(size=(D, V))
    U[:, DISTRACTOR] = U[:, ANSWER]
    U[0, ANSWER] = U[0, DISTRACTOR] + 2.0
    params = {"X": jnp.asarray(X, jnp.float32), "U": jnp.asarray(U, jnp.float32)}

    def apply(p, tokens, hook):
        x = hook(S0, p["X"][tokens])
        t = x.at[..., 0].set(0.8 * (x[..., 0] + x[..., 1])).at[..., 1].set(0.0)
        t = t.at[..., 5].add(0.1 * x[..., 3] * x[..., 4])
        return hook(S1, t) @ p["U"]

    model = jfig.Model.from_function(apply, params, sites=(S0, S1), vocab_size=V, site_widths={S0: D, S1: D})
    return model, [_identity_sae(S0), _identity_sae(S1)]


def circuit_prompts(n: int = 16, width: int = 6, seed: int = 0) -> SuiteTokens:
    """n prompts [BOS, content x (width-2), CUE]; ragged lengths via right padding with BOS."""
    rng = np.random.default_rng(seed)
    tokens = np.full((n, width), BOS, np.int32)
    last = rng.integers(3, width, n)
    for r in range(n):
        tokens[r, 1:last[r]] = rng.integers(2, ANSWER, last[r] - 1)
        tokens[r, last[r]] = CUE
    return SuiteTokens(tokens, last, np.full(n, ANSWER, np.int32), np.full(n, DISTRACTOR, np.int32), None, None,
                       np.zeros(n, bool))


def circuit_graph():
    """The planted circuit's edges plus the copy edges j -> j; features 0..D-1 of both sites are nodes."""
    src = [0, 1] + list(range(2, D))
    tgt = [0, 0] + list(range(2, D))
    w = [0.8, 0.8] + [1.0] * (D - 2)
    return graph_from_edges([S0, S1], [0] * len(src), src, [1] * len(tgt), tgt, [1] * len(src), w, n_features=D,
                            firing_rate=np.r_[np.full(D, 0.05), np.full(D, 0.05)])
