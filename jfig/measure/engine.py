"""The jitted core: effects of a chunk of sources on every target, from a cached prefix.

For each source c (vmapped) and each of its M inputs, the source site's activations are
edited, the suffix runs to the last target site, and every target feature is read and
reduced over the positions the position mode selects. Clamp, ablation and mean-ablation
are finite differences of two suffix runs; the Jacobian is one forward-mode `jvp`.
"""
from __future__ import annotations

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp

from ..edits import Steer
from ..models.model import Prefix

METHODS = ("clamp", "ablate", "mean_ablate", "jacobian", "jacobian_direct")
POSITION_MODES = ("same", "later", "all")


@dataclass(frozen=True)
class Plan:
    """Static description of one sweep (hashable; part of the jit cache key)."""

    source_site: str
    target_sites: tuple[str, ...]
    method: str
    positions: str = "same"
    clamp_at: str = "active"          # "active": every position where the source fires; "argmax": its strongest
    builtin: bool = True              # prefix caching available
    direction: str = "decoder"        # "decoder": d_i; "random": a random direction with d_i's norm (null control)
    direction_seed: int = 0

    @property
    def stop_site(self) -> str:
        return self.target_sites[-1]

    @property
    def freeze(self) -> bool:
        return self.method == "jacobian_direct"


def clamp_mask(fi, clamp_at: str):
    """Where the source is edited: fi [M, S] -> float mask [M, S]."""
    active = fi > 0
    if clamp_at == "argmax":
        one = jax.nn.one_hot(jnp.argmax(fi, axis=-1), fi.shape[-1], dtype=bool)
        active = one & active.any(-1, keepdims=True)
    return active.astype(jnp.float32)


def read_mask(cmask, mode: str):
    """Where targets are read, from the clamp mask [M, S]: same / later / all (from the first clamp on)."""
    started = jnp.cumsum(cmask, axis=-1) > 0
    if mode == "same":
        return cmask
    if mode == "later":
        return (started & (cmask == 0)).astype(jnp.float32)
    return started.astype(jnp.float32)


def read_targets(plan: Plan, saes: tuple, tcols: tuple, cache: dict, rmask):
    """Mean over read positions of every target feature: [M, n_targets]."""
    denom = jnp.maximum(rmask.sum(-1, keepdims=True), 1.0)
    outs = []
    for site, sae, cols in zip(plan.target_sites, saes, tcols):
        f = sae.encode(cache[site])                     # [M, S, d_sae]
        f = jnp.take(f, cols, axis=-1)                  # [M, S, n_t]
        outs.append(jnp.einsum("ms,msn->mn", rmask, f) / denom)
    return jnp.concatenate(outs, axis=-1)


def run_targets(model, plan: Plan, acts, resid, tokens, delta):
    """Target-site activations after adding `delta` [M, S, d] at the source site."""
    if plan.builtin:
        out = model.run_suffix(Prefix(plan.source_site, acts + delta, resid), capture=plan.target_sites,
                               stop_at=plan.stop_site, freeze=plan.freeze)
    else:
        out = model.run(tokens, edits=(Steer(plan.source_site, delta, 1.0),), capture=plan.target_sites,
                        stop_at=plan.stop_site, freeze=plan.freeze)
    return out.cache


def source_effects(model, plan: Plan, src_sae, tgt_saes, tcols, acts, resid, tokens, fi, feature, alpha_lo, alpha_hi):
    """Per-input effects of one source on all targets: ([M, n_targets], valid [M]).

    acts [M, S, d] source-site activations, fi [M, S] the source's activation.
    """
    extra = (1,) * (acts.ndim - 3)                          # hook_z sites: [M, S, heads, d_head]
    cm = clamp_mask(fi, plan.clamp_at)
    rm = read_mask(cm, plan.positions)
    stats = src_sae.encode_with_stats(acts)[1]
    direction = src_sae.decode_direction(feature, stats)
    if acts.ndim == 4 and direction.shape[-2:] != acts.shape[-2:]:
        direction = direction.reshape(*direction.shape[:-1], *acts.shape[-2:])
    direction = jnp.broadcast_to(direction, acts.shape)
    if plan.direction == "random":
        key = jax.random.fold_in(jax.random.PRNGKey(plan.direction_seed), feature)
        r = jax.random.normal(key, acts.shape[2:])
        r = r / jnp.linalg.norm(r)
        norms = jnp.sqrt(jnp.sum(direction.reshape(*acts.shape[:2], -1) ** 2, -1)).reshape(acts.shape[:2] + extra)
        direction = norms[..., None] * r
    valid = (rm.sum(-1) > 0).astype(jnp.float32)
    cmx, fix = cm.reshape(cm.shape + extra), fi.reshape(fi.shape + extra)

    def values(delta):
        return read_targets(plan, tgt_saes, tcols, run_targets(model, plan, acts, resid, tokens, delta), rm)

    def delta_at(alpha):
        return (cmx * (alpha - fix))[..., None] * direction

    if plan.method in ("jacobian", "jacobian_direct"):
        tangent = cmx[..., None] * direction
        _, d = jax.jvp(values, (jnp.zeros_like(acts),), (tangent,))
        return d, valid
    if plan.method == "clamp":
        both = jax.vmap(values)(jnp.stack([delta_at(alpha_hi), delta_at(alpha_lo)]))
        return (both[0] - both[1]) / (alpha_hi - alpha_lo), valid
    # ablate: clamp to 0; mean_ablate: clamp to the feature's mean (alpha_lo carries it)
    target = 0.0 if plan.method == "ablate" else alpha_lo
    both = jax.vmap(values)(jnp.stack([delta_at(target), jnp.zeros_like(acts)]))
    return both[0] - both[1], valid


def weighted_stats(e, w):
    """(n, mean [T], m2 [T]) of per-input values e [M, T] with weights w [M] (0 drops an input)."""
    n = w.sum()
    mean = (w[:, None] * e).sum(0) / jnp.maximum(n, 1.0)
    return n, mean, (w[:, None] * (e - mean) ** 2).sum(0)


@eqx.filter_jit
def chunk_effects(model, plan: Plan, src_sae, tgt_saes, tcols, acts_all, resid_all, tokens_all, fvals_all,
                  idx, weight, cols, feats, alpha_lo, alpha_hi, keep_per_input: bool):
    """A chunk of C sources: (sum_w [C, T], mean [C, T], m2 [C, T], per_input or None).

    idx/weight [C, M] pick each source's inputs from the cached prefix (acts_all [N, S, d]);
    cols [C] index the source's column in fvals_all [N, S, n_src]. Statistics are accumulated
    with weights so padded inputs and inputs with nothing to read count for nothing.
    """

    def one(i, w, col, feat, lo, hi):
        acts = acts_all[i]
        resid = None if resid_all is None else resid_all[i]
        toks = None if tokens_all is None else tokens_all[i]
        fi = fvals_all[i, :, col]
        e, valid = source_effects(model, plan, src_sae, tgt_saes, tcols, acts, resid, toks, fi, feat, lo, hi)
        wv = w * valid                                              # [M]
        return (*weighted_stats(e, wv), e, wv)

    n, mean, m2, e, wv = jax.vmap(one)(idx, weight, cols, feats, alpha_lo, alpha_hi)
    return n, mean, m2, (e if keep_per_input else None), wv
