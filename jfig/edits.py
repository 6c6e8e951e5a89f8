"""Edits: pure interventions at a named site, as pytrees.

Feature indices, values, directions and positions are array leaves, so `jax.vmap`
over a batch of edits works (build the edit inside the vmapped function). Every edit
maps the site's activations `x` to new activations; `positions` restricts it to some
token positions:

- ``None``: every position;
- an int (or int array ``[n]``): those positions (negative ones count from the end);
- a bool array ``[seq]`` or ``[batch, seq]``: a mask (e.g. where the source is active).

`Edit.check(shape)` says whether an edit fits activations of a given shape; the model
calls it on the host before running, and `apply` calls it again on the traced shape.
Value checks (feature and position ranges) run on concrete leaves only: leaves traced
by `jit`, `grad` or `vmap` are checked for shape and dtype alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from treescope import repr_lib

from .errors import ShapeError, SiteError
from .sites import parse_site


def as_positions(positions):
    if positions is None:
        return None
    p = jnp.asarray(positions)
    if p.dtype != jnp.bool_ and not jnp.issubdtype(p.dtype, jnp.integer):
        raise ShapeError(f"positions must be int indices or a bool mask, got dtype {p.dtype}")
    return p


def as_values(values):
    """A float leaf: jax float arrays (and tracers) keep their dtype, anything else becomes float32."""
    if isinstance(values, jax.Array) and jnp.issubdtype(values.dtype, jnp.floating):
        return values
    return jnp.asarray(values, jnp.float32)


def as_features(feature, label: str):
    """Feature indices as an int32 leaf, [] or [n]; floats and bools are refused, not truncated."""
    f = jnp.asarray(feature)
    if not jnp.issubdtype(f.dtype, jnp.integer):
        raise ShapeError(f"{label}: feature indices must be integers, got {f.dtype}")
    if f.ndim > 1:
        raise ShapeError(f"{label}: feature must be an int or an int array [n], got shape {tuple(f.shape)}")
    return f.astype(jnp.int32)


_HOOK_Z = "attn.hook_z"


def position_axis(site: str) -> int:
    """Which axis of a site's activations is the token (query) position."""
    return 2 if site.endswith("hook_pattern") else 1


def _concrete(leaf) -> np.ndarray | None:
    """The leaf's values on the host, or None when it is traced (inside jit, grad, vmap)."""
    if leaf is None or isinstance(leaf, jax.core.Tracer):
        return None
    return np.asarray(leaf)


def _axis_size(shape, axis: int) -> int | None:
    """Size of `axis` in a site shape that may end in None (sizes unknown from there on)."""
    if shape is None or axis >= len(shape):
        return None
    return shape[axis]


def _known(shape) -> bool:
    """Whether every axis of a site shape is known."""
    return shape is not None and all(n is not None for n in shape)


def _broadcasts_to(shape, target) -> bool:
    """Whether an array of `shape` broadcasts to `target` (numpy rules, no new axes beyond target's rank)."""
    if len(shape) > len(target):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(target)))


def check_positions(label: str, positions, shape, pos_axis: int = 1) -> None:
    """`positions` (None, int [] / [n] or bool [seq] / [batch, seq]) fit a site of `shape`."""
    if positions is None:
        return
    batch, seq = _axis_size(shape, 0), _axis_size(shape, pos_axis)
    if positions.dtype == jnp.bool_:
        if positions.ndim not in (1, 2):
            raise ShapeError(f"{label}: a position mask must be [seq] or [batch, seq], got shape "
                             f"{tuple(positions.shape)}")
        if seq is not None and positions.shape[-1] != seq:
            raise ShapeError(f"{label}: position mask has length {positions.shape[-1]}, expected the sequence "
                             f"length {seq}")
        if positions.ndim == 2 and batch is not None and positions.shape[0] not in (1, batch):
            raise ShapeError(f"{label}: position mask has {positions.shape[0]} rows, expected 1 or the batch "
                             f"size {batch}")
        return
    if positions.ndim > 1:
        raise ShapeError(f"{label}: int positions must be an int or an int array [n], got shape "
                         f"{tuple(positions.shape)}")
    p = _concrete(positions)
    if seq is not None and p is not None and p.size:
        bad = p[(p < -seq) | (p >= seq)]
        if bad.size:
            raise ShapeError(f"{label}: position {int(bad[0])} is out of range for a sequence of length {seq} "
                             f"(expected -{seq} <= position < {seq})")


