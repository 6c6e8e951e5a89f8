"""Causal effects between a crosscoder's features: each source clamped at its home layer, every target
read through the whole crosscoder encoder.

A crosscoder feature i (``jfig.saes.Crosscoder``) is clamped where its decoder row is largest, its home
site h: x'_h = x_h + (α − f_i)·W_dec[i, h] at the source's strongest position p, and the model carries
the change forward. A target j is read at p from every layer the crosscoder reads, as the crosscoder
itself reads it: the clean activations at layers before h, the edited ones from h on. Only targets
whose home layer comes after the source's are measured (as a per-layer SAE graph measures later sites
only); other entries have n = 0.

The run is position-sparse (the clamped token alone runs from h on, attending to the clean
keys/values of earlier positions: the full run's numbers at p, since causal attention leaves earlier
positions unchanged), vmapped over a chunk of sources and their inputs inside one jit. Methods, with
the same sign and unit as ``measure_effects``: clamp (finite difference between α_lo and α_hi),
ablate ((clean − ablated) / f_i) and jacobian (forward-mode jvp at the clean point).
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..data.progress import progress_bar
from ..errors import JfigError, ShapeError
from ..models.forward import KVCache
from ..models.model import Prefix
from ..saes.crosscoder import Crosscoder
from .api import clamp_levels
from .engine import MIN_SOURCE_CHANGE, READS, random_direction, weighted_stats
from .prefix import CleanPrefix, clean_prefix
from .select import choose_inputs
from .types import Effects, FeatureList, store_stats

CROSSCODER_METHODS = ("clamp", "ablate", "jacobian")


def check_crosscoder(model, crosscoder) -> None:
    """A built-in model and a crosscoder whose sites it has, each as wide as the crosscoder's rows."""
    if not isinstance(crosscoder, Crosscoder):
        raise JfigError(f"expected a jfig.saes.Crosscoder, got {type(crosscoder).__name__}")
    if getattr(model, "config", None) is None or getattr(model, "apply_fn", None) is not None:
        raise JfigError("crosscoder effects run position-sparse suffixes: they need a built-in model (GPT-2, "
                        "Llama, Gemma-2), not one wrapped with Model.from_function")
    for s in crosscoder.sites:
        model.check_site(s)
        if model.site_width(s) != crosscoder.d_model:
            raise ShapeError(f"the crosscoder reads width {crosscoder.d_model} at {s}, which is "
                             f"{model.site_width(s)} wide")
    if not bool(jnp.isfinite(crosscoder.sae.W_dec).all()) or not bool(jnp.isfinite(crosscoder.sae.W_enc).all()):
        raise JfigError("the crosscoder's weights contain NaN or inf values")


def feature_ids(features, d_sae: int, what: str) -> np.ndarray:
    """int [n] feature ids, each in [0, d_sae), no repeats; JfigError otherwise."""
    ids = np.atleast_1d(np.asarray(features))
    if ids.size == 0:
        raise JfigError(f"no {what} features given")
    if not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 1:
        raise JfigError(f"{what} must be a list of int feature ids, got {np.asarray(features).dtype} "
                        f"of shape {np.shape(features)}")
    bad = ids[(ids < 0) | (ids >= d_sae)]
    if bad.size:
        raise JfigError(f"{what} feature {int(bad[0])} is out of range: the crosscoder has {d_sae} features")
    if len(np.unique(ids)) != len(ids):
        raise JfigError(f"{what} features repeat; give each once")
    return ids.astype(np.int64)


def stacked_values(crosscoder: Crosscoder, clean: CleanPrefix, cols, read: str, batch_size: int) -> jax.Array:
    """[N, S, n]: features ``cols`` of the crosscoder on every clean token (activation, or the encoder's
    pre-activation with read="pre")."""
    cols = jnp.asarray(cols, jnp.int32)
    acts = [clean.prefixes[s].acts for s in crosscoder.sites]
    out = []
    for b in range(0, acts[0].shape[0], batch_size):
        pre = crosscoder.pre_activations(jnp.stack([a[b: b + batch_size] for a in acts], axis=-2))
        out.append(jnp.take(pre if read == "pre" else crosscoder.activation(pre), cols, axis=-1))
    return jnp.concatenate(out)


