"""The clean prefix a sweep starts from: source-site activations, the residual a suffix from there
needs, the sources' values, and (position-sparse sweeps) the clean keys/values of every layer.

`prefix_pass` runs it for one source site, or reads it from a `CleanPrefix`: one clean run of a
token array through every layer that captures every source site at once, so a build measuring many
blocks of sources at several sites runs the model's prefix once instead of once per block and site.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from ..errors import JfigError, ShapeError
from ..models.forward import KVCache
from ..models.model import Prefix, resid_site_for
from .sources import value_site


@dataclass
class CleanPrefix:
    """The clean run of tokens [N, S]: prefixes {site: Prefix} (activations [N, S, ...] and the residual
    a suffix from there needs) and kv, the keys/values of every layer (KVCache, [L, N, S, g, e])."""

    shape: tuple[int, int]
    prefixes: dict[str, Prefix]
    kv: KVCache

    @property
    def nbytes(self) -> int:
        arrays = [self.kv.k, self.kv.v] + [a for p in self.prefixes.values() for a in (p.acts, p.resid)
                                           if a is not None]
        return int(sum(a.size * a.dtype.itemsize for a in arrays))


def clean_prefix_bytes(config, n: int, seq: int, widths) -> int:
    """Bytes of a CleanPrefix of n sequences of seq tokens of a model of `config` at sites of `widths`
    (the residual of a non-residual site counted as one more d_model)."""
    kv = 2 * config.n_layers * config.n_kv_heads * config.d_head
    return int(4 * n * seq * (kv + sum(int(w) + config.d_model for w in widths)))


def clean_prefix(model, tokens, sites, batch_size: int = 16) -> CleanPrefix:
    """One clean run of tokens [N, S] (in batches) through every layer of a built-in model, capturing
    `sites` and every layer's keys/values."""
    tokens = model.check_tokens(tokens)
    parts, kvs = [], []
    for b in range(0, tokens.shape[0], batch_size):
        pre, kv = model.clean_prefixes(tokens[b: b + batch_size], sites)
        parts.append(pre)
        kvs.append(kv)
    prefixes = {}
    for s in parts[0]:
        resid = None if parts[0][s].resid is None else jnp.concatenate([p[s].resid for p in parts])
        prefixes[s] = Prefix(s, jnp.concatenate([p[s].acts for p in parts]), resid)
    kv = KVCache(jnp.concatenate([c.k for c in kvs], axis=1), jnp.concatenate([c.v for c in kvs], axis=1))
    return CleanPrefix(tuple(tokens.shape), prefixes, kv)


def prefix_pass(model, src_sae, feats, tokens, batch_size: int, builtin: bool, cache: bool = False,
                clean: CleanPrefix | None = None):
    """Source-site activations [N, S, d], the residual a suffix needs, the sources' values [N, S, n] and,
    with `cache`, the clean keys/values of every layer and position (KVCache, [L, N, S, g, e] each;
    else None). With `clean` (a CleanPrefix of these tokens that has the sites) nothing but the
    encoding runs. A transcoder source (`sources.TranscoderSource`) starts at its output site and
    reads its values at its input site."""
    cols = jnp.asarray(feats)
    site, vsite = src_sae.site, value_site(src_sae)
    if clean is not None and site in clean.prefixes and vsite in clean.prefixes:
        if tuple(tokens.shape) != clean.shape:
            raise JfigError(f"the clean prefix was run on tokens of shape {clean.shape}, these are {tuple(tokens.shape)}")
        pre, src = clean.prefixes[site], clean.prefixes[vsite].acts
        vals = jnp.concatenate([jnp.take(src_sae.encode(src[b: b + batch_size]), cols, axis=-1)
                                for b in range(0, tokens.shape[0], batch_size)])
        return pre.acts, pre.resid, vals, clean.kv if cache else None
    acts, resids, vals, kvs = [], [], [], []
    for b in range(0, tokens.shape[0], batch_size):
        tb = tokens[b: b + batch_size]
        if builtin:
            pre = model.prefix(tb, site, cache=cache)
            a, r = pre.acts, pre.resid
            kvs.append(pre.cache)
            v = a if vsite == site else values_input(model, tb, pre, vsite)
        else:
            out = model.run(tb, capture=tuple(dict.fromkeys((site, vsite))), stop_at=site).cache
            a, r, v = out[site], None, out[vsite]
        if not bool(jnp.isfinite(a).all()) or not bool(jnp.isfinite(v).all()):
            raise ShapeError(f"activations at {site if vsite == site else (vsite + ' / ' + site)} contain NaN or "
                             f"inf (input rows {b}..{b + len(tb) - 1})")
        acts.append(a)
        resids.append(r)
        vals.append(jnp.take(src_sae.encode(v), cols, axis=-1))
    resid = None if resids[0] is None else jnp.concatenate(resids)
    kv = None
    if cache and builtin:
        kv = KVCache(jnp.concatenate([c.k for c in kvs], axis=1), jnp.concatenate([c.v for c in kvs], axis=1))
    return jnp.concatenate(acts), resid, jnp.concatenate(vals), kv


def values_input(model, tokens, pre, vsite: str):
    """Activations at `vsite` (a transcoder's input site, before the prefix's site): the prefix's own
    residual when that is the site (hook_resid_mid for a transcoder writing hook_mlp_out), else a run."""
    if pre.resid is not None and resid_site_for(pre.site) == vsite:
        return pre.resid
    return model.run(tokens, capture=(vsite,), stop_at=vsite, logits=False).cache[vsite]


def activation_sd(model, sae, features, tokens, *, read: str = "post", batch_size: int = 16,
                  clean: CleanPrefix | None = None) -> np.ndarray:
    """Standard deviation [n] of each of `features` of `sae` over every token of tokens [N, S]: of its
    activation (read="post") or its encoder pre-activation ("pre"), the quantity a measurement reads.
    Effects divided by it are in units of the feature's natural spread."""
    cols = jnp.asarray(features, jnp.int32)
    if clean is not None and sae.site in clean.prefixes:       # read, not run again (and not encoded twice)
        acts = clean.prefixes[sae.site].acts
    else:
        acts = prefix_pass(model, sae, cols, tokens, batch_size, model.apply_fn is None)[0]
    n, s1, s2 = 0, 0.0, 0.0
    for b in range(0, acts.shape[0], batch_size):
        pre = sae.pre_activations(acts[b: b + batch_size])
        v = np.asarray(jnp.take(pre if read == "pre" else sae.activation(pre), cols, axis=-1), np.float64)
        v = v.reshape(-1, v.shape[-1])
        n, s1, s2 = n + v.shape[0], s1 + v.sum(0), s2 + (v * v).sum(0)
    mean = s1 / n
    return np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))