def _check_feature_range(label: str, feature, d_sae: int) -> None:
    """Concrete feature indices lie in [0, d_sae)."""
    f = _concrete(feature)
    if f is None or not f.size:
        return
    bad = f[(f < 0) | (f >= d_sae)]
    if bad.size:
        raise ShapeError(f"{label}: feature index {int(bad[0])} is out of range for an SAE with d_sae {d_sae} "
                         f"(expected 0 <= index < {d_sae})")


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
    if pos_axis != 1:
        return m.reshape(m.shape[0], *([1] * (pos_axis - 1)), seq, *([1] * (x.ndim - pos_axis - 1)))
    return m.reshape(m.shape[0], seq, *([1] * (x.ndim - 2)))


def where_positions(positions, new, x, pos_axis):
    if positions is None:
        return new
    return jnp.where(_mask(positions, x, pos_axis), new, x)


class Edit(eqx.Module):
    """Base class. Subclasses have a `site` and implement `apply(x) -> x` (same shape)."""

    def __treescope_repr__(self, path, subtree_renderer):
        """Notebook display (treescope): the fields, an SAE shown by its site and width only."""
        fields = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "W_dec") and hasattr(v, "site"):           # an SAE: not its weight matrices
                v = f"SAE at {v.site} ({v.architecture}, {v.d_in} -> {v.d_sae})"
            fields[f.name] = v
        return repr_lib.render_object_constructor(type(self), fields, path=None, subtree_renderer=subtree_renderer)

    def apply(self, x, pos_axis: int = 1):
        raise NotImplementedError

    @property
    def site(self) -> str:
        raise NotImplementedError

    @property
    def label(self) -> str:
        """How error messages name this edit: 'Clamp at blocks.3.hook_resid_post'."""
        return f"{type(self).__name__} at {self.site}"

    def check(self, shape, pos_axis: int = 1) -> None:
        """Raise ShapeError unless this edit fits activations of `shape` (a tuple; a trailing None
        means the sizes from there on are unknown). The base class checks `positions`."""
        check_positions(self.label, getattr(self, "positions", None), shape, pos_axis)


def _clamp_leading_shape(sae, shape):
    """The axes a clamp value broadcasts over: the SAE's feature shape without d_sae ([batch, seq])."""
    if _known(shape):
        return tuple(shape[:-2] if sae.reshape_hook_z else shape[:-1])
    if shape is not None and len(shape) >= 2 and _known(shape[:2]):
        return tuple(shape[:2])
    return None


def _check_clamp(label: str, sae, feature, value, shape) -> None:
    """Feature indices in range for `sae`; `value` broadcasts to [batch, seq] (one feature) or
    [batch, seq, n] (feature [n])."""
    _check_feature_range(label, feature, sae.d_sae)
    lead = _clamp_leading_shape(sae, shape)
    if lead is None or value is None:
        return
    if feature.ndim == 0:
        want, forms = lead, "a scalar, [seq] or [batch, seq]"
    else:
        want, forms = lead + tuple(feature.shape), "a scalar, [n], [seq, n] or [batch, seq, n] with n features"
    if not _broadcasts_to(tuple(value.shape), want):
        raise ShapeError(f"{label}: value shape {tuple(value.shape)} does not broadcast to {want}; expected {forms}")


