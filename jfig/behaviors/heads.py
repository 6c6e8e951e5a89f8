"""Attention heads that carry a behaviour, by patching clean and corrupted prompt pairs.

A behaviour is given as prompt pairs: `clean` and `corrupted` int32 [n, w] (right-padded, the same
shape, aligned position by position), `last` int [n] (each row's last real token, where the metric
is read) and `answer`, `distractor` int [n] (token ids). The metric is the logit difference
``logits[row, last, answer] - logits[row, last, distractor]``, averaged over rows.

- `PatchHeads`: an edit at a ``blocks.{l}.attn.hook_z`` site that replaces the z of the heads in a
  bool mask [n_heads] (a traced leaf: vmap over masks vectorises over heads).
- `head_patching`: per head, the share of the clean-to-corrupted change of the metric that patching
  that head's z alone (activation patching) or only its direct path to the logits (path patching)
  brings about.
- `edge_heads`: per head, the share of a cross-position SAE-feature edge's effect that goes through
  the head.

Built-in models only (`model.config` set): the runs restart mid-model at a head's layer and the
metric reads the final residual and the unembedding directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..edits import Ablate, PatchHeads
from ..errors import JfigError, ShapeError, SiteError
from ..models.layers import norm
from ..models.model import Prefix
from ..models.validation import check_saes, check_tokens
from ..sites import STAGE, block_site, site_key
from .metric import final_site, residual_logit_diff

__all__ = ["EdgeHeads", "HeadEffects", "can_carry", "edge_heads", "head_patching"]

_Z = "attn.hook_z"


# ----------------------------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class HeadEffects:
    """Per-head effects on the metric, [n_layers, n_heads] each.

    `activation`: (metric with the head's z patched from the corrupted run at every position - clean
    metric) / (corrupted metric - clean metric); `path_to_logits`: the same for the head's direct
    path to the logits alone. 1 means the head alone moves the metric all the way to the corrupted
    value. `activation_change` and `path_change` are the unnormalised changes of the metric.
    `clean_metric` and `corrupted_metric` are row means; `note` says why the normalised arrays are
    nan (the two metrics are too close to normalise by), else "".
    """

    activation: np.ndarray
    path_to_logits: np.ndarray
    activation_change: np.ndarray
    path_change: np.ndarray
    clean_metric: float
    corrupted_metric: float
    note: str = ""

    def top(self, k: int = 10, by: str = "activation") -> list[tuple[tuple[int, int], float]]:
        """The k heads with the largest |effect| (`by`: "activation" or "path_to_logits"), as
        ``((layer, head), value)``, largest first; nan effects come last."""
        if by not in ("activation", "path_to_logits"):
            raise JfigError(f"top(by=...) takes 'activation' or 'path_to_logits', got {by!r}")
        a = np.asarray(getattr(self, by))
        mag = np.where(np.isnan(a), -np.inf, np.abs(a)).ravel()
        order = np.argsort(-mag, kind="stable")[:max(0, int(k))]
        return [((int(i // a.shape[1]), int(i % a.shape[1])), float(a.ravel()[i])) for i in order]


class EdgeHeads(NamedTuple):
    """The heads that carry a cross-position edge (see `edge_heads`).

    `effect`: E, the mean change of the target at `last` when the source is ablated before `last`;
    `share` [k]: (E - E_h) / E per head; `blocked` [k]: E_h, the effect with the head held clean
    (equal to E for heads that cannot carry the edge); `heads`: the (layer, head) pairs;
    `note`: why `share` is nan (E too small to divide by), else "".
    """

    effect: float
    share: np.ndarray
    blocked: np.ndarray
    heads: tuple
    note: str = ""


# ----------------------------------------------------------------------------------------------- checks


def _require_builtin(model, what: str) -> None:
    if getattr(model, "config", None) is None:
        raise JfigError(f"{what} needs a built-in model (model.config set): it restarts runs at a head's layer and "
                        f"reads the model's attention output and unembedding weights, which a model wrapped with "
                        f"Model.from_function does not expose")


def _int_rows(x, n: int, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or a.shape[0] != n:
        raise ShapeError(f"{name} must be an int array [n] with one entry per prompt (n = {n}), got shape "
                         f"{tuple(a.shape)}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ShapeError(f"{name} must have an integer dtype, got {a.dtype}")
    return a.astype(np.int64)


def _check_tokens(model, tokens, what: str) -> np.ndarray:
    cfg = model.config
    max_len = cfg.max_seq_len if cfg.positional == "learned" else None
    return np.asarray(check_tokens(np.asarray(tokens) if isinstance(tokens, (list, tuple)) else tokens,
                                   model.vocab_size, max_len=max_len, allow_1d=False, what=what))


def _check_last(last, n: int, w: int) -> np.ndarray:
    last = _int_rows(last, n, "last")
    bad = np.flatnonzero((last < 0) | (last >= w))
    if bad.size:
        raise ShapeError(f"last[{bad[0]}] = {last[bad[0]]} is outside the prompt width: expected 0 <= last < {w}")
    return last


def _check_ids(ids, n: int, vocab: int, name: str) -> np.ndarray:
    ids = _int_rows(ids, n, name)
    bad = np.flatnonzero((ids < 0) | (ids >= vocab))
    if bad.size:
        raise ShapeError(f"{name}[{bad[0]}] = {ids[bad[0]]} is outside the vocabulary [0, {vocab})")
    return ids


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise JfigError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


def _tiny(x: float, scale: float) -> bool:
    return not np.isfinite(x) or abs(x) <= 1e-6 * max(1.0, scale)


# ----------------------------------------------------------------------------------------------- the metric


def _at_last(x, last):
    """x [b, s, ...] -> x[row, last[row]] [b, ...]."""
    return x[jnp.arange(x.shape[0]), last]


@partial(jax.jit, static_argnames=("capture",))
def _baseline(model, tokens, last, answer, distractor, *, capture):
    """One unedited run: the captured sites and the metric per row [b]."""
    out = model.run(tokens, capture=capture, logits=False)
    x = _at_last(out.cache[final_site(model)], last)
    return out.cache, residual_logit_diff(model.config, model.params, x, answer, distractor)


def _head_run(model, site, z_clean, resid_pre, z_corr, mask, last, answer, distractor):
    """The metric per row [b] with the heads in `mask` [H] patched to z_corr at `site`, from that
    layer's z onwards (everything before it is clean)."""
    final = final_site(model)
    out = model.run_suffix(Prefix(site, z_clean, resid_pre), edits=(PatchHeads(site, z_corr, mask),),
                           capture=(final,))
    return residual_logit_diff(model.config, model.params, _at_last(out.cache[final], last), answer, distractor)


