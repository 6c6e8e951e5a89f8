"""The jitted core: effects of a chunk of sources on every target, from a cached prefix.

For each source c (vmapped) and each of its M inputs, the source site's activations are
edited, the suffix runs to the last target site, and every target feature is read and
reduced over the positions the position mode selects. Clamp, ablation and mean-ablation
are finite differences of suffix runs; the Jacobian is one forward-mode `jvp`.

Every method estimates the same quantity with the same sign and unit: the change of target j
per unit increase of source i (positive = excitatory).

- clamp:        (f_j(α_hi) − f_j(α_lo)) / (α_hi − α_lo)
- ablate:       (f_j(clean) − f_j(i → 0)) / (f_i − 0)
- mean_ablate:  (f_j(clean) − f_j(i → mean_i)) / (f_i − mean_i)
- jacobian:     ∂f_j/∂α_i at the natural operating point (jacobian_direct: attention patterns and
                norm scales frozen)

f_i is the source's clean activation averaged over the clamped positions of that input; an input
whose source change is (near) zero carries no information about the slope and is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp

from ..edits import Steer
from ..models.model import Prefix
from .sources import later_sites

METHODS = ("clamp", "ablate", "mean_ablate", "jacobian", "jacobian_direct")
POSITION_MODES = ("same", "later", "all")
CLAMP_AT = ("single", "all_active")       # one position per input (the source's strongest), or every active one
READS = ("post", "pre")                   # target after its activation function, or its encoder pre-activation
INPUT_MODES = ("source", "target_active")  # every chosen input, or only those where the target is active (per pair)
MIN_SOURCE_CHANGE = 1e-6                  # |Δf_i| below this: the input says nothing about the slope


@dataclass(frozen=True)
class Plan:
    """Static description of one sweep (hashable; part of the jit cache key)."""

    source_site: str
    target_sites: tuple[str, ...]
    method: str
    positions: str = "same"
    clamp_at: str = "single"          # "single": the source's strongest position; "all_active": every active one
    builtin: bool = True              # prefix caching available
    direction: str = "decoder"        # "decoder": d_i; "random": a random direction with d_i's norm (null control)
    read: str = "post"
    inputs: str = "source"
    sparse: bool = True               # run only the clamped position where that gives the same numbers

    @property
    def position_sparse(self) -> bool:
        """Whether the suffix runs only the clamped token: a built-in model (a key/value cache of the
        clean run), one clamp position per input and targets read there. With causal attention the
        positions before the clamp are unchanged at every layer, so the clamped token attending to
        their cached keys/values gives exactly the full suffix's values at that position."""
        return self.sparse and self.builtin and self.clamp_at == "single" and self.positions == "same"

    @property
    def needs_clean(self) -> bool:
        """Whether the clean target activations are needed (which targets are active), beyond the
        runs the method itself makes."""
        return self.method == "clamp" and (self.read == "post" or self.inputs == "target_active")

    @property
    def stop_site(self) -> str:
        return self.target_sites[-1]

    @property
    def freeze(self) -> bool:
        return self.method == "jacobian_direct"


def clamp_mask(fi, clamp_at: str):
    """Where the source is edited: fi [M, S] -> float mask [M, S] (single: its strongest position)."""
    active = fi > 0
    if clamp_at == "single":
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
    """(values, active), each [M, n_targets]: the mean over read positions of every target (its
    activation, or its encoder pre-activation when plan.read == "pre"), and whether the target's
    activation is non-zero at any read position."""
    denom = jnp.maximum(rmask.sum(-1, keepdims=True), 1.0)
    vals, act = [], []
    for site, sae, cols in zip(plan.target_sites, saes, tcols):
        pre = sae.pre_activations(cache[site])          # [M, S, d_sae]
        f = jnp.take(sae.activation(pre), cols, axis=-1)   # [M, S, n_t]
        v = f if plan.read == "post" else jnp.take(pre, cols, axis=-1)
        vals.append(jnp.einsum("ms,msn->mn", rmask, v) / denom)
        act.append(jnp.einsum("ms,msn->mn", rmask, (f > 0).astype(f.dtype)) > 0)
    return jnp.concatenate(vals, axis=-1), jnp.concatenate(act, axis=-1).astype(jnp.float32)


