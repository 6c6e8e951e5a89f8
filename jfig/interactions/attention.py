"""Query-key interaction terms of feature pairs at an attention layer, from the weights alone.

Per unit of activation and at unit norm scale (readin.py), a feature i at the query position gives
head h the query q_ih = N(d_i) @ W_q[h], a feature j at the key position the key k_jh = N(d_j) @ W_k[h]
(the key/value head that h reads). With rotary embeddings a score depends on the relative position
Δ = query position − key position only, through the rotation R_Δ. The QK term is

    A_h(i, j; Δ) = c · (R_Δ q_ih) · k_jh                   (c: the model's query scale)

the seed-free form of (W_dec f_i) Q Kᵀ (W_dec f_j)ᵀ, biases left out. A token whose norm scale is g
scales a feature's query or key by g·a (its activation), so the score of a real pair is
g_q a_i · g_k a_j · A. The interaction term removes from A its mean over query features (a shift the
softmax ignores), its mean over key features (the key's salience to an average query, a main
effect) and adds back the grand mean: what is specific to the pair. Means are weighted by `weights`
(e.g. firing rates), uniform over all SAE features by default. Gemma-2's soft-cap acts on the total
score and is not applied to these terms.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from ..errors import JfigError, ShapeError
from ..models.layers import apply_rope, rope_at
from ..models.validation import check_features
from .readin import check_finite, check_model_sae, feature_directions, layer_params, mm, norm_map, reading_layer

ATTN_WEIGHTS = ("ln1_w", "W_q", "W_k")


@dataclass(frozen=True)
class QKTerms:
    """QK terms at `layer`: ``score`` and ``interaction`` [R, H, n_q, n_k] for query features ``queries``
    [n_q], key features ``keys`` [n_k] and relative positions ``offsets`` [R] (query − key)."""

    site: str
    layer: int
    queries: np.ndarray
    keys: np.ndarray
    offsets: np.ndarray
    score: np.ndarray
    interaction: np.ndarray


@dataclass(frozen=True)
class QueryOverlap:
    """``overlap`` [R, H, n, n]: cosine between query features' interaction rows over all key features
    (weighted), per relative position ``offsets`` [R] and head."""

    site: str
    layer: int
    queries: np.ndarray
    offsets: np.ndarray
    overlap: np.ndarray


def check_offsets(offsets, cfg) -> np.ndarray:
    """Relative positions as int64 [R], each in (-max_seq_len, max_seq_len)."""
    arr = np.atleast_1d(np.asarray(offsets))
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ShapeError(f"offsets must be an int or a 1-d int array (query position - key position), got {offsets!r}")
    if np.abs(arr).max() >= cfg.max_seq_len:
        raise JfigError(f"offset {int(np.abs(arr).max())} is beyond the model's {cfg.max_seq_len} positions")
    return arr.astype(np.int64)


def check_weights(weights, d_sae: int, site: str):
    """Feature weights as float32 [d_sae] summing to 1 (uniform when None)."""
    if weights is None:
        return jnp.full((d_sae,), 1.0 / d_sae, jnp.float32)
    w = np.asarray(weights, np.float64)
    if w.shape != (d_sae,):
        raise ShapeError(f"weights for the SAE at {site} must have shape [{d_sae}], got {tuple(w.shape)}")
    check_finite(f"weights for the SAE at {site}", w)
    if (w < 0).any() or w.sum() <= 0:
        raise JfigError(f"weights for the SAE at {site} must be >= 0 with a positive sum")
    return jnp.asarray(w / w.sum(), jnp.float32)


def head_read_in(cfg, w: dict, directions):
    """(q [n, H, e], k [n, H, e]): the query and key per head of residual directions [n, d] at unit norm
    scale (keys repeated over the query heads that share a key/value head). `w` holds ln1_w, W_q, W_k."""
    x = norm_map(cfg, directions, w["ln1_w"])                                               # [n, d]
    q = mm(x, w["W_q"]).reshape(-1, cfg.n_heads, cfg.d_head)
    k = mm(x, w["W_k"]).reshape(-1, cfg.n_kv_heads, cfg.d_head)
    return q, jnp.repeat(k, cfg.n_heads // cfg.n_kv_heads, axis=1)


def rotate(cfg, q, offsets):
    """[R, n, H, e]: queries q [n, H, e] rotated by R_Δ for each offset Δ (unchanged without rotary)."""
    q = jnp.broadcast_to(q[:, None], (q.shape[0], len(offsets)) + q.shape[1:])               # [n, R, H, e]
    if cfg.positional == "rope":
        cos, sin = rope_at(cfg, jnp.asarray(offsets))
        q = apply_rope(q, cos, sin)
    return q.transpose(1, 0, 2, 3)


def _setup(model, sae, what, layer, offsets, weights):
    cfg = check_model_sae(model, sae, what)
    layer = reading_layer(sae.site, cfg.n_layers, "attn", layer)
    return (cfg, layer, check_offsets(offsets, cfg), check_weights(weights, sae.d_sae, sae.site),
            layer_params(model, layer, ATTN_WEIGHTS))


def qk_terms(model, sae, queries, keys=None, *, layer: int | None = None, offsets=0, weights=None) -> QKTerms:
    """QK terms A_h(i, j; Δ) and their interaction part for query features `queries` and key features
    `keys` (default: the same) of `sae`, at the first attention that reads `sae.site` (or `layer`).

    Cost: O((n_q + n_k + d_sae)·d·H·e) for the read-ins and means, O(R·H·n_q·n_k·e) for the terms.

    >>> terms = qk_terms(jfig.testing.tiny_model("llama"), sae, [0, 1, 2], offsets=[0, 4])
    >>> terms.score.shape      # [offsets, heads, queries, keys]
    (2, 4, 3, 3)
    """
    cfg, layer, offsets, w, attn = _setup(model, sae, "qk_terms", layer, offsets, weights)
    queries = check_features(queries, sae.d_sae, sae.site)
    keys = queries if keys is None else check_features(keys, sae.d_sae, sae.site)
    if not len(queries) or not len(keys):
        raise ShapeError("qk_terms needs at least one query and one key feature")
    q, _ = head_read_in(cfg, attn, feature_directions(sae, queries))
    _, k = head_read_in(cfg, attn, feature_directions(sae, keys))
    q_bar, k_bar = head_read_in(cfg, attn, mm(w, feature_directions(sae))[None])         # means are linear
    score = cfg.q_scale * jnp.einsum("rahe,bhe->rhab", rotate(cfg, q, offsets), k, precision="highest")
    inter = cfg.q_scale * jnp.einsum("rahe,bhe->rhab", rotate(cfg, q - q_bar[0], offsets), k - k_bar[0],
                                     precision="highest")
    return QKTerms(site=sae.site, layer=layer, queries=queries, keys=keys, offsets=offsets,
                   score=np.asarray(score), interaction=np.asarray(inter))


def query_overlap(model, sae, queries, *, layer: int | None = None, offsets=0, weights=None) -> QueryOverlap:
    """How much query features interact with the same keys: for query features a, b and head h, the
    cosine between their interaction rows over every key feature k (weighted by `weights`),

        overlap_h(a, b) = Σ_k w_k I_h(a, k) I_h(b, k) / (||I_h(a, ·)|| ||I_h(b, ·)||),

    computed in closed form as (R_Δ q̃_a)ᵀ C_h (R_Δ q̃_b) / norms, with q̃ the centred queries and
    C_h = Σ_k w_k k̃_k k̃_kᵀ [e, e] the weighted covariance of the centred keys. 0 where a row is 0.
    Cost: O(d_sae·d·H·e + R·H·n²·e).
    """
    cfg, layer, offsets, w, attn = _setup(model, sae, "query_overlap", layer, offsets, weights)
    queries = check_features(queries, sae.d_sae, sae.site)
    if not len(queries):
        raise ShapeError("query_overlap needs at least one query feature")
    q_all, k_all = head_read_in(cfg, attn, feature_directions(sae))                         # [d_sae, H, e]
    q_bar, k_bar = (jnp.einsum("n,nhe->he", w, a, precision="highest") for a in (q_all, k_all))
    kc = k_all - k_bar
    cov = jnp.einsum("n,nhe,nhf->hef", w, kc, kc, precision="highest")                     # [H, e, e]
    qr = rotate(cfg, q_all[jnp.asarray(queries)] - q_bar, offsets)                           # [R, n, H, e]
    gram = jnp.einsum("rahe,hef,rbhf->rhab", qr, cov, qr, precision="highest")
    diag = jnp.sqrt(jnp.maximum(jnp.einsum("rhaa->rha", gram), 0.0))
    den = diag[..., :, None] * diag[..., None, :]
    overlap = jnp.where(den > 0, gram / jnp.where(den > 0, den, 1.0), 0.0)
    return QueryOverlap(site=sae.site, layer=layer, queries=queries, offsets=offsets, overlap=np.asarray(overlap))