@partial(jax.jit, static_argnames=("site",))
def _layer_activation(model, z_clean, resid_pre, z_corr, last, answer, distractor, *, site):
    """Activation patching of each head of one layer, vmapped over one-hot head masks: [H, b]."""
    masks = jnp.eye(z_clean.shape[2], dtype=bool)
    return jax.vmap(lambda m: _head_run(model, site, z_clean, resid_pre, z_corr, m, last, answer, distractor))(masks)


def _attn_out(cfg, blocks, layer, z):
    """The attention output [b, d] that z [b, H, hd] gives in `layer` (after the post-norm on Gemma-2)."""
    b = z.shape[0]
    out = z.reshape(b, -1).astype(jnp.float32) @ blocks["W_o"][layer]
    if cfg.o_bias:
        out = out + blocks["b_o"][layer]
    if cfg.post_norms:
        out = norm(cfg, out, blocks["ln_attn_post_w"][layer])
    return out


@jax.jit
def _layer_path(model, layer, z_clean, z_corr, x_last, answer, distractor):
    """Path patching h -> logits for each head of `layer` (traced): [H, b].

    The change of the layer's attention output at the metric position when only head h's z takes
    its corrupted value, added to the clean final residual there."""
    cfg, params = model.config, model.params
    base = _attn_out(cfg, params["blocks"], layer, z_clean)

    def one(mask):
        z = jnp.where(mask[:, None], z_corr, z_clean)
        delta = _attn_out(cfg, params["blocks"], layer, z) - base
        return residual_logit_diff(cfg, params, x_last + delta, answer, distractor)
    return jax.vmap(one)(jnp.eye(z_clean.shape[1], dtype=bool))