@eqx.filter_jit
def crosscoder_chunk(model, crosscoder: Crosscoder, home: int, method: str, read: str, direction: str, tcols,
                     stacked, kv_all, vals, idx, weight, cols, feats, alpha_lo, alpha_hi, seed):
    """A chunk of C sources at home layer ``home``: (n [C], mean [C, T], m2 [C, T], per-input [C, M, T],
    weights [C, M]). ``stacked [L, N, S, d]`` the clean activations at the crosscoder's sites, ``kv_all``
    the clean keys/values, ``vals [N, S, n_src]`` the sources' clean values; idx/weight [C, M] each
    source's inputs; cols [C] its column of vals; feats [C] its feature id."""
    sites = crosscoder.sites
    site_h, later = sites[home], sites[home + 1:]

    def one(i, w, col, feat, lo, hi):
        fi = vals[i, :, col]                                   # [M, S]
        p = jnp.argmax(fi, axis=-1)                            # the source's strongest position
        rows = jnp.arange(i.shape[0])
        f_p = fi[rows, p]                                      # [M]
        xs = stacked[:, i[:, None], p[:, None]][:, :, 0]       # [L, M, d] clean, at p
        acts = xs[home][:, None]                               # [M, 1, d]
        kv = KVCache(kv_all.k[:, i], kv_all.v[:, i])
        d = jnp.broadcast_to(jnp.take(crosscoder.W_dec[:, home], feat, axis=0), acts.shape)
        if direction == "random":
            d = random_direction(d, feat, seed)

        def values(coef):                                      # coef [M]: the source's change
            edited = acts + coef[:, None, None] * d
            out = model.run_suffix(Prefix(site_h, edited, None, kv), capture=later, stop_at=sites[-1],
                                   positions=p[:, None]).cache
            layers = [xs[l] for l in range(home)] + [edited[:, 0]] + [out[s][:, 0] for s in later]
            pre = crosscoder.pre_activations(jnp.stack(layers, axis=-2))          # [M, n]
            v = pre if read == "pre" else crosscoder.activation(pre)
            return jnp.take(v, tcols, axis=-1)

        valid = (f_p > MIN_SOURCE_CHANGE).astype(jnp.float32)
        if method == "jacobian":
            _, e = jax.jvp(values, (jnp.zeros_like(f_p),), (jnp.ones_like(f_p),))
        elif method == "clamp":
            v = jax.vmap(values)(jnp.stack([hi - f_p, lo - f_p]))
            e = (v[0] - v[1]) / (hi - lo)
        else:                                                  # ablate: (clean − ablated) / f_i
            v = jax.vmap(values)(jnp.stack([jnp.zeros_like(f_p), -f_p]))
            e = (v[0] - v[1]) / jnp.where(valid > 0, f_p, 1.0)[:, None]
        wv = w * valid
        n, mean, m2 = weighted_stats(e, wv)
        return n, mean, m2, e, wv

    return jax.vmap(one)(idx, weight, cols, feats, alpha_lo, alpha_hi)


