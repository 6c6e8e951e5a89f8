"""Hand-built one-layer models for the interaction metrics, and numpy references for their formulas.

The toy MLP: four SAE features at blocks.0.hook_resid_mid with decoder rows d_k = e_{2k} − e_{2k+1}
(zero mean, so LayerNorm's centring leaves them as they are, exactly). Feature k reaches only the
neurons 4k..4k+3 (up and gate), through the two residual coordinates it owns; neurons 16..31 read
only coordinates 8..15, which no feature touches. With `planted=True` neuron 20 also reads features
0 and 1: up weights 2 and 1 per unit of each, gate weights 1.6 and -0.6.
"""
import jax
import jax.numpy as jnp
import numpy as np

import jfig
from jfig.testing import tiny_model

SITE = "blocks.0.hook_resid_mid"
N_FEATURES = 4
PLANTED_NEURON = 20
PLANTED_UP = (2.0, 1.0)        # u_0, u_1 at the planted neuron (d_k · W_up[:, 20])
PLANTED_GATE = (1.6, -0.6)


def directions(d_model: int = 16) -> np.ndarray:
    D = np.zeros((N_FEATURES, d_model), np.float32)
    for k in range(N_FEATURES):
        D[k, 2 * k], D[k, 2 * k + 1] = 1.0, -1.0
    return D


def toy_sae(site: str = SITE, d_model: int = 16) -> jfig.SAE:
    D = directions(d_model)
    return jfig.SAE(W_enc=jnp.asarray(D.T / 2), b_enc=jnp.zeros(N_FEATURES), W_dec=jnp.asarray(D),
                    b_dec=jnp.zeros(d_model), site=site)


def _block_columns(rng, d_mlp: int) -> np.ndarray:
    """[d, d_mlp]: neuron m in 4k..4k+3 reads c_m (x_{2k} − x_{2k+1}); neurons >= 16 read coordinates 8..15."""
    W = np.zeros((16, d_mlp), np.float32)
    for k in range(N_FEATURES):
        for m in range(4 * k, 4 * k + 4):
            c = rng.uniform(0.5, 1.5) * rng.choice([-1, 1])
            W[2 * k, m], W[2 * k + 1, m] = c / 2, -c / 2          # u_k[m] = c
    W[8:, 16:] = rng.normal(0, 0.5, (8, d_mlp - 16))
    return W


def toy_mlp_model(family: str, *, planted: bool = False, seed: int = 0) -> jfig.Model:
    base = tiny_model(family, n_layers=1, seed=seed, scale=0.5)
    cfg = base.config
    rng = np.random.default_rng(seed)
    blocks = {k: np.asarray(v).copy() for k, v in base.params["blocks"].items()}
    blocks["ln2_w"][0] = 1.0 - cfg.norm_offset
    if "ln2_b" in blocks:
        blocks["ln2_b"][0] = rng.normal(0, 0.3, cfg.d_model)
    blocks["W_up"][0] = _block_columns(rng, cfg.d_mlp)
    if "W_gate" in blocks:
        blocks["W_gate"][0] = _block_columns(rng, cfg.d_mlp)
    if "b_up" in blocks:
        blocks["b_up"][0] = rng.normal(0, 0.5, cfg.d_mlp)
    blocks["W_down"][0] = rng.normal(0, 0.5, (cfg.d_mlp, cfg.d_model))
    if planted:
        m = PLANTED_NEURON
        for k, (u, g) in enumerate(zip(PLANTED_UP, PLANTED_GATE)):
            blocks["W_up"][0][2 * k, m], blocks["W_up"][0][2 * k + 1, m] = u / 2, -u / 2
            if "W_gate" in blocks:
                blocks["W_gate"][0][2 * k, m], blocks["W_gate"][0][2 * k + 1, m] = g / 2, -g / 2
    params = dict(base.params, blocks={k: jnp.asarray(v) for k, v in blocks.items()})
    return jfig.Model.from_config(cfg, params)


def toy_tokens(n: int = 24, seq: int = 10, vocab: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (n, seq)).astype(np.int32)


# ---------------------------------------------------------------- numpy references (float64)

def np_act(cfg, x):
    if cfg.act == "silu":
        return x / (1.0 + np.exp(-x))
    assert cfg.act == "gelu_tanh"
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def np_norm_parts(cfg, x):
    """(g [T], P x [T, d]): the norm's per-token scale and the centred (LayerNorm) input."""
    xc = x - x.mean(-1, keepdims=True) if cfg.norm == "layer" else x
    return 1.0 / np.sqrt((xc * xc).mean(-1) + cfg.norm_eps), xc


def np_rope(cfg, q, delta):
    """Rotate q [..., e] by relative position delta, HF rotate-half pairs (k, k + e/2)."""
    e = q.shape[-1]
    inv = cfg.rope_theta ** (-np.arange(0, e, 2) / e)
    ang = delta * inv
    a, b = q[..., : e // 2], q[..., e // 2:]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], axis=-1)


def params64(model, layer: int = 0) -> dict:
    return {k: np.asarray(v[layer], np.float64) for k, v in model.params["blocks"].items()}


def site_acts(model, sae, tokens, site: str):
    """(x [T, d] at `site`, f [T, d_sae] = numpy relu encoder on the SAE's own site), float64."""
    out = model.run(tokens, capture=tuple(dict.fromkeys((sae.site, site))), logits=False)
    a = np.asarray(out.cache[sae.site], np.float64).reshape(-1, sae.d_in)
    f = np.maximum(a @ np.asarray(sae.W_enc, np.float64) + np.asarray(sae.b_enc, np.float64), 0.0)
    return np.asarray(out.cache[site], np.float64).reshape(-1, model.config.d_model), f


def random_sae(key: int, d_in: int, d_sae: int, site: str, bias: float = 0.0) -> jfig.SAE:
    sae = jfig.SAE.init_random(jax.random.key(key), d_in, d_sae, site)
    return jfig.SAE(W_enc=sae.W_enc, b_enc=jnp.full((d_sae,), bias), W_dec=sae.W_dec * 1.5,
                    b_dec=jnp.zeros(d_in), site=site)
