"""The hook that applies edits and records captures during a forward.

In a full run an edit's `positions` index the run's own sequence axis. In a run of chosen
absolute positions (a cached run: generation, position-sparse suffixes) they are read as
absolute positions: int indices select those positions, a bool mask [seq] / [batch, seq]
selects where it is True, and positions past the mask's length are not edited.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ..edits import Edit, position_axis
from .forward import StopRun


class EditHook:
    """Applies edits and records captures; `sites` is what the forward must call it for.

    `positions` [b|1, s]: absolute positions of the run's s positions, or None for a full run.
    """

    def __init__(self, edits: tuple[Edit, ...], capture: tuple[str, ...], stop: str | None, positions=None):
        self.edits, self.capture, self.stop, self.positions = edits, capture, stop, positions
        self.sites = frozenset([e.site for e in edits] + list(capture))
        self.cache: dict[str, jax.Array] = {}
        self.seen: set[str] = set()

    def __call__(self, site: str, x):
        self.seen.add(site)
        if site not in self.sites and site != self.stop:
            return x
        for e in self.edits:
            if e.site == site:
                x = self._apply(e, site, x)
        if site in self.capture:
            self.cache[site] = x
        if site == self.stop:
            raise StopRun(site)
        return x

    def _apply(self, e: Edit, site: str, x):
        axis = position_axis(site)
        where = getattr(e, "positions", None)
        if self.positions is None or where is None:
            return e.apply(x, axis)
        everywhere = eqx.tree_at(lambda t: t.positions, e, None)
        m = absolute_mask(where, self.positions)                       # [b|1, s]
        shape = [1] * x.ndim
        shape[0], shape[axis] = m.shape
        return jnp.where(m.reshape(shape), everywhere.apply(x, axis), x)


def absolute_mask(where, positions):
    """Bool [b|1, s]: which of the run's absolute `positions` [b|1, s] an edit's `where`
    (int indices [n], or a bool mask [seq] / [batch, seq]) selects."""
    if where.dtype != jnp.bool_:
        return (positions[..., None] == where.reshape(-1)).any(-1)
    m = where if where.ndim == 2 else where[None]
    n = m.shape[-1]
    b = max(m.shape[0], positions.shape[0])
    m = jnp.broadcast_to(m, (b, n))
    idx = jnp.broadcast_to(jnp.clip(positions, 0, n - 1), (b, positions.shape[1]))
    return jnp.take_along_axis(m, idx, axis=1) & (positions < n)