def crosscoder_effects(model, crosscoder: Crosscoder, tokens, sources, *, targets=None, method: str = "clamp",
                       read: str = "post", inputs_per_source: int = 16, alphas=None, direction: str = "decoder",
                       batch_size: int = 16, chunk_size: int = 4, seed: int = 0, clean: CleanPrefix | None = None,
                       progress: bool = True) -> Effects:
    """Effects of crosscoder features ``sources`` (ids) on ``targets`` (ids; default every feature),
    averaged over inputs (module docstring). ``method``: "clamp", "ablate" or "jacobian"; ``read``:
    "post" (the target's activation) or "pre" (its encoder pre-activation); ``direction``: "decoder"
    or "random" (a random direction with the decoder row's norm: the null control). Each source is
    measured on up to ``inputs_per_source`` sequences of ``tokens [N, S]`` where it fires above its
    median, at its strongest position; α levels default to its 10th / 90th percentiles of non-zero
    activations. The result's sources and targets are (home site, feature id) pairs; entries whose
    target's home layer is not after the source's have n = 0 and mean NaN. Keeps per-input effects.
    """
    if method not in CROSSCODER_METHODS:
        raise JfigError(f"unknown method {method!r}; expected one of {CROSSCODER_METHODS}")
    if read not in READS:
        raise JfigError(f"unknown read {read!r}; expected one of {READS}")
    if direction not in ("decoder", "random"):
        raise JfigError(f"unknown direction {direction!r}; expected 'decoder' or 'random'")
    for name, v in (("inputs_per_source", inputs_per_source), ("batch_size", batch_size), ("chunk_size", chunk_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise JfigError(f"{name} must be a positive int, got {v!r}")
    check_crosscoder(model, crosscoder)
    src = feature_ids(sources, crosscoder.d_sae, "source")
    tgt = feature_ids(np.arange(crosscoder.d_sae) if targets is None else targets, crosscoder.d_sae, "target")
    tokens = model.check_tokens(tokens)
    if clean is None:
        clean = clean_prefix(model, tokens, crosscoder.sites, batch_size)
    elif tuple(tokens.shape) != clean.shape or any(s not in clean.prefixes for s in crosscoder.sites):
        raise JfigError(f"the clean prefix was run on tokens of shape {clean.shape} at {sorted(clean.prefixes)}; "
                        f"these tokens are {tuple(tokens.shape)} and the crosscoder reads {list(crosscoder.sites)}")
    homes = crosscoder.home_layers()
    stacked = jnp.stack([clean.prefixes[s].acts for s in crosscoder.sites])        # [L, N, S, d]
    vals = stacked_values(crosscoder, clean, src, "post", batch_size)             # [N, S, n_src]
    if not bool(jnp.isfinite(vals).all()):
        raise JfigError("the crosscoder's activations on these tokens contain NaN or inf values")
    vals_np = np.asarray(vals)
    lo, hi, med = clamp_levels("clamp" if method == "jacobian" else method, vals_np, alphas, None)
    idx, wgt = choose_inputs(vals_np.max(axis=1), med, inputs_per_source, seed)
    M = inputs_per_source
    mean = np.full((len(src), len(tgt)), np.nan, np.float32)
    var, count = np.full_like(mean, np.nan), np.zeros_like(mean)
    per_input = np.zeros((len(src), M, len(tgt)), np.float32)
    in_w = np.zeros((len(src), M), np.float32)
    bar = progress_bar(len(src), desc=f"crosscoder {method}", unit="src", enabled=progress)
    for h in sorted(set(homes[src].tolist())):
        rows = np.flatnonzero(homes[src] == h)
        tcols_idx = np.flatnonzero(homes[tgt] > h)
        if len(tcols_idx) == 0:
            bar.update(len(rows))
            continue
        tcols = jnp.asarray(tgt[tcols_idx], jnp.int32)
        c = min(chunk_size, len(rows))
        for start in range(0, len(rows), c):
            sl = np.arange(start, min(start + c, len(rows)))
            pad = np.concatenate([sl, np.full(c - len(sl), sl[-1])])           # fixed chunk shape
            r = rows[pad]
            wpad = wgt[r] * (np.arange(c) < len(sl))[:, None]
            n, mu, m2, e, wv = crosscoder_chunk(
                model, crosscoder, int(h), method, read, direction, tcols, stacked, clean.kv, vals,
                jnp.asarray(idx[r]), jnp.asarray(wpad), jnp.asarray(r, jnp.int32), jnp.asarray(src[r], jnp.int32),
                jnp.asarray(lo[r]), jnp.asarray(hi[r]), jnp.asarray(seed, jnp.int32))
            k = len(sl)
            real = rows[sl]
            store_stats(mean, var, count, real, tcols_idx, np.asarray(n)[:k], np.asarray(mu)[:k], np.asarray(m2)[:k])
            per_input[np.ix_(real, np.arange(M), tcols_idx)] = np.asarray(e)[:k]
            in_w[real] = np.asarray(wv)[:k]
            bar.update(k)
    bar.close()
    home_sites = crosscoder.home_sites()
    return Effects(mean=mean, var=var, n=count,
                   sources=FeatureList(tuple(home_sites[i] for i in src), src),
                   targets=FeatureList(tuple(home_sites[j] for j in tgt), tgt),
                   method=method, positions="same", alphas=np.stack([lo, hi], -1), per_input=per_input,
                   input_weight=in_w, input_index=idx,
                   options=dict(inputs_per_source=M, seed=seed, direction=direction, read=read,
                                crosscoder_sites=list(crosscoder.sites)))