def _batches(n: int, batch_size: int):
    """(start, rows, padded index array) for fixed-size batches of n rows (padding repeats row 0)."""
    b = min(batch_size, n)
    for r in range(0, n, b):
        idx = np.arange(r, min(r + b, n))
        yield len(idx), np.concatenate([idx, np.zeros(b - len(idx), np.int64)])


def head_patching(model, clean, corrupted, last, answer, distractor, *, batch_size: int = 16) -> HeadEffects:
    """Activation patching and direct-path patching of every attention head.

    For head h of layer l, with the metric M (logit difference at `last`, mean over rows):

    - ``activation[l, h] = (M(clean run, z[l, h] from the corrupted run at every position) - M_clean)
      / (M_corrupted - M_clean)``;
    - ``path_to_logits[l, h]``: the same with only the head's direct path to the logits patched: the
      change of the head's output, ``(z_corr - z_clean)[h] @ W_O[h]`` (the head's rows of W_o; through
      the post-attention norm on Gemma-2), is added to the clean final residual, everything else
      clean.

    Inputs: `clean`, `corrupted` int [n, w]; `last`, `answer`, `distractor` int [n]. Each layer's
    heads are vmapped (one compilation per layer, reused by every batch and later call of the same
    shapes), so peak memory is about n_heads suffix runs of one batch: lower `batch_size` to fit.
    Rows are padded to full batches, so every batch has one shape. When the clean and corrupted
    metrics are too close to normalise by, the normalised arrays are nan and `note` says why.
    """
    _require_builtin(model, "head_patching")
    cfg = model.config
    batch_size = _check_batch_size(batch_size)
    clean = _check_tokens(model, clean, "clean")
    corrupted = _check_tokens(model, corrupted, "corrupted")
    if clean.shape != corrupted.shape:
        raise ShapeError(f"clean {clean.shape} and corrupted {corrupted.shape} must have the same shape [n, w]: "
                         f"prompts are aligned position by position")
    n, w = clean.shape
    if n == 0:
        raise ShapeError("clean and corrupted hold no prompts; expected at least one row")
    last = _check_last(last, n, w)
    answer = _check_ids(answer, n, model.vocab_size, "answer")
    distractor = _check_ids(distractor, n, model.vocab_size, "distractor")

    L, H = cfg.n_layers, cfg.n_heads
    z_sites = tuple(block_site(l, _Z) for l in range(L))
    pre_sites = tuple(block_site(l, "hook_resid_pre") for l in range(L))
    capture = z_sites + pre_sites + (final_site(model),)
    act_sum, path_sum = np.zeros((L, H)), np.zeros((L, H))
    clean_sum = corr_sum = 0.0
    for rows, idx in _batches(n, batch_size):
        weight = (np.arange(len(idx)) < rows).astype(np.float64)
        lb, ab, db = (jnp.asarray(a[idx], jnp.int32) for a in (last, answer, distractor))
        c_cache, c_metric = _baseline(model, jnp.asarray(clean[idx]), lb, ab, db, capture=capture)
        r_cache, r_metric = _baseline(model, jnp.asarray(corrupted[idx]), lb, ab, db, capture=capture)
        c_metric, r_metric = np.asarray(c_metric, np.float64), np.asarray(r_metric, np.float64)
        clean_sum += float(weight @ c_metric)
        corr_sum += float(weight @ r_metric)
        x_last = _at_last(c_cache[final_site(model)], lb)
        for l in range(L):
            zc, zr = c_cache[z_sites[l]], r_cache[z_sites[l]]
            patched = _layer_activation(model, zc, c_cache[pre_sites[l]], zr, lb, ab, db, site=z_sites[l])
            act_sum[l] += (np.asarray(patched, np.float64) - c_metric) @ weight
            direct = _layer_path(model, jnp.asarray(l, jnp.int32), _at_last(zc, lb), _at_last(zr, lb), x_last, ab, db)
            path_sum[l] += (np.asarray(direct, np.float64) - c_metric) @ weight
    clean_m, corr_m = clean_sum / n, corr_sum / n
    act_change, path_change = act_sum / n, path_sum / n
    denom = corr_m - clean_m
    note = ""
    if _tiny(denom, max(abs(clean_m), abs(corr_m))):
        note = (f"the corrupted metric ({corr_m:.6g}) is too close to the clean metric ({clean_m:.6g}) to normalise "
                f"by: the prompt pairs do not change the logit difference; see activation_change and path_change")
        act, path = np.full((L, H), np.nan), np.full((L, H), np.nan)
    else:
        act, path = act_change / denom, path_change / denom
    return HeadEffects(activation=act, path_to_logits=path, activation_change=act_change, path_change=path_change,
                       clean_metric=float(clean_m), corrupted_metric=float(corr_m), note=note)


