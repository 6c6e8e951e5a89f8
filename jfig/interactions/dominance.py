"""The strict-dominance test of an attention layer, on data: does each head attend as if only the
feature with the strongest query were present at the query position?

At a query position with residual x the features' part of head h's query (before rotary) is
g·Σ_i a_i q_ih (readin.py; attention.py for q_ih); the rest, q_rest, is what the features do not
explain (biases, the SAE's decoder bias and reconstruction error). The test compares the head's
actual attention pattern p with

    p_dom:  the query g·a_s q_sh + q_rest, s the active feature with the largest |a_s|·||q_sh||;
    p_none: the query q_rest alone (no feature at the query position);

keys, masks and soft-caps as in the model. Per head it reports the mean total-variation distance
TV(p, p_dom) = ½ Σ_k |p_k − p_dom,k| over query positions where at least two features fire, the same
for p_none (how much the features move the head at all), and how often the most-attended key is
unchanged under dominance.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..atlas import token_batches
from ..data.progress import progress_iter
from ..errors import JfigError
from ..models.layers import apply_rope, attention_pattern, norm, rope_tables
from ..sites import block_site, site_key
from .attention import head_read_in
from .readin import check_model_sae, decode_scale, feature_directions, layer_params, mm, norm_scale, reading_layer

DOMINANCE_WEIGHTS = ("ln1_w", "ln1_b", "W_q", "W_k", "b_q", "b_k")


@dataclass(frozen=True)
class DominanceTest:
    """Per head [H]: ``tv_dominant`` = mean TV(p, p_dom), ``tv_none`` = mean TV(p, p_none),
    ``same_top_key`` = fraction of queries whose most-attended key is unchanged under dominance; over
    ``n_queries`` query positions with at least two active features."""

    site: str
    layer: int
    n_queries: int
    tv_dominant: np.ndarray
    tv_none: np.ndarray
    same_top_key: np.ndarray

    @property
    def explained(self) -> np.ndarray:
        """[H] 1 − tv_dominant / tv_none: the share of the features' effect on the pattern that the
        strongest feature alone reproduces (1: strict dominance; NaN where the features do not move the head)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.tv_none > 0, 1.0 - self.tv_dominant / self.tv_none, np.nan)


@dataclass(frozen=True)
class DominanceSpec:
    site: str
    pre: str            # blocks.{layer}.hook_resid_pre, the attention's input residual
    stop: str
    layer: int


def batch_sums(spec: DominanceSpec, model, sae, w, q_feat, tokens, valid):
    """Sums over one batch: n [], tv_dom / tv_none / same [H], bad []. q_feat [d_sae, H, e]."""
    cfg = model.config
    out = model.run(tokens, capture=tuple(dict.fromkeys((spec.site, spec.pre))), stop_at=spec.stop, logits=False)
    f, stats = sae.encode_with_stats(out.cache[spec.site])                                 # [b, s, n]
    x = out.cache[spec.pre]
    b, s = tokens.shape
    a = f * (norm_scale(cfg, x) * decode_scale(sae, stats, (b, s)))[..., None]           # g·a_i
    h = norm(cfg, x, w["ln1_w"], w.get("ln1_b"))
    q = (mm(h, w["W_q"]) + w.get("b_q", 0.0)).reshape(b, s, cfg.n_heads, cfg.d_head)
    k = (mm(h, w["W_k"]) + w.get("b_k", 0.0)).reshape(b, s, cfg.n_kv_heads, cfg.d_head)
    feat_x = feature_part(cfg, sae, w, a)
    q_rest = q - (mm(feat_x, w["W_q"])).reshape(q.shape)
    qnorm = jnp.linalg.norm(q_feat, axis=-1)                                               # [n, H]
    top = jax.lax.map(lambda col: jnp.argmax(jnp.abs(a) * col, axis=-1), qnorm.T)          # [H, b, s]
    top = top.transpose(1, 2, 0)                                                           # [b, s, H]
    a_top = jnp.take_along_axis(a, top, axis=-1)                                           # [b, s, H]
    q_top = a_top[..., None] * q_feat[top, jnp.arange(cfg.n_heads)]                        # [b, s, H, e]
    if cfg.positional == "rope":
        cos, sin = rope_tables(cfg, s)
        rot = partial(apply_rope, cos=cos, sin=sin)
    else:
        rot = lambda t: t  # noqa: E731
    sliding = jnp.asarray(cfg.layer_sliding[spec.layer])
    kr = rot(k)
    p, p_dom, p_none = (attention_pattern(cfg, rot(qq), kr, sliding) for qq in (q, q_rest + q_top, q_rest))
    count = ((f > 0).sum(-1) >= 2) & valid                                                 # [b, s]
    wt = count[:, None, :].astype(jnp.float32)                                             # [b, 1, s]
    tv = lambda other: (0.5 * jnp.abs(p - other).sum(-1) * wt).sum((0, 2))  # noqa: E731
    same = (jnp.argmax(p, -1) == jnp.argmax(p_dom, -1)).astype(jnp.float32)
    return dict(n=count.sum(dtype=jnp.int32), tv_dom=tv(p_dom), tv_none=tv(p_none), same=(same * wt).sum((0, 2)),
                bad=jnp.sum(~jnp.isfinite(f) & valid[..., None], dtype=jnp.int32))