def _clamp_delta(sae, feature, value, x):
    """Change of x when `feature` (int [] or [n]) of `sae` is set to `value` (broadcastable to
    [..., ] or [..., n], the feature shape without d_sae), keeping the SAE error."""
    f, stats = sae.encode_with_stats(x)
    feats = jnp.atleast_1d(feature)
    lead = f.shape[:-1]
    v = jnp.asarray(value, f.dtype)
    vals = jnp.broadcast_to(v, lead)[..., None] if jnp.ndim(feature) == 0 else jnp.broadcast_to(v, lead + feats.shape)
    dirs = jax.vmap(lambda i: sae.decode_direction(i, stats))(feats)  # [n, ..., d_in | n_heads, d_head]
    if dirs.shape[-1] != sae.d_in:  # hook_z SAEs hand back [..., n_heads, d_head]
        dirs = dirs.reshape(*dirs.shape[:-2], sae.d_in)
    dirs = jnp.moveaxis(dirs, 0, -2)  # [..., n, d_in]
    cur = jnp.take(f, feats, axis=-1)  # [..., n]
    delta = jnp.einsum("...n,...nd->...d", vals - cur, jnp.broadcast_to(dirs, cur.shape + dirs.shape[-1:]))
    return delta.reshape(x.shape).astype(x.dtype)


class SAEEdit(Edit):
    """An edit of an SAE's features: its site is the SAE's (subclasses have an `sae` field)."""

    @property
    def site(self) -> str:
        return self.sae.site


class Clamp(SAEEdit):
    """Error-preserving clamp: x' = x + (value - f_i(x)) · d_i per token, d_i the SAE's decoder direction.

    `feature` is an int or an int array [n] (several features clamped together). `value`
    broadcasts to the site's leading axes: a scalar, [seq] or [batch, seq] for one feature;
    a scalar, [n], [seq, n] or [batch, seq, n] for n features; so a feature can take its
    per-token values from another run. Normalising SAEs scale d_i per token as their decode does.
    """

    sae: Any
    feature: jax.Array
    value: jax.Array
    positions: jax.Array | None = None

    def __init__(self, sae, feature, value, positions=None):
        self.sae = sae
        self.feature = as_features(feature, f"Clamp at {sae.site}")
        self.value = as_values(value)
        self.positions = as_positions(positions)

    def check(self, shape, pos_axis: int = 1) -> None:
        super().check(shape, pos_axis)
        _check_clamp(self.label, self.sae, self.feature, self.value, shape)

    def apply(self, x, pos_axis: int = 1):
        self.check(x.shape, pos_axis)
        return where_positions(self.positions, x + _clamp_delta(self.sae, self.feature, self.value, x), x, pos_axis)


class Ablate(SAEEdit):
    """Clamp `feature` (int or int array [n]) to 0, keeping the SAE error."""

    sae: Any
    feature: jax.Array
    positions: jax.Array | None = None

    def __init__(self, sae, feature, positions=None):
        self.sae = sae
        self.feature = as_features(feature, f"Ablate at {sae.site}")
        self.positions = as_positions(positions)

    def check(self, shape, pos_axis: int = 1) -> None:
        super().check(shape, pos_axis)
        _check_clamp(self.label, self.sae, self.feature, None, shape)

    def apply(self, x, pos_axis: int = 1):
        self.check(x.shape, pos_axis)
        return where_positions(self.positions, x + _clamp_delta(self.sae, self.feature, 0.0, x), x, pos_axis)


def _feature_edit_delta(sae, x, change):
    """decode(change(f)) - decode(f) in the shape of x: the residual change that sets the SAE's
    features to change(f) while keeping its error (decode is affine in f for fixed stats)."""
    f, stats = sae.encode_with_stats(x)
    delta = sae.decode(change(f), stats) - sae.decode(f, stats)
    return delta.reshape(x.shape).astype(x.dtype)