# ----------------------------------------------------------------------------------------------- edges


def can_carry(layer: int, source_site: str, target_site: str) -> bool:
    """Whether layer `layer`'s heads lie strictly between the two sites in forward order (their z
    after the source site and before the target site), so that a path from one to the other can
    go through them."""
    z = (layer, STAGE[_Z])
    return site_key(source_site) < z < site_key(target_site)


def _target_run(model, tokens, sae_s, source, sae_t, target, ablate_mask, patch, last):
    """f_target at `last` [b] with the source ablated where `ablate_mask` [b, w] (and `patch` applied)."""
    edits = (Ablate(sae_s, source, positions=ablate_mask),) + patch
    out = model.run(tokens, edits=edits, capture=(sae_t.site,), stop_at=sae_t.site)
    return _at_last(sae_t.encode(out.cache[sae_t.site])[..., target], last)


@partial(jax.jit, static_argnames=("capture",))
def _edge_clean(model, tokens, sae_t, target, last, *, capture):
    out = model.run(tokens, capture=capture + (sae_t.site,), stop_at=sae_t.site)
    f = _at_last(sae_t.encode(out.cache[sae_t.site])[..., target], last)
    return {s: out.cache[s] for s in capture}, f


@jax.jit
def _edge_ablated(model, tokens, sae_s, source, sae_t, target, ablate_mask, last):
    return _target_run(model, tokens, sae_s, source, sae_t, target, ablate_mask, (), last)


@partial(jax.jit, static_argnames=("site",))
def _edge_blocked(model, tokens, sae_s, source, sae_t, target, ablate_mask, last, z_clean, masks, *, site):
    """f_target at `last` [k, b] with the source ablated and the heads of each mask in `masks` [k, H]
    held at their clean z."""
    return jax.vmap(lambda m: _target_run(model, tokens, sae_s, source, sae_t, target, ablate_mask,
                                          (PatchHeads(site, z_clean, m),), last))(masks)


