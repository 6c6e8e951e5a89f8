"""measure_effects: causal effects of source features on every target feature.

Design (docs/measure.md): the prefix up to the source site runs once per input batch;
the suffix is vmapped over a chunk of sources (and α levels) inside one jit, stopping at
the last target site; chunks are sized from a memory budget and padded so nothing
recompiles; the source axis is sharded over all local devices when there are several.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..data.progress import progress_bar
from ..errors import JfigError
from ..sites import site_key
from .engine import CLAMP_AT, INPUT_MODES, METHODS, POSITION_MODES, READS, Plan, chunk_effects
from .prefix import CleanPrefix, prefix_pass
from .reverse import reverse_effects
from .sources import check_dictionaries, clamp_source, edit_site, later_sites
from .select import auto_chunk, bytes_per_source, choose_inputs, nonzero_quantiles
from .types import Effects, FeatureList, feature_list, store_stats


def default_targets(saes: dict, source_sites) -> FeatureList:
    """Every feature of every SAE at or after the earliest source site."""
    first = min(site_key(s) for s in source_sites)
    spec = {s: np.arange(sae.d_sae) for s, sae in sorted(saes.items(), key=lambda kv: site_key(kv[0]))
            if site_key(s) >= first}
    return feature_list(spec, saes)


def clamp_levels(method, vals_np, alphas, atlas_q):
    """(alpha_lo, alpha_hi, median) per source, [n] each; for mean_ablate alpha_lo is the mean."""
    flat = vals_np.reshape(-1, vals_np.shape[-1])
    q = atlas_q if atlas_q is not None else nonzero_quantiles(flat)
    lo, med, hi = q[:, 0], q[:, 1], q[:, 2]
    if alphas is not None:
        a = np.asarray(alphas, np.float32)
        a = np.broadcast_to(a, (flat.shape[1], 2)) if a.ndim <= 1 else a
        lo, hi = a[:, 0], a[:, 1]
    if method == "clamp":
        bad = np.isfinite(lo) & np.isfinite(hi) & (hi <= lo)
        hi = np.where(bad, lo + np.maximum(np.abs(lo), 1.0) * 0.5, hi)  # degenerate quantiles: widen
    if method == "mean_ablate":
        lo = flat.mean(0)
    return (np.nan_to_num(lo).astype(np.float32), np.nan_to_num(hi, nan=1.0).astype(np.float32),
            np.nan_to_num(med, nan=np.inf).astype(np.float32))


def _mesh_put(arrays, n_dev):
    if n_dev <= 1:
        return arrays
    mesh = Mesh(np.asarray(jax.devices()[:n_dev]), ("sources",))
    return [jax.device_put(a, NamedSharding(mesh, P("sources", *([None] * (a.ndim - 1))))) for a in arrays]


def measure_effects(model, saes, sources, tokens, *, method: str = "clamp", positions: str = "same",
                    targets=None, inputs_per_source: int = 32, alphas=None, atlas=None, clamp_at: str = "single",
                    read: str = "post", inputs: str = "source",
                    batch_size: int = 32, memory_budget: float = 2e9, chunk_size: int | None = None,
                    keep_per_input: bool = False, devices: int | None = None, seed: int = 0,
                    direction: str = "decoder", mode: str = "auto", sparse: bool = True,
                    clean: CleanPrefix | None = None, progress: bool = True) -> Effects:
    """Effects of each source feature on every target feature, averaged over inputs.

    model: a jfig Model; saes: SAEs (list or {site: SAE}); sources: (site, feature) pairs or
    {site: features}; tokens: int [N, seq]. Every method estimates the change of target j per unit
    increase of source i (positive: excitatory): "clamp" (finite difference between α_hi and α_lo,
    divided by their gap), "ablate" ((clean − ablated) / f_i), "mean_ablate" ((clean − mean-ablated)
    / (f_i − mean_i)), "jacobian" (∂f_j/∂α_i by forward-mode jvp) or "jacobian_direct" (the same with
    attention patterns and norm scales frozen).
    clamp_at: "single" (one position per input, where the source is strongest) or "all_active"
    (every position where it fires, at once: attention-carried effects of earlier clamps mix in).
    read: "post" (the target's activation) or "pre" (its encoder pre-activation, which can go below
    zero: inhibition of an inactive target, and no TopK competition inside the target SAE).
    inputs: "source" (every chosen input) or "target_active" (per pair, only inputs where the
    target is active in the clean run).
    mode (Jacobian methods): "forward" (one jvp per source), "reverse" (one vjp per target and
    position, shared by all sources) or "auto" (reverse when n_targets × seq < n_sources).
    direction: "decoder" (d_i) or "random" (a random direction with d_i's norm: the null control).
    sparse: with positions="same" and clamp_at="single" on a built-in model, run only the clamped
    token through the suffix, attending to the clean keys/values of earlier positions (the same
    numbers as the full suffix, about seq_len times less suffix work); False runs every position.
    clean: a CleanPrefix of these tokens (`jfig.measure.clean_prefix`), so the prefix is not run
    again for every call on the same tokens.
    positions: "same" (read where the source was clamped), "later" (only at later, unclamped
    positions), "all" (every position from the first clamp on). Each source is measured on up
    to `inputs_per_source` inputs where it fires above its median; α levels default to its
    10th/90th percentiles of non-zero activations (from `atlas` if given, else these inputs).

    Returns Effects with mean/var/n [n_sources, n_targets].

    >>> eff = measure_effects(model, [sae8, sae12], {"blocks.8.hook_resid_post": [3, 17]}, tokens)
    >>> eff.mean.shape                     # (2, d_sae8 + d_sae12)
    """
    if method not in METHODS:
        raise JfigError(f"unknown method {method!r}; expected one of {METHODS}")
    if mode not in ("auto", "forward", "reverse"):
        raise JfigError(f"unknown mode {mode!r}; expected 'auto', 'forward' or 'reverse'")
    if direction not in ("decoder", "random"):
        raise JfigError(f"unknown direction {direction!r}; expected 'decoder' or 'random'")
    if positions not in POSITION_MODES:
        raise JfigError(f"unknown positions mode {positions!r}; expected one of {POSITION_MODES}")
    for name, value, allowed in (("clamp_at", clamp_at, CLAMP_AT), ("read", read, READS), ("inputs", inputs, INPUT_MODES)):
        if value not in allowed:
            raise JfigError(f"unknown {name} {value!r}; expected one of {allowed}")
    saes = check_dictionaries(model, saes)
    src = feature_list(sources, saes)
    if len(src) == 0:
        raise JfigError("no source features given")
    tgt = feature_list(targets, saes) if targets is not None else default_targets(
        saes, [edit_site(saes[s]) for s in src.unique_sites()])
    tokens = model.check_tokens(tokens)
    builtin = model.apply_fn is None
    n_dev = devices if devices is not None else len(jax.local_devices())
    mean = np.full((len(src), len(tgt)), np.nan, np.float32)
    var = np.full_like(mean, np.nan)
    count = np.zeros_like(mean)
    alph = np.zeros((len(src), 2), np.float32)
    per_input = np.zeros((len(src), inputs_per_source, len(tgt)), np.float32) if keep_per_input else None
    pair_w = np.zeros_like(per_input) if keep_per_input and inputs == "target_active" else None
    active = np.full_like(mean, np.nan)
    in_w = np.zeros((len(src), inputs_per_source), np.float32)
    in_idx = np.zeros((len(src), inputs_per_source), np.int32)
    bar = progress_bar(len(src), desc=f"measure {method}", unit="src", enabled=progress)
    for site in sorted(src.unique_sites(), key=site_key):
        rows = src.at(site)
        start = edit_site(saes[site])          # a transcoder's features are clamped where it writes
        tsites = tuple(s for s in tgt.unique_sites() if site_key(s) >= site_key(start))
        if not tsites:
            bar.update(len(rows))
            continue
        tsites = tuple(sorted(tsites, key=site_key))
        tcols_idx = [tgt.at(s) for s in tsites]
        tcols = tuple(jnp.asarray(tgt.features[c], jnp.int32) for c in tcols_idx)
        tgt_saes = tuple(saes[s] for s in tsites)
        source = clamp_source(saes[site], tsites[-1])
        plan = Plan(start, tsites, method, positions, clamp_at, builtin, direction, read, inputs, sparse)
        feats = src.features[rows]
        n_t = sum(len(c) for c in tcols_idx)
        use_reverse = method.startswith("jacobian") and direction == "decoder" and inputs == "source" and (
            mode == "reverse" or (mode == "auto" and n_t * tokens.shape[1] < len(rows)))
        if use_reverse and later_sites(source):
            if mode == "reverse":
                raise JfigError(f"mode='reverse' does not support the cross-layer transcoder at {site} as a source "
                                f"(it writes {len(later_sites(source)) + 1} sites); use mode='forward' or 'auto'")
            use_reverse = False
        acts, resid, vals, kv = prefix_pass(model, source, feats, tokens, batch_size, builtin,
                                            cache=plan.position_sparse and not use_reverse, clean=clean)
        vals_np = np.asarray(vals)
        atlas_q = atlas.alpha_levels(site)[feats] if atlas is not None else None   # [n, 3]: 10/50/90 %
        a_rows = None if alphas is None else (np.asarray(alphas) if np.ndim(alphas) <= 1 else np.asarray(alphas)[rows])
        lo, hi, med = clamp_levels(method, vals_np, a_rows, atlas_q)
        idx, wgt = choose_inputs(vals_np.max(axis=1), med, inputs_per_source, seed)
        alph[rows] = np.stack([lo, hi], -1)
        in_w[rows], in_idx[rows] = wgt, idx
        S = tokens.shape[1]
        c = chunk_size or auto_chunk(bytes_per_source(model.config, method, inputs_per_source, S,
                                                      [t.d_sae for t in tgt_saes], sparse=kv is not None),
                                     memory_budget, len(rows), n_dev)
        if n_dev > 1:
            c = max(n_dev, int(math.ceil(c / n_dev)) * n_dev)
        toks_all = None if builtin else tokens
        order = np.concatenate([np.concatenate(tcols_idx)])
        if use_reverse:
            n, mu, m2, e, wv = reverse_effects(model, plan, source, tgt_saes, tcols, acts, resid, toks_all, vals,
                                               feats, idx, wgt, batch=min(8, batch_size))
            store_stats(mean, var, count, rows, order, n, mu, m2)
            if keep_per_input:
                per_input[np.ix_(rows, np.arange(inputs_per_source), order)] = e
                in_w[rows] = wv
            bar.update(len(rows))
            continue
        for start in range(0, len(rows), c):
            sl = np.arange(start, min(start + c, len(rows)))
            pad = np.concatenate([sl, np.full(c - len(sl), sl[-1])])   # fixed chunk shape: no recompiles
            wpad = wgt[pad] * (np.arange(c) < len(sl))[:, None]
            args = _mesh_put([jnp.asarray(idx[pad]), jnp.asarray(wpad), jnp.asarray(pad, jnp.int32),
                              jnp.asarray(feats[pad], jnp.int32), jnp.asarray(lo[pad]), jnp.asarray(hi[pad])], n_dev)
            n, mu, m2, e, w2, frac = chunk_effects(model, plan, source, tgt_saes, tcols, acts, resid, toks_all,
                                                   vals, *args, keep_per_input, kv, jnp.asarray(seed, jnp.int32))
            n, mu, m2 = np.asarray(n)[: len(sl)], np.asarray(mu)[: len(sl)], np.asarray(m2)[: len(sl)]
            r = rows[sl]
            store_stats(mean, var, count, r, order, n, mu, m2)
            active[np.ix_(r, order)] = np.asarray(frac)[: len(sl)]
            if keep_per_input:
                w2 = np.asarray(w2)[: len(sl)]
                per_input[np.ix_(r, np.arange(inputs_per_source), order)] = np.asarray(e)[: len(sl)]
                in_w[r] = w2.max(-1) if w2.shape[-1] else 0.0
                if pair_w is not None:
                    pair_w[np.ix_(r, np.arange(inputs_per_source), order)] = w2
            bar.update(len(sl))
    bar.close()
    return Effects(mean=mean, var=var, n=count, sources=src, targets=tgt, method=method, positions=positions,
                   alphas=alph, per_input=per_input, input_weight=in_w, input_index=in_idx,
                   options=dict(inputs_per_source=inputs_per_source, clamp_at=clamp_at, seed=seed, direction=direction,
                                read=read, inputs=inputs),
                   pair_weight=pair_w, target_active=active)