class SetFeatures(SAEEdit):
    """Set every feature where `mask` (bool [d_sae]) is True to `values` (scalar or [d_sae]), keeping
    the SAE error: x' = x + decode(f') - decode(f), f' = where(mask, values, f).

    With `mask` = not-in-a-circuit and `values` = mean activations this mean-ablates everything
    outside a circuit at once (one edit per site, whatever the number of features); `mask` is a
    traced leaf, so `jax.vmap` over masks runs many feature sets in one pass.
    """

    sae: Any
    mask: jax.Array
    values: jax.Array
    positions: jax.Array | None = None

    def __init__(self, sae, mask, values=0.0, positions=None):
        self.sae = sae
        self.mask = jnp.asarray(mask)
        if self.mask.dtype != jnp.bool_:
            raise ShapeError(f"SetFeatures at {sae.site}: mask must be bool [d_sae], got dtype {self.mask.dtype}")
        self.values = as_values(values)
        self.positions = as_positions(positions)

    def check(self, shape, pos_axis: int = 1) -> None:
        super().check(shape, pos_axis)
        for name, leaf in (("mask", self.mask), ("values", self.values)):
            if leaf.ndim > 1 or (leaf.ndim == 1 and leaf.shape[0] != self.sae.d_sae):
                raise ShapeError(f"{self.label}: {name} has shape {tuple(leaf.shape)}, expected "
                                 f"{'[d_sae]' if name == 'mask' else 'a scalar or [d_sae]'} with d_sae {self.sae.d_sae}")
        if self.mask.ndim != 1:
            raise ShapeError(f"{self.label}: mask has shape {tuple(self.mask.shape)}, expected [d_sae={self.sae.d_sae}]")

    def apply(self, x, pos_axis: int = 1):
        self.check(x.shape, pos_axis)
        delta = _feature_edit_delta(self.sae, x, lambda f: jnp.where(self.mask, self.values.astype(f.dtype), f))
        return where_positions(self.positions, x + delta, x, pos_axis)


class ShiftFeatures(SAEEdit):
    """Add `delta` (broadcastable to the features, e.g. [batch, seq, d_sae]) to the SAE's features,
    keeping its error: x' = x + decode(f + delta) - decode(f). At delta = 0 its gradient with respect
    to delta is the gradient with respect to the feature activations (attribution patching)."""

    sae: Any
    delta: jax.Array

    def __init__(self, sae, delta):
        self.sae = sae
        self.delta = as_values(delta)

    def check(self, shape, pos_axis: int = 1) -> None:
        lead = _clamp_leading_shape(self.sae, shape)
        if lead is not None and not _broadcasts_to(tuple(self.delta.shape), lead + (self.sae.d_sae,)):
            raise ShapeError(f"{self.label}: delta shape {tuple(self.delta.shape)} does not broadcast to the "
                             f"features {lead + (self.sae.d_sae,)}")

    def apply(self, x, pos_axis: int = 1):
        self.check(x.shape, pos_axis)
        return x + _feature_edit_delta(self.sae, x, lambda f: f + self.delta.astype(f.dtype))