def edge_heads(model, sae_source, source: int, sae_target, target: int, clean, last, heads, *,
               batch_size: int = 16) -> EdgeHeads:
    """The share of a cross-position edge (feature `source` of `sae_source` -> feature `target` of
    `sae_target`) carried by each attention head in `heads` (a list of (layer, head)).

    E is the mean over rows of ``f_target[last] (source ablated, error-preserving, at every position
    before `last`) - f_target[last] (clean)``: the edge's effect from earlier positions, which only
    attention can carry. E_h is the same with head h's z also held at its clean value at every
    position, which blocks every path through h; ``share_h = (E - E_h) / E``. Heads whose z is not
    strictly between the two sites in forward order (layers before the source site's block, or the
    source's own block when the source is at or after its hook_z; layers after the target site's
    block, or the target's own block when the target is at or before its hook_z) cannot carry the
    edge: their E_h equals E and their share is 0 without running the model. Shares need not sum
    to 1 (paths through several heads in series, and nonlinear interactions between paths). When
    |E| is too small to divide by, `share` is nan and `note` says why.

    `clean` int [n, w], `last` int [n] (each row's last real token). Built-in models only.
    """
    _require_builtin(model, "edge_heads")
    cfg = model.config
    batch_size = _check_batch_size(batch_size)
    s_site, t_site = getattr(sae_source, "site", None), getattr(sae_target, "site", None)
    if not isinstance(s_site, str) or not isinstance(t_site, str):
        raise JfigError("sae_source and sae_target must be SAEs (objects with .site, .d_sae and .encode)")
    if not site_key(s_site) < site_key(t_site):
        raise SiteError(f"edge_heads needs the source site before the target site in forward order, got source "
                        f"{s_site!r} and target {t_site!r}")
    check_saes(model, [sae_source, sae_target])
    for name, f, sae in (("source", source, sae_source), ("target", target, sae_target)):
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not 0 <= f < sae.d_sae:
            raise ShapeError(f"{name} must be a feature index in [0, {sae.d_sae}) of the SAE at {sae.site}, "
                             f"got {f!r}")
    clean = _check_tokens(model, clean, "clean")
    n, w = clean.shape
    if n == 0:
        raise ShapeError("clean holds no prompts; expected at least one row")
    last = _check_last(last, n, w)
    pairs = []
    for hd in heads:
        try:
            l, h = (int(v) for v in hd)
        except (TypeError, ValueError):
            raise JfigError(f"heads must be (layer, head) pairs of ints, got {hd!r}") from None
        if not (0 <= l < cfg.n_layers and 0 <= h < cfg.n_heads):
            raise ShapeError(f"head {(l, h)} is out of range: the model has {cfg.n_layers} layers of "
                             f"{cfg.n_heads} heads")
        pairs.append((l, h))
    by_layer: dict[int, list[int]] = {}
    for i, (l, _) in enumerate(pairs):
        if can_carry(l, s_site, t_site):
            by_layer.setdefault(l, []).append(i)
    z_sites = {l: block_site(l, _Z) for l in by_layer}
    capture = tuple(z_sites[l] for l in sorted(by_layer))

    e_sum, blocked_sum = 0.0, np.zeros(len(pairs))
    for rows, idx in _batches(n, batch_size):
        weight = (np.arange(len(idx)) < rows).astype(np.float64)
        tb, lb = jnp.asarray(clean[idx]), jnp.asarray(last[idx], jnp.int32)
        mask = jnp.arange(w)[None, :] < lb[:, None]                                       # [b, w]
        zs, f_clean = _edge_clean(model, tb, sae_target, target, lb, capture=capture)
        f_clean = np.asarray(f_clean, np.float64)
        f_abl = np.asarray(_edge_ablated(model, tb, sae_source, source, sae_target, target, mask, lb), np.float64)
        e_b = float((f_abl - f_clean) @ weight)
        e_sum += e_b
        blocked_b = np.full(len(pairs), e_b)                # heads that cannot carry the edge: E_h = E
        for l, which in by_layer.items():
            masks = np.zeros((len(which), cfg.n_heads), bool)
            masks[np.arange(len(which)), [pairs[i][1] for i in which]] = True
            f_blk = _edge_blocked(model, tb, sae_source, source, sae_target, target, mask, lb, zs[z_sites[l]],
                                  jnp.asarray(masks), site=z_sites[l])
            blocked_b[which] = (np.asarray(f_blk, np.float64) - f_clean) @ weight
        blocked_sum += blocked_b
    effect, blocked = e_sum / n, blocked_sum / n
    note = ""
    if _tiny(effect, float(np.max(np.abs(blocked), initial=0.0))):
        note = (f"the edge's cross-position effect E = {effect:.3g} is too small to divide by: ablating source "
                f"{source} before `last` barely changes target {target} at `last` on these prompts")
        share = np.full(len(pairs), np.nan)
    else:
        share = (effect - blocked) / effect
        share[[i for i, (l, _) in enumerate(pairs) if l not in by_layer]] = 0.0
    return EdgeHeads(effect=float(effect), share=share, blocked=blocked, heads=tuple(pairs), note=note)
