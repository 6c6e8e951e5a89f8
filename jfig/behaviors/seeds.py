"""Seed features of a behaviour: active on its prompts and causally important for its metric.

Two steps, as in activation patching practice:

1. *Rank* every feature of every SAE site by attribution patching: the first-order change of the
   mean logit difference when the feature is ablated at every prompt position but the first,
   Σ_pos f_i · ∂metric/∂f_i (the predicted drop), from one backward pass per batch of prompts (gradients taken
   through `ShiftFeatures`, so the SAE error is kept and every later site responds).
2. *Confirm* the best-ranked candidates by exact ablation (error-preserving `Ablate` at the same
   positions), all candidates of a site vmapped in one jitted pass; seeds are the candidates whose
   exact effect is at least `min_effect` of the clean metric, strongest first.

Position 0 (the sequence-start token, an attention sink whose features are shared by every
behaviour) is never edited. Features are only seeds when they are nodes of the graph.
"""
from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..edits import Ablate, ShiftFeatures
from ..errors import JfigError
from .metric import logit_diff
from .suite import SuiteTokens


class FeatureScores(NamedTuple):
    """Per site: attribution [d_sae] (first-order metric drop when ablated, mean over prompts),
    firing_rate [d_sae] (fraction of edited positions where the feature is active), mean [d_sae]
    (mean activation over those positions: the values of a mean ablation)."""

    attribution: dict
    firing_rate: dict
    mean: dict


class Seed(NamedTuple):
    site: str
    feature: int
    attribution: float      # first-order drop of the mean logit difference
    effect: float           # exact drop when ablated (clean metric - ablated metric)
    fraction: float         # effect / clean metric
    firing_rate: float


def edit_positions(batch: SuiteTokens) -> np.ndarray:
    """bool [n, w]: the positions behaviour edits touch (real prompt tokens after the first)."""
    mask = batch.valid.copy()
    mask[:, 0] = False
    return mask


@eqx.filter_jit
def _scores_chunk(model, saes, tokens, last, answer, distractor, mask):
    sites = tuple(saes)
    clean = model.run(tokens, capture=sites, logits=False).cache
    feats = {s: saes[s].encode(clean[s]) for s in sites}                       # [b, w, d_sae]

    def metric(deltas):
        edits = tuple(ShiftFeatures(saes[s], deltas[s]) for s in sites)
        return logit_diff(model, tokens, last, answer, distractor, edits).sum()

    grads = jax.grad(metric)({s: jnp.zeros_like(f) for s, f in feats.items()})
    m = mask[..., None].astype(jnp.float32)
    # first-order drop when ablated: M(f) - M(0) ~ f . dM/df (summed over prompts and positions)
    attribution = {s: (feats[s] * grads[s] * m).sum((0, 1)) for s in sites}
    active = {s: ((feats[s] > 0) * m).sum((0, 1)) for s in sites}
    total = {s: (feats[s] * m).sum((0, 1)) for s in sites}
    return attribution, active, total


def feature_scores(model, saes: dict, batch: SuiteTokens, *, batch_size: int = 8) -> FeatureScores:
    """Attribution, firing rate and mean activation of every feature at every SAE site."""
    mask = edit_positions(batch)
    n = len(batch.tokens)
    acc = None
    for lo in range(0, n, batch_size):
        sl = slice(lo, lo + batch_size)
        part = _scores_chunk(model, saes, jnp.asarray(batch.tokens[sl]), jnp.asarray(batch.last[sl]),
                             jnp.asarray(batch.answer[sl]), jnp.asarray(batch.distractor[sl]), jnp.asarray(mask[sl]))
        part = jax.tree.map(lambda a: np.asarray(a, np.float64), part)
        acc = part if acc is None else jax.tree.map(np.add, acc, part)
    attribution, active, total = acc
    positions = max(int(mask.sum()), 1)
    return FeatureScores({s: a / n for s, a in attribution.items()}, {s: a / positions for s, a in active.items()},
                         {s: t / positions for s, t in total.items()})


@eqx.filter_jit
def _ablation_chunk(model, sae, features, tokens, last, answer, distractor, mask):
    """Mean logit difference with each of features [c] ablated alone: [c]."""
    def one(f):
        return logit_diff(model, tokens, last, answer, distractor, (Ablate(sae, f, positions=mask),)).sum()
    return jax.vmap(one)(features)


def ablation_effects(model, sae, features, batch: SuiteTokens, *, batch_size: int = 8) -> np.ndarray:
    """[c]: clean mean logit difference minus the mean with each feature ablated (positions > 0)."""
    features = jnp.asarray(np.asarray(features, np.int32))
    mask = edit_positions(batch)
    n = len(batch.tokens)
    clean = ablated = 0.0
    for lo in range(0, n, batch_size):
        sl = slice(lo, lo + batch_size)
        args = (jnp.asarray(batch.tokens[sl]), jnp.asarray(batch.last[sl]), jnp.asarray(batch.answer[sl]),
                jnp.asarray(batch.distractor[sl]))
        clean += float(logit_diff(model, *args).sum())
        ablated = ablated + np.asarray(_ablation_chunk(model, sae, features, *args, jnp.asarray(mask[sl])), np.float64)
    return (clean - ablated) / n


def find_seeds(model, saes: dict, batch: SuiteTokens, scores: FeatureScores, clean_metric: float, *,
               nodes: dict | None = None, n_candidates: int = 32, n_seeds: int = 8, min_effect: float = 0.05,
               batch_size: int = 8) -> list[Seed]:
    """Seeds: the n_candidates features with the largest attribution (over all sites, among graph
    `nodes` {site: set of features} when given) confirmed by exact ablation; those whose drop is at
    least min_effect · |clean metric|, the n_seeds largest."""
    if n_candidates < 1 or n_seeds < 1:
        raise JfigError(f"n_candidates and n_seeds must be >= 1, got {n_candidates} and {n_seeds}")
    sites, ids, attr = [], [], []
    for site, a in scores.attribution.items():
        allowed = np.arange(len(a)) if nodes is None else np.asarray(sorted(nodes.get(site, ())), np.int64)
        sites += [site] * len(allowed)
        ids.append(allowed)
        attr.append(np.asarray(a)[allowed])
    ids, attr = np.concatenate(ids), np.concatenate(attr)
    best = np.argsort(-attr, kind="stable")[:n_candidates]
    candidates = [(sites[i], int(ids[i]), float(attr[i])) for i in best if attr[i] > 0]
    seeds = []
    for site in saes:
        mine = [(i, a) for s, i, a in candidates if s == site]
        if not mine:
            continue
        effects = ablation_effects(model, saes[site], [i for i, _ in mine], batch, batch_size=batch_size)
        for (i, a), e in zip(mine, effects):
            frac = float(e) / abs(clean_metric) if clean_metric else 0.0
            if frac >= min_effect:
                seeds.append(Seed(site, i, a, float(e), frac, float(scores.firing_rate[site][i])))
    seeds.sort(key=lambda s: -s.effect)
    return seeds[:n_seeds]