def feature_part(cfg, sae, w, a):
    """N(Σ_i a_i d_i) [b, s, d]: the features' part of the normalised input, from a [b, s, d_sae]."""
    v = mm(a, feature_directions(sae))
    if cfg.norm == "layer":
        v = v - jnp.mean(v, axis=-1, keepdims=True)
    return v * (cfg.norm_offset + w["ln1_w"])


@partial(jax.jit, static_argnums=0, donate_argnums=1)
def _step(spec, state, model, sae, w, q_feat, tokens, valid):
    sums = batch_sums(spec, model, sae, w, q_feat, tokens, valid)
    return {k: state[k] + v for k, v in sums.items()}


def dominance_test(model, sae, tokens, *, layer: int | None = None, batch_size: int = 8,
                   skip_positions: int = 0, progress: bool = False) -> DominanceTest:
    """Run the strict-dominance test of the attention that first reads `sae.site` (or `layer`) over
    `tokens` ([n_seq, seq] ints), one jitted step per batch. Cost: a forward pass to the layer plus
    three attention patterns and O(tokens·d_sae·H) for the strongest feature per head.

    >>> test = dominance_test(model, sae, tokens)
    >>> test.tv_dominant.shape, test.explained.shape           # [heads]
    ((4,), (4,))
    """
    cfg = check_model_sae(model, sae, "dominance_test")
    layer = reading_layer(sae.site, cfg.n_layers, "attn", layer)
    w = layer_params(model, layer, DOMINANCE_WEIGHTS)
    q_feat, _ = head_read_in(cfg, w, feature_directions(sae))
    pre = block_site(layer, "hook_resid_pre")
    spec = DominanceSpec(site=sae.site, pre=pre, stop=max(sae.site, pre, key=site_key), layer=layer)
    H = cfg.n_heads
    state = dict(n=jnp.zeros((), jnp.int32), tv_dom=jnp.zeros((H,)), tv_none=jnp.zeros((H,)), same=jnp.zeros((H,)),
                 bad=jnp.zeros((), jnp.int32))
    for toks, rows in progress_iter(list(token_batches(tokens, batch_size, model.vocab_size)),
                                    desc="dominance test", unit="batch", enabled=progress):
        valid = np.zeros(toks.shape, bool)
        valid[:rows, skip_positions:] = True
        state = _step(spec, state, model, sae, w, q_feat, jnp.asarray(toks), jnp.asarray(valid))
    st = {k: np.asarray(v) for k, v in jax.device_get(state).items()}
    if st["bad"]:
        raise JfigError(f"the SAE at {sae.site} gave {int(st['bad'])} NaN or infinite activation(s) on these tokens")
    n = int(st["n"])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = lambda x: x / n if n else np.full(H, np.nan)  # noqa: E731
        return DominanceTest(site=sae.site, layer=layer, n_queries=n, tv_dominant=mean(st["tv_dom"]),
                             tv_none=mean(st["tv_none"]), same_top_key=mean(st["same"]))
