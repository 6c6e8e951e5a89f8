"""Sufficiency and necessity of a feature set for a behaviour, against firing-rate-matched random sets.

All edits are error-preserving (`SetFeatures`) at every SAE site, at every prompt position but the
first, with the metric m = mean logit difference over the suite:

- m_clean: no edit; m_none: every feature of every SAE site mean-ablated (means over the suite);
- keep(S): every feature *outside* S mean-ablated; ablate(S): every feature in S set to 0.

sufficiency = (m(keep S) - m_none) / (m_clean - m_none): 1 = the clean behaviour, 0 = no better than
mean-ablating everything. necessity = 1 - m(ablate S) / m_clean: the fraction of the clean logit
difference lost when S is ablated (1 = the answer no longer beats the distractor at all; a logit
difference of 0 is indifference, so it needs no second reference point).

Controls: `n_random` sets with the same number of features per site, each member drawn from the
`pool` features of its site nearest in firing rate (excluding S). p-values are one-sided,
(1 + #controls at least as large) / (1 + n_random). Masks are traced leaves, so all controls of a
chunk run in one vmapped pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..edits import SetFeatures
from ..errors import JfigError
from .metric import logit_diff
from .seeds import edit_positions
from .suite import SuiteTokens


@dataclass(frozen=True)
class CircuitTest:
    """Sufficiency and necessity of a feature set and of its random controls ([n_random] arrays)."""

    size: int
    clean: float
    none: float
    sufficiency: float
    necessity: float
    random_sufficiency: np.ndarray = field(repr=False)
    random_necessity: np.ndarray = field(repr=False)

    @property
    def p_sufficiency(self) -> float:
        return _p_greater(self.sufficiency, self.random_sufficiency)

    @property
    def p_necessity(self) -> float:
        return _p_greater(self.necessity, self.random_necessity)

    def as_dict(self) -> dict:
        r = lambda a: [float(x) for x in a]  # noqa: E731
        return {"size": self.size, "clean_metric": self.clean, "all_mean_ablated_metric": self.none,
                "sufficiency": self.sufficiency, "necessity": self.necessity,
                "p_sufficiency": self.p_sufficiency, "p_necessity": self.p_necessity,
                "random_sufficiency": r(self.random_sufficiency), "random_necessity": r(self.random_necessity)}


def _p_greater(x: float, null: np.ndarray) -> float:
    return float((1 + np.sum(null >= x)) / (1 + len(null))) if len(null) else float("nan")


def node_masks(saes: dict, nodes) -> dict:
    """{site: bool [d_sae]}: True at the features of `nodes` [(site, feature)] (sites not in saes refused)."""
    masks = {s: np.zeros(sae.d_sae, bool) for s, sae in saes.items()}
    for s, f in nodes:
        if s not in masks:
            raise JfigError(f"feature ({s!r}, {f}) is at a site with no SAE; SAE sites are {list(masks)}")
        if not 0 <= f < len(masks[s]):
            raise JfigError(f"feature {f} is out of range for the SAE at {s} with d_sae {len(masks[s])}")
        masks[s][f] = True
    return masks


def matched_controls(masks: dict, firing_rate: dict, n_random: int, *, pool: int = 10, seed: int = 0) -> dict:
    """{site: bool [n_random, d_sae]}: random sets with each site's count, members drawn from the
    `pool` nearest-firing-rate features (outside the set) of each member."""
    rng = np.random.default_rng(seed)
    out = {}
    for site, mask in masks.items():
        members, rate = np.flatnonzero(mask), np.asarray(firing_rate[site])
        others = np.flatnonzero(~mask)
        out[site] = np.zeros((n_random, len(mask)), bool)
        if not members.size:
            continue
        if len(others) < members.size:
            raise JfigError(f"site {site}: {members.size} features in the set leave only {len(others)} others "
                            f"to draw random controls from")
        near = np.argsort(np.abs(rate[others][None, :] - rate[members][:, None]), axis=1, kind="stable")
        near = others[near[:, :max(pool, 1)]]                                      # [members, pool]
        for r in range(n_random):
            for m in rng.permutation(members.size):                             # distinct members per set
                free = [c for c in near[m] if not out[site][r, c]]
                out[site][r, rng.choice(free) if free else rng.choice(others[~out[site][r, others]])] = True
    return out


@eqx.filter_jit
def _metric_chunk(model, saes, tokens, last, answer, distractor, positions, masks, values):
    """Summed logit difference [c] for each of c feature sets: masks {site: bool [c, d_sae]}, values
    {site: [d_sae]} (the level the masked features are set to)."""
    def one(m):
        edits = tuple(SetFeatures(saes[s], m[s], values[s], positions=positions) for s in saes)
        return logit_diff(model, tokens, last, answer, distractor, edits).sum()
    return jax.vmap(one)(masks)


def set_metrics(model, saes: dict, batch: SuiteTokens, masks: dict, values: dict, *, batch_size: int = 8,
                chunk: int = 8) -> np.ndarray:
    """[c]: mean logit difference over the suite with, for each set c, the masked features of every
    site set to `values` {site: [d_sae]} (error kept; positions after the first)."""
    c = next(iter(masks.values())).shape[0]
    positions = edit_positions(batch)
    total = np.zeros(c)
    vals = {s: jnp.asarray(v, jnp.float32) for s, v in values.items()}
    for lo in range(0, len(batch.tokens), batch_size):
        sl = slice(lo, lo + batch_size)
        args = (jnp.asarray(batch.tokens[sl]), jnp.asarray(batch.last[sl]), jnp.asarray(batch.answer[sl]),
                jnp.asarray(batch.distractor[sl]), jnp.asarray(positions[sl]))
        for a in range(0, c, chunk):
            part = {s: jnp.asarray(_pad_rows(m[a:a + chunk], chunk)) for s, m in masks.items()}
            got = np.asarray(_metric_chunk(model, saes, *args, part, vals), np.float64)
            total[a:a + chunk] += got[:min(chunk, c - a)]
    return total / len(batch.tokens)


def _pad_rows(m: np.ndarray, rows: int) -> np.ndarray:
    """m [r, d] padded with copies of its last row to [rows, d] (one compiled shape per chunk size)."""
    return m if len(m) == rows else np.concatenate([m, np.repeat(m[-1:], rows - len(m), 0)])


def circuit_test(model, saes: dict, batch: SuiteTokens, nodes, means: dict, firing_rate: dict, *,
                 n_random: int = 50, pool: int = 10, seed: int = 0, batch_size: int = 8, chunk: int = 8) -> CircuitTest:
    """Sufficiency and necessity of `nodes` [(site, feature)] and of n_random matched controls."""
    if n_random < 0:
        raise JfigError(f"n_random must be >= 0, got {n_random}")
    masks = node_masks(saes, nodes)
    controls = matched_controls(masks, firing_rate, n_random, pool=pool, seed=seed)
    zeros = {s: np.zeros(sae.d_sae) for s, sae in saes.items()}
    # sets: [nothing edited, everything mean-ablated, keep S, keep controls...]; [ablate S, ablate controls...]
    keep = {s: np.concatenate([np.zeros((1, len(m)), bool), np.ones((1, len(m)), bool), ~m[None], ~controls[s]])
            for s, m in masks.items()}
    ablate = {s: np.concatenate([m[None], controls[s]]) for s, m in masks.items()}
    kept = set_metrics(model, saes, batch, keep, means, batch_size=batch_size, chunk=chunk)
    dropped = set_metrics(model, saes, batch, ablate, zeros, batch_size=batch_size, chunk=chunk)
    clean, none = kept[0], kept[1]
    span = clean - none
    if abs(span) < 1e-9:
        raise JfigError(f"mean-ablating every feature leaves the metric unchanged ({clean:.4g}); sufficiency and "
                        f"necessity are undefined for this suite and these SAEs")
    if abs(clean) < 1e-9:
        raise JfigError("the clean logit difference is 0: the model does not prefer the answer at all, so there is "
                        "no behaviour to test")
    retained = lambda m: (m - none) / span  # noqa: E731
    return CircuitTest(size=len(nodes), clean=float(clean), none=float(none), sufficiency=float(retained(kept[2])),
                       necessity=float(1 - dropped[0] / clean), random_sufficiency=retained(kept[3:]),
                       random_necessity=1 - dropped[1:] / clean)