def run_targets(model, plan: Plan, acts, resid, tokens, delta, kv=None, positions=None, later=()):
    """Target-site activations after adding `delta` [M, S, d] at the source site (and each (site, delta)
    of `later`, a cross-layer transcoder's writes further on). Position-sparse (kv: the clean KVCache
    [L, M, T, g, e], positions [M, S] the absolute positions of the S rows): only those rows run,
    attending to the cached keys/values of earlier positions."""
    extra = tuple(Steer(site, d, 1.0) for site, d in later)
    if plan.builtin:
        out = model.run_suffix(Prefix(plan.source_site, acts + delta, resid, kv), edits=extra,
                               capture=plan.target_sites, stop_at=plan.stop_site, freeze=plan.freeze,
                               positions=positions)
    else:
        out = model.run(tokens, edits=(Steer(plan.source_site, delta, 1.0),) + extra, capture=plan.target_sites,
                        stop_at=plan.stop_site, freeze=plan.freeze)
    return out.cache



def random_direction(direction, feature, seed: int):
    """The null control's direction: one random unit direction per (seed, feature), scaled at every
    position to the norm `direction` [M, S, ...] has there (same shape as `direction`)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), feature)
    r = jax.random.normal(key, direction.shape[2:])
    r = r / jnp.linalg.norm(r)
    lead = direction.shape[:2]
    norms = jnp.sqrt(jnp.sum(direction.reshape(*lead, -1) ** 2, -1))
    return norms.reshape(lead + (1,) * (direction.ndim - 2)) * r


def at_clamp_position(fi, *arrays):
    """The position-sparse view of one input batch: the clamp position p [M] (the source's strongest,
    as clamp_mask "single" picks it) and each array [M, S, ...] (None passes through) at p, as
    [M, 1, ...]."""
    p = jnp.argmax(fi, axis=-1)
    rows = jnp.arange(fi.shape[0])
    return p, tuple(None if a is None else a[rows, p][:, None] for a in arrays)


def input_cache(kv_all, i):
    """The clean KVCache of inputs i [M] from the prefix cache kv_all ([L, N, T, g, e] each), or None."""
    return None if kv_all is None else type(kv_all)(kv_all.k[:, i], kv_all.v[:, i])


def source_effects(model, plan: Plan, src_sae, tgt_saes, tcols, acts, resid, tokens, fi, feature, alpha_lo, alpha_hi,
                   kv=None, seed=0):
    """Per-input effects of one source on all targets: (slopes [M, n_t], valid [M], active [M, n_t]).

    acts [M, S, d] source-site activations, fi [M, S] the source's activation. `active` says where
    each target was active in the clean run (NaN when the method makes no clean run). With
    plan.position_sparse and kv (the inputs' clean KVCache) only the clamped token is run. seed (an int
    or a traced int32, so a new seed does not recompile): the random direction's seed.
    """
    positions = None
    if plan.position_sparse:
        p, (acts, resid, fi) = at_clamp_position(fi, acts, resid, fi)
        positions = p[:, None]
    extra = (1,) * (acts.ndim - 3)                          # hook_z sites: [M, S, heads, d_head]
    cm = clamp_mask(fi, plan.clamp_at)
    rm = read_mask(cm, plan.positions)
    stats = src_sae.encode_with_stats(acts)[1]
    direction = src_sae.decode_direction(feature, stats)
    later = tuple(zip(later_sites(src_sae), src_sae.later_directions(feature))) if later_sites(src_sae) else ()
    # a cross-layer transcoder also writes later sites: (site, decoder row) each, scaled by the same change
    if acts.ndim == 4 and direction.shape[-2:] != acts.shape[-2:]:
        direction = direction.reshape(*direction.shape[:-1], *acts.shape[-2:])
    direction = jnp.broadcast_to(direction, acts.shape)
    if plan.direction == "random":                          # later writes: their own random directions
        direction = random_direction(direction, feature, seed)
        later = tuple((s, random_direction(jnp.broadcast_to(d, acts.shape), feature, seed + 1 + k))
                      for k, (s, d) in enumerate(later))
    valid = (rm.sum(-1) > 0).astype(jnp.float32)
    unknown = jnp.full((acts.shape[0], sum(len(c) for c in tcols)), jnp.nan)

    def values(coef):                        # coef [M, S]: the source's change at each position
        c = coef.reshape(coef.shape + extra)[..., None]
        writes = tuple((s, c * d) for s, d in later)
        return read_targets(plan, tgt_saes, tcols,
                            run_targets(model, plan, acts, resid, tokens, c * direction, kv, positions, writes), rm)

    def coef_at(alpha):
        return cm * (alpha - fi)

    if plan.method in ("jacobian", "jacobian_direct"):
        (_, active), (d, _) = jax.jvp(values, (jnp.zeros_like(cm),), (cm,))
        return d, valid, active
    if plan.method == "clamp":
        coefs = [coef_at(alpha_hi), coef_at(alpha_lo)] + ([jnp.zeros_like(cm)] if plan.needs_clean else [])
        v, act = jax.vmap(values)(jnp.stack(coefs))
        return (v[0] - v[1]) / (alpha_hi - alpha_lo), valid, act[2] if plan.needs_clean else unknown
    # ablate: clamp to 0; mean_ablate: clamp to the feature's mean (alpha_lo carries it). The slope divides
    # by the source's own change on that input, so it has the sign and unit of the clamp's.
    target = 0.0 if plan.method == "ablate" else alpha_lo
    v, act = jax.vmap(values)(jnp.stack([jnp.zeros_like(cm), coef_at(target)]))
    change = (cm * (fi - target)).sum(-1) / jnp.maximum(cm.sum(-1), 1.0)      # [M]: f_i − target
    ok = jnp.abs(change) > MIN_SOURCE_CHANGE
    slope = (v[0] - v[1]) / jnp.where(ok, change, 1.0)[:, None]
    return slope, valid * ok, act[0]


def weighted_stats(e, w):
    """(n, mean, m2) of per-input values e [M, T] with weights w [M] or [M, T] (0 drops an input):
    n is [] for w [M], [T] for per-pair weights; mean and m2 are [T]."""
    w2 = w if w.ndim == 2 else w[:, None]
    n = w.sum(0)
    mean = (w2 * e).sum(0) / jnp.maximum(w2.sum(0), 1.0)
    return n, mean, (w2 * (e - mean) ** 2).sum(0)


def pair_weights(plan: Plan, w, active):
    """Per-pair input weights [M, T]: the input weights w [M], restricted to inputs where the target
    was active in the clean run when plan.inputs == "target_active"."""
    w2 = jnp.broadcast_to(w[:, None], active.shape)
    return w2 * jnp.nan_to_num(active, nan=1.0) if plan.inputs == "target_active" else w2


@eqx.filter_jit
def chunk_effects(model, plan: Plan, src_sae, tgt_saes, tcols, acts_all, resid_all, tokens_all, fvals_all,
                  idx, weight, cols, feats, alpha_lo, alpha_hi, keep_per_input: bool, kv_all=None, seed=None):
    """A chunk of C sources: (n [C, T], mean [C, T], m2 [C, T], per_input [C, M, T] or None,
    pair weights [C, M, T] or None, target-active fraction [C, T]).

    idx/weight [C, M] pick each source's inputs from the cached prefix (acts_all [N, S, d]);
    cols [C] index the source's column in fvals_all [N, S, n_src]. Statistics are accumulated
    with weights so padded inputs and inputs with nothing to read count for nothing. kv_all: the
    clean KVCache of every input ([L, N, S, g, e]) for a position-sparse plan, else None. seed: an int32
    array, the random direction's seed (traced: blocks with different seeds share one compilation).
    """

    def one(i, w, col, feat, lo, hi):
        acts = acts_all[i]
        resid = None if resid_all is None else resid_all[i]
        toks = None if tokens_all is None else tokens_all[i]
        fi = fvals_all[i, :, col]
        e, valid, active = source_effects(model, plan, src_sae, tgt_saes, tcols, acts, resid, toks, fi, feat, lo, hi,
                                          input_cache(kv_all, i), 0 if seed is None else seed)
        wv = w * valid                                              # [M]
        w2 = pair_weights(plan, wv, active)                         # [M, T]
        frac = (wv[:, None] * active).sum(0) / jnp.maximum(wv.sum(), 1.0)
        return (*weighted_stats(e, w2), e, w2, frac)

    n, mean, m2, e, w2, frac = jax.vmap(one)(idx, weight, cols, feats, alpha_lo, alpha_hi)
    return n, mean, m2, (e if keep_per_input else None), (w2 if keep_per_input else None), frac
