"""A planted model with known excitatory, inhibitory and AND-gated feature pairs.

Residual width 10, two sites. Source SAE and target SAE are identity ReLU dictionaries, so
feature i is coordinate i. Planted (target <- sources):
  t0 = 2·s0                 excitatory, slope 2
  t1 = 5 − 1.5·s1           inhibitory, slope −1.5
  t2 = s2·s3                AND gate: ∂²t2/∂s2∂s3 = 1
  t3 = 1 + tanh(s4)         smooth excitatory (Jacobian = 1 − tanh² s4)
  t4..t9 = 1                no dependence on anything
Every source coordinate but s3 is constant across positions and inputs (SOURCE_VALUE), so a
clamp around the natural value probes the operating point exactly; s3 fires (1.2) on even
tokens only, so the gate's conditional statistic G_3 = |I(2→2 | s3 on) − I(2→2 | s3 off)| = 1.2.
"""
import jax
import jax.numpy as jnp
import numpy as np

import jfig

D = 10
SOURCE_VALUE = np.array([1.0, 1.0, 0.8, 1.2, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0], np.float32)


def apply(params, tokens, hook):
    b, s = tokens.shape
    x0 = jnp.broadcast_to(params["src"], (b, s, D)) + 0.0 * params["E"][tokens]
    x0 = x0.at[..., 3].multiply((tokens % 2 == 0).astype(jnp.float32))   # s3 fires on even tokens only
    x0 = hook("resid0", x0)
    t = jnp.ones((b, s, D))
    t = t.at[..., 0].set(2 * x0[..., 0])
    t = t.at[..., 1].set(5 - 1.5 * x0[..., 1])
    t = t.at[..., 2].set(x0[..., 2] * x0[..., 3])
    t = t.at[..., 3].set(1 + jnp.tanh(x0[..., 4]))
    x1 = hook("resid1", t)
    return x1 @ params["E"].T


def planted():
    params = {"src": jnp.asarray(SOURCE_VALUE), "E": jax.random.normal(jax.random.PRNGKey(0), (20, D))}
    model = jfig.Model.from_function(apply, params, sites=("resid0", "resid1"), vocab_size=20,
                                     site_widths={"resid0": D, "resid1": D})
    eye = jnp.eye(D)
    mk = lambda site: jfig.SAE(W_enc=eye, b_enc=jnp.zeros(D), W_dec=eye, b_dec=jnp.zeros(D), threshold=None,  # noqa: E731
                               site=site, architecture="relu", apply_b_dec_to_input=False)
    return model, mk("resid0"), mk("resid1")


# Rows alternate between all-even tokens (s3 on everywhere) and all-odd tokens (s3 off).
TOKENS = jnp.asarray(2 * np.random.default_rng(0).integers(0, 10, size=(8, 4)) + (np.arange(8) % 2)[:, None])
