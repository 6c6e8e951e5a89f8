"""Edits: pure interventions at a named site, as pytrees.

Feature indices, values, directions and positions are array leaves, so `jax.vmap`
over a batch of edits works (build the edit inside the vmapped function). Every edit
maps the site's activations `x` to new activations; `positions` restricts it to some
token positions:

- ``None``: every position;
- an int array ``[n]``: those positions;
- a bool array ``[seq]`` or ``[batch, seq]``: a mask (e.g. where the source is active).
"""
from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from .errors import ShapeError


def as_positions(positions):
    if positions is None:
        return None
    p = jnp.asarray(positions)
    if p.dtype != jnp.bool_ and not jnp.issubdtype(p.dtype, jnp.integer):
        raise ShapeError(f"positions must be int indices or a bool mask, got dtype {p.dtype}")
    return p


def position_axis(site: str) -> int:
    """Which axis of a site's activations is the token (query) position."""
    return 2 if site.endswith("hook_pattern") else 1


def _mask(positions, x, pos_axis: int):
    """Bool mask broadcastable to x, True at the edited positions."""
    seq = x.shape[pos_axis]
    if positions.dtype == jnp.bool_:
        m = positions if positions.ndim == 2 else positions[None, :]
        if m.shape[-1] != seq:
            raise ShapeError(f"position mask has length {m.shape[-1]}, expected the sequence length {seq}")
    else:
        m = jnp.zeros((seq,), bool).at[positions].set(True)[None, :]
    # m: [batch|1, seq] -> insert singleton axes around the position axis.
    shape = [1] * x.ndim
    shape[0], shape[pos_axis] = m.shape[0], seq
    if pos_axis != 1:
        return m.reshape(m.shape[0], *([1] * (pos_axis - 1)), seq, *([1] * (x.ndim - pos_axis - 1)))
    return m.reshape(m.shape[0], seq, *([1] * (x.ndim - 2)))


def where_positions(positions, new, x, pos_axis):
    if positions is None:
        return new
    return jnp.where(_mask(positions, x, pos_axis), new, x)


class Edit(eqx.Module):
    """Base class. Subclasses have a `site` and implement `apply(x) -> x` (same shape)."""

    def apply(self, x, pos_axis: int = 1):
        raise NotImplementedError

    @property
    def site(self) -> str:
        raise NotImplementedError


def _clamp_delta(sae, feature, value, x):
    """Change of x when `feature` (int [] or [n]) of `sae` is set to `value`, keeping the error."""
    f, stats = sae.encode_with_stats(x)
    feats = jnp.atleast_1d(feature)
    vals = jnp.broadcast_to(jnp.asarray(value, f.dtype), feats.shape)
    dirs = jax.vmap(lambda i: sae.decode_direction(i, stats))(feats)  # [n, ..., d_in | n_heads, d_head]
    if dirs.shape[-1] != sae.d_in:  # hook_z SAEs hand back [..., n_heads, d_head]
        dirs = dirs.reshape(*dirs.shape[:-2], sae.d_in)
    dirs = jnp.moveaxis(dirs, 0, -2)  # [..., n, d_in]
    cur = jnp.take(f, feats, axis=-1)  # [..., n]
    delta = jnp.einsum("...n,...nd->...d", vals - cur, jnp.broadcast_to(dirs, cur.shape + dirs.shape[-1:]))
    return delta.reshape(x.shape)


class Clamp(Edit):
    """Error-preserving clamp: x + (value - f_i(x)) · d_i, with d_i the SAE's decoder direction.

    `feature` is an int or int array [n] (several features clamped together); `value`
    a scalar or [n]. Normalising SAEs scale d_i per token as their decode does.
    """

    sae: Any
    feature: jax.Array
    value: jax.Array
    positions: jax.Array | None = None

    def __init__(self, sae, feature, value, positions=None):
        self.sae = sae
        self.feature = jnp.asarray(feature, jnp.int32)
        self.value = jnp.asarray(value, jnp.float32)
        self.positions = as_positions(positions)

    @property
    def site(self) -> str:
        return self.sae.site

    def apply(self, x, pos_axis: int = 1):
        return where_positions(self.positions, x + _clamp_delta(self.sae, self.feature, self.value, x), x, pos_axis)


class Ablate(Edit):
    """Clamp `feature` to 0, keeping the SAE error."""

    sae: Any
    feature: jax.Array
    positions: jax.Array | None = None

    def __init__(self, sae, feature, positions=None):
        self.sae = sae
        self.feature = jnp.asarray(feature, jnp.int32)
        self.positions = as_positions(positions)

    @property
    def site(self) -> str:
        return self.sae.site

    def apply(self, x, pos_axis: int = 1):
        return where_positions(self.positions, x + _clamp_delta(self.sae, self.feature, 0.0, x), x, pos_axis)


class Steer(Edit):
    """x + scale · direction; direction matches the site's trailing shape (e.g. [d_model])."""

    site_name: str = eqx.field(static=True)
    direction: jax.Array
    scale: jax.Array
    positions: jax.Array | None = None

    def __init__(self, site, direction, scale=1.0, positions=None):
        self.site_name = site
        self.direction = jnp.asarray(direction, jnp.float32)
        self.scale = jnp.asarray(scale, jnp.float32)
        self.positions = as_positions(positions)

    @property
    def site(self) -> str:
        return self.site_name

    def apply(self, x, pos_axis: int = 1):
        return where_positions(self.positions, x + self.scale * self.direction, x, pos_axis)


class Patch(Edit):
    """Replace the site's activations with `values` (broadcastable to them)."""

    site_name: str = eqx.field(static=True)
    values: jax.Array
    positions: jax.Array | None = None

    def __init__(self, site, values, positions=None):
        self.site_name = site
        self.values = jnp.asarray(values, jnp.float32)
        self.positions = as_positions(positions)

    @property
    def site(self) -> str:
        return self.site_name

    def apply(self, x, pos_axis: int = 1):
        return where_positions(self.positions, jnp.broadcast_to(self.values, x.shape).astype(x.dtype), x, pos_axis)


class Compose(Edit):
    """Several edits applied in order (edits at the same site run in the order given)."""

    edits: tuple

    def __init__(self, *edits):
        if len(edits) == 1 and isinstance(edits[0], (tuple, list)):
            edits = tuple(edits[0])
        self.edits = tuple(edits)

    @property
    def site(self) -> str:
        raise AttributeError("Compose spans several sites; use flatten_edits")


def flatten_edits(edits) -> tuple[Edit, ...]:
    """A flat tuple of single-site edits from an edit, a Compose, or a sequence of them."""
    if edits is None:
        return ()
    if isinstance(edits, Compose):
        return flatten_edits(edits.edits)
    if isinstance(edits, Edit):
        return (edits,)
    out: tuple[Edit, ...] = ()
    for e in edits:
        if not isinstance(e, Edit):
            raise TypeError(f"edits must be jfig.edits.Edit objects, got {type(e).__name__}")
        out += flatten_edits(e)
    return out