class ClampTranscoder(Edit):
    """Clamp a transcoder feature where the transcoder writes, keeping its error:
    x' = x + (value - current) · W_dec[feature] at the write site (``transcoder.out_site``).

    ``current`` is the feature's activation f_i(x_in) in this run, [batch, seq] for one feature or
    [batch, seq, n] for ``feature`` [n]: an edit sees one site, and x_in (the read site) comes
    earlier, so it is computed beforehand. :meth:`from_run` computes it exactly, running the
    model with the other edits up to the read site (the clamp changes nothing before the write
    site, so that is the x_in the edited run sees). `value` broadcasts as for :class:`Clamp`. A
    skip connection is unaffected: it depends on x_in only. `out` (static) picks which of the
    transcoder's ``out_sites`` this edit writes (a cross-layer transcoder writes several).
    """

    transcoder: Any
    feature: jax.Array
    value: jax.Array
    current: jax.Array
    positions: jax.Array | None = None
    out: int = eqx.field(static=True, default=0)

    def __init__(self, transcoder, feature, value, current, positions=None, out: int = 0):
        self.transcoder = transcoder
        self.out = int(out)
        if not 0 <= self.out < len(transcoder.out_sites):
            raise ShapeError(f"ClampTranscoder: out {out} is out of range for a transcoder writing "
                             f"{len(transcoder.out_sites)} site(s)")
        self.feature = as_features(feature, f"ClampTranscoder at {transcoder.out_sites[self.out]}")
        self.value = as_values(value)
        self.current = as_values(current)
        self.positions = as_positions(positions)

    @property
    def site(self) -> str:
        return self.transcoder.out_sites[self.out]

    @classmethod
    def from_run(cls, model, tokens, transcoder, feature, value, positions=None, edits=()):
        """The clamp with ``current`` read from ``model`` on ``tokens`` with ``edits`` (the other
        edits of the run the clamp will join): capture the read site, encode, take the feature.
        A cross-layer transcoder gets a Compose of one clamp per written site."""
        site = transcoder.site
        acts = model.run(tokens, edits=edits, capture=(site,), stop_at=site, logits=False).cache[site]
        current = jnp.take(transcoder.encode(acts), as_features(feature, f"ClampTranscoder at {site}"), axis=-1)
        clamps = [cls(transcoder, feature, value, current, positions, out=k)
                  for k in range(len(transcoder.out_sites))]
        return clamps[0] if len(clamps) == 1 else Compose(*clamps)

    def check(self, shape, pos_axis: int = 1) -> None:
        super().check(shape, pos_axis)
        _check_feature_range(self.label, self.feature, self.transcoder.d_sae)
        if shape is not None and len(shape) and shape[-1] is not None and shape[-1] != self.transcoder.d_out:
            raise ShapeError(f"{self.label}: the transcoder writes d_out {self.transcoder.d_out}, the site is "
                             f"{shape[-1]} wide")
        lead = tuple(shape[:-1]) if _known(shape) else None
        if lead is None:
            return
        want = lead if self.feature.ndim == 0 else lead + tuple(self.feature.shape)
        for name, leaf in (("value", self.value), ("current", self.current)):
            if not _broadcasts_to(tuple(leaf.shape), want):
                raise ShapeError(f"{self.label}: {name} shape {tuple(leaf.shape)} does not broadcast to {want}")

    def apply(self, x, pos_axis: int = 1):
        self.check(x.shape, pos_axis)
        feats = jnp.atleast_1d(self.feature)
        lead = x.shape[:-1]
        want = lead + ((1,) if self.feature.ndim == 0 else tuple(feats.shape))
        cur, val = self.current.astype(x.dtype), self.value.astype(x.dtype)
        if self.feature.ndim == 0:
            cur, val = jnp.broadcast_to(cur, lead)[..., None], jnp.broadcast_to(val, lead)[..., None]
        change = jnp.broadcast_to(val, want) - jnp.broadcast_to(cur, want)          # [..., n]
        rows = jnp.take(self.transcoder.decoder_rows(self.out), feats, axis=0).astype(x.dtype)   # [n, d_out]
        return where_positions(self.positions, x + jnp.einsum("...n,nd->...d", change, rows), x, pos_axis)


class SiteEdit(Edit):
    """An edit of a site's activations, named by `site_name` (static: part of the jit cache key)."""

    site_name: str = eqx.field(static=True)

    @property
    def site(self) -> str:
        return self.site_name


class Steer(SiteEdit):
    """x + scale · direction; direction matches the site's trailing shape (e.g. [d_model]) and
    broadcasts to its activations (up to [batch, seq, d_model])."""

    direction: jax.Array
    scale: jax.Array
    positions: jax.Array | None = None

    def __init__(self, site, direction, scale=1.0, positions=None):
        self.site_name = site
        self.direction = as_values(direction)
        self.scale = as_values(scale)
        self.positions = as_positions(positions)

    def check(self, shape, pos_axis: int = 1) -> None:
        super().check(shape, pos_axis)
        if not _known(shape):
            return
        d = tuple(self.direction.shape)
        if d and len(shape) == 3 and d[-1] != shape[-1]:
            raise ShapeError(f"{self.label}: direction has width {d[-1]}, expected {shape[-1]} (the site's width)")
        if not _broadcasts_to(d, shape):
            raise ShapeError(f"{self.label}: direction shape {d} does not broadcast to the activations {tuple(shape)}")
        if not _broadcasts_to(tuple(self.scale.shape), shape):
            raise ShapeError(f"{self.label}: scale shape {tuple(self.scale.shape)} does not broadcast to the "
                             f"activations {tuple(shape)}")

    def apply(self, x, pos_axis: int = 1):
        self.check(x.shape, pos_axis)
        return where_positions(self.positions, (x + self.scale * self.direction).astype(x.dtype), x, pos_axis)


