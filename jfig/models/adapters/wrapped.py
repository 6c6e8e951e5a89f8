"""What every adapter hands to `Model.from_function`, and the checks the adapters share.

An adapter turns a framework's model into `apply(params, tokens, hook) -> logits` that calls
`hook(site, x)` once per site. Before anything runs, the site names are put in forward order
(TransformerLens names sort themselves; other names need `site_order`), and one abstract run
(`jax.eval_shape`, no arithmetic) checks that every site is reached exactly once, in that order,
with one array [batch, seq, ...], and that the model returns logits [batch, seq, vocab].
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from ...errors import JfigError, ShapeError, SiteError
from ...sites import parse_site, sort_sites

PROBE_BATCH, PROBE_SEQ = 2, 3        # distinct sizes, so a swapped batch / sequence axis is caught


class Wrapped(NamedTuple):
    """The arguments of `Model.from_function` for a wrapped framework model."""

    apply: Callable                  # apply(params, tokens [batch, seq], hook) -> logits [batch, seq, vocab]
    params: Any                      # pytree of arrays (the framework's own state types)
    sites: tuple[str, ...]           # forward order
    site_widths: dict[str, int | None]
    vocab_size: int


def check_site_map(sites: Any, what: str) -> dict:
    """`sites` as a non-empty dict {site name: spec} with string names."""
    if not isinstance(sites, Mapping) or not sites:
        raise JfigError(f"{what} needs sites={{jfig site name: {_SPEC_HINT[what]}}}, e.g. "
                        f"{{'blocks.0.hook_resid_post': {_EXAMPLE[what]}}}; got {sites!r}")
    bad = [k for k in sites if not isinstance(k, str)]
    if bad:
        raise SiteError(f"site names are strings such as 'blocks.0.hook_resid_post', got {bad!r}")
    return dict(sites)


_SPEC_HINT = {"from_flax": "submodule path or predicate(path, module)",
              "from_penzai": "selector function model -> pz.Selection, or a keypath string"}
_EXAMPLE = {"from_flax": "'layers.0'", "from_penzai": "'.body.sublayers[1]'"}


def order_sites(names, site_order=None) -> tuple[str, ...]:
    """The site names in forward order: `site_order` when given (a permutation of `names`), else the
    TransformerLens order, which needs every name to be a TransformerLens hook name."""
    names = tuple(names)
    if site_order is not None:
        order = tuple(site_order)
        if sorted(order) != sorted(names) or len(set(order)) != len(order):
            raise SiteError(f"site_order must list each site of the mapping once: the mapping has "
                            f"{sorted(names)}, site_order has {list(order)}")
        return order
    other = []
    for n in names:
        try:
            parse_site(n)
        except SiteError:
            other.append(n)
    if other:
        raise SiteError(f"site(s) {other} are not TransformerLens-style names (hook_embed or "
                        f"'blocks.{{layer}}.hook_resid_post', 'blocks.{{layer}}.hook_attn_out', ...), so jfig cannot "
                        f"tell their forward order: rename them, or pass site_order=(...) listing every site in the "
                        f"order the model reaches them")
    return sort_sites(names)


class Recorder:
    """A hook that records which sites a run reaches, in order, and the shape at each."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []

    def __call__(self, site: str, x):
        self.calls.append((site, tuple(x.shape)))
        return x


def probe(apply: Callable, params, order: tuple[str, ...], where: Mapping[str, str]) -> tuple[dict, int]:
    """One abstract run on tokens [2, 3]: ({site: width}, vocab size), after checking that every site in
    `order` is reached exactly once, in that order, with activations [batch, seq, ...] (attention
    patterns: [batch, ...]), and that the output is logits [batch, seq, vocab]. `where` names each
    site's place in the model for the messages."""
    rec = Recorder()
    tokens = jax.ShapeDtypeStruct((PROBE_BATCH, PROBE_SEQ), jnp.int32)
    out = jax.eval_shape(lambda p, t: apply(p, t, rec), params, tokens)
    reached = [s for s, _ in rec.calls]
    for s in order:
        n = reached.count(s)
        if n != 1:
            raise SiteError(f"site {s!r} ({where[s]}) is reached {n} times in one forward pass; a site must be "
                            f"reached exactly once (a submodule that is never called, or one called several "
                            f"times, such as a shared layer, cannot be a site)")
    if tuple(reached) != order:
        raise SiteError(f"the model reaches its sites in the order {reached}, but their names put them in the "
                        f"order {list(order)}; map each name to the place it describes (or fix site_order)")
    widths = {}
    for s, shape in rec.calls:
        pattern = s.endswith("hook_pattern")
        if len(shape) < (2 if pattern else 3) or shape[0] != PROBE_BATCH or (not pattern and shape[1] != PROBE_SEQ):
            raise ShapeError(f"site {s!r} ({where[s]}): on tokens [{PROBE_BATCH}, {PROBE_SEQ}] the activations have "
                             f"shape {shape}; expected [batch, seq, ...] = ({PROBE_BATCH}, {PROBE_SEQ}, ...)")
        widths[s] = None if pattern else math.prod(shape[2:])
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 3 or out.shape[:2] != (PROBE_BATCH, PROBE_SEQ):
        got = out.shape if isinstance(out, jax.ShapeDtypeStruct) else type(out).__name__
        raise ShapeError(f"on tokens [{PROBE_BATCH}, {PROBE_SEQ}] the model returned {got}; expected one array of "
                         f"logits [batch, seq, vocab] = ({PROBE_BATCH}, {PROBE_SEQ}, vocab)")
    return widths, int(out.shape[2])


def not_one_array(site: str, where: str, value: Any) -> SiteError:
    """The error for a site whose value is not one array."""
    kind = type(value).__name__
    if isinstance(value, (tuple, list)):
        kind = f"a {kind} of {len(value)} values"
    elif isinstance(value, Mapping):
        kind = f"a {kind} with keys {list(value)}"
    return SiteError(f"site {site!r}: {where} gives {kind}, not a single array; map the site to a layer whose "
                     f"output is one activation array [batch, seq, ...]")
