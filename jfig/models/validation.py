"""Input checks shared by every stage: token arrays, SAEs against the sites they read, site order.

Each check runs on the host before any tracing, and raises a JfigError subclass whose message
names what is wrong and what was expected. Model methods (`check_tokens`, `check_saes`, the edit checks) and
every stage call these; no stage writes its own copy.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..edits import flatten_edits, position_axis
from ..errors import JfigError, ShapeError, SiteError
from ..sites import parse_site, site_key


def check_tokens(tokens: Any, vocab_size: int | None, *, max_len: int | None = None, allow_1d: bool = True,
                 what: str = "tokens") -> jax.Array:
    """tokens as int32 [batch, seq]: integer dtype, rank 2 (or 1 when allow_1d), ids in [0, vocab_size),
    at least one position, at most `max_len` positions. Traced arrays are checked for shape only."""
    if isinstance(tokens, (list, tuple)):
        tokens = np.asarray(tokens)
    if not hasattr(tokens, "dtype") or not hasattr(tokens, "ndim"):
        raise ShapeError(f"{what} must be an int array [batch, seq] or [seq], got {type(tokens).__name__}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ShapeError(f"{what} must have an integer dtype, got {tokens.dtype}")
    if tokens.ndim == 1 and allow_1d:
        tokens = tokens[None, :]
    if tokens.ndim != 2:
        expected = "rank 2 [batch, seq] (or 1)" if allow_1d else "rank 2 [n_sequences, seq]"
        raise ShapeError(f"{what} must have {expected}, got shape {tuple(tokens.shape)}")
    if tokens.shape[1] == 0:
        raise ShapeError(f"{what} has sequence length 0; expected at least one token")
    if vocab_size is not None and tokens.size and not isinstance(tokens, jax.core.Tracer):
        t = np.asarray(tokens)
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= vocab_size:
            raise ShapeError(f"token id {hi if hi >= vocab_size else lo} in {what} is outside the vocabulary "
                             f"[0, {vocab_size})")
    if max_len is not None and tokens.shape[1] > max_len:
        raise ShapeError(f"sequence length {tokens.shape[1]} of {what} exceeds the model's {max_len} positions")
    return jnp.asarray(tokens, jnp.int32)


def check_token_rows(tokens: Any, vocab_size: int | None, *, what: str = "token batches") -> np.ndarray:
    """Host-side variant of `check_tokens` for corpora: int32 numpy [n_sequences, seq] (rank 2 only)."""
    return np.asarray(check_tokens(np.asarray(tokens), vocab_size, allow_1d=False, what=what))


def check_sae_fits(sae: Any, site_width: int | None) -> None:
    """The SAE reads a site `site_width` wide (None: width unknown, not checked)."""
    if site_width is not None and sae.d_in != site_width:
        raise ShapeError(f"SAE d_in {sae.d_in} does not match site {sae.site} width {site_width} "
                         f"(the SAEs do not belong to this model)")


def saes_by_site(saes: Any) -> dict:
    """{site: SAE} from a dict, a list of SAEs, or one SAE; one SAE per site."""
    if isinstance(saes, Mapping):
        out = dict(saes)
        for site, sae in out.items():
            if getattr(sae, "site", site) != site:
                raise JfigError(f"SAE given under key {site!r} reads site {sae.site!r}")
        return out
    if hasattr(saes, "site"):
        return {saes.site: saes}
    out = {}
    for s in saes:
        if not hasattr(s, "site"):
            raise JfigError(f"expected SAEs (objects with .site, .d_in, .d_sae), got {type(s).__name__}")
        if s.site in out:
            raise JfigError(f"two SAEs given for site {s.site!r}; one SAE per site")
        out[s.site] = s
    return out


def check_saes(model: Any, saes: Any, *, at_least: int = 1) -> dict:
    """{site: SAE} in forward order, each at a site of `model` and as wide as that site."""
    by_site = saes_by_site(saes)
    if len(by_site) < at_least:
        raise JfigError(f"expected at least {at_least} SAE(s), got {len(by_site)}")
    for site, sae in by_site.items():
        model.check_site(site)
        if site.endswith("hook_pattern"):
            raise SiteError(f"SAEs cannot read {site}: attention patterns are not a token-aligned vector")
        check_sae_fits(sae, model.site_width(site))
    return {s: by_site[s] for s in sorted(by_site, key=site_key)}


def check_features(features: Iterable[int], d_sae: int, site: str) -> np.ndarray:
    """Feature ids as int64, each in [0, d_sae)."""
    f = np.asarray(list(features) if not hasattr(features, "__array__") else features)
    if f.size and not np.issubdtype(f.dtype, np.integer):
        raise ShapeError(f"feature ids at {site} must be integers, got {f.dtype}")
    f = f.astype(np.int64).reshape(-1)
    if f.size and (f.min() < 0 or f.max() >= d_sae):
        raise JfigError(f"feature index {int(f.max() if f.max() >= d_sae else f.min())} out of range for the "
                        f"SAE at {site} with d_sae {d_sae}")
    return f


def site_shape(config: Any, site: str, batch: int, seq: int) -> tuple:
    """Activation shape at `site` for a [batch, seq] run: exact for built-in models (`config` set);
    for wrapped functions (`config` None) only batch and seq are known, so the shape ends in None."""
    if config is None:
        return (batch, None) if site.endswith("hook_pattern") else (batch, seq, None)
    local = parse_site(site).local
    if local == "attn.hook_pattern":
        return (batch, config.n_heads, seq, seq)
    if local in ("attn.hook_q", "attn.hook_z"):
        return (batch, seq, config.n_heads, config.d_head)
    if local in ("attn.hook_k", "attn.hook_v"):
        return (batch, seq, config.n_kv_heads, config.d_head)
    if local == "mlp.hook_post":
        return (batch, seq, config.d_mlp)
    return (batch, seq, config.d_model)


def check_edits(model: Any, edits: Any, batch: int, seq: int) -> tuple:
    """A flat tuple of the edits, each at a site of `model` and fitting a [batch, seq] run there:
    SAE widths, feature indices, values, directions and positions (concrete leaves only for values)."""
    flat = flatten_edits(edits)
    for e in flat:
        model.check_site(e.site)
        sae = getattr(e, "sae", None)
        if sae is not None:
            check_sae_fits(sae, model.site_width(e.site))
        e.check(site_shape(model.config, e.site, batch, seq), position_axis(e.site))
    return flat