class Patch(SiteEdit):
    """Replace the site's activations with `values` (broadcastable to them, e.g. [batch, seq, d])."""

    values: jax.Array
    positions: jax.Array | None = None

    def __init__(self, site, values, positions=None):
        self.site_name = site
        self.values = as_values(values)
        self.positions = as_positions(positions)

    def check(self, shape, pos_axis: int = 1) -> None:
        super().check(shape, pos_axis)
        if _known(shape) and not _broadcasts_to(tuple(self.values.shape), shape):
            raise ShapeError(f"{self.label}: values shape {tuple(self.values.shape)} does not broadcast to the "
                             f"activations {tuple(shape)}")

    def apply(self, x, pos_axis: int = 1):
        self.check(x.shape, pos_axis)
        return where_positions(self.positions, jnp.broadcast_to(self.values, x.shape).astype(x.dtype), x, pos_axis)


class PatchHeads(SiteEdit):
    """Replace the z of some heads at a ``blocks.{l}.attn.hook_z`` site: ``x' = where(heads, values, x)``.

    `values` broadcasts to the site's activations [batch, seq, n_heads, d_head] (e.g. the z of
    another run); `heads` is a bool mask [n_heads], an array leaf, so building the edit inside a
    vmapped function vectorises over head masks. `positions` restricts the patch to some token
    positions as for the other edits (None, int indices, or a bool mask [seq] / [batch, seq]).
    """

    values: jax.Array
    heads: jax.Array
    positions: jax.Array | None = None

    def __init__(self, site, values, heads, positions=None):
        s = parse_site(site)
        if s.local != _HOOK_Z:
            raise SiteError(f"PatchHeads edits a 'blocks.{{layer}}.{_HOOK_Z}' site ([batch, seq, n_heads, d_head]), "
                            f"got {site!r}")
        self.site_name = site
        self.values = as_values(values)
        heads = jnp.asarray(heads)
        if heads.dtype != jnp.bool_:
            raise ShapeError(f"PatchHeads at {site}: heads must be a bool mask [n_heads], got dtype {heads.dtype} "
                             f"(for head indices, use jnp.zeros(n_heads, bool).at[indices].set(True))")
        if heads.ndim != 1:
            raise ShapeError(f"PatchHeads at {site}: heads must be a bool mask [n_heads], got shape "
                             f"{tuple(heads.shape)}")
        self.heads = heads
        self.positions = as_positions(positions)

    def check(self, shape, pos_axis: int = 1) -> None:
        super().check(shape, pos_axis)
        if shape is None or (len(shape) != 4 and None in shape):
            return                                  # a wrapped model's site: only batch and seq are known
        if len(shape) != 4:
            raise ShapeError(f"{self.label}: expected activations [batch, seq, n_heads, d_head], got shape "
                             f"{tuple(shape)}")
        n_heads = shape[2]
        if n_heads is not None and self.heads.shape[0] != n_heads:
            raise ShapeError(f"{self.label}: the head mask has {self.heads.shape[0]} entries, expected n_heads "
                             f"{n_heads}")
        if None not in shape and not _broadcasts_to(tuple(self.values.shape), tuple(shape)):
            raise ShapeError(f"{self.label}: values shape {tuple(self.values.shape)} does not broadcast to the "
                             f"activations {tuple(shape)} [batch, seq, n_heads, d_head]")

    def apply(self, x, pos_axis: int = 1):
        self.check(x.shape, pos_axis)
        new = jnp.where(self.heads[:, None], jnp.broadcast_to(self.values, x.shape).astype(x.dtype), x)
        return where_positions(self.positions, new, x, pos_axis)


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
