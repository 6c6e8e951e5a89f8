"""Feature lineage: "the same feature" followed through depth and across components, and feature
splitting between dictionaries of two widths.

    ms = match_layers(model, [sae6, sae10, sae14, sae18], tokens, method="both")
    chains = feature_chains(ms)            # chains of mutual-best matches, where features emerge and stop
    chains.summary_table(); chains.table(min_length=3)
    split = feature_splitting(narrow, wide, min_similarity=0.5)
    split.split_counts; split.distribution()

Matching between different sites is :func:`jfig.saes.matching.match_across` (decoder cosine,
activation correlation streamed with both sites captured in one run, or a causal score). The causal
score is measured here, where the measurement package may be used:
:func:`causal_similarity` clamps each earlier feature (``jfig.measure.measure_effects``, between its
10th and 90th percentile activations at the position where it fires most) and reads every later
feature, then standardises the slope as a path coefficient, slope x sd(f_i) / sd(f_j), so a feature
that is copied unchanged scores 1 and scores of features of different scales compare.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..errors import OptionError, ShapeError
from ..measure import measure_effects
from ..saes.matching import CrossMatching, check_pair, match_across, moments_std, mutual_best, site_moments
from ..sites import site_key


# ------------------------------------------------------------------------------ causal similarity

def causal_similarity(model, sae_a, sae_b, tokens, *, features=None, moments=None, inputs_per_source: int = 16,
                      read: str = "post", batch_size: int = 8, skip_positions: int = 0, atlas=None,
                      progress: bool = False, seed: int = 0) -> np.ndarray:
    """float32 [d_sae_a, d_sae_b]: the standardised causal effect of each feature i of the earlier SAE
    A on each feature j of the later SAE B, slope_ij x sd(f_i) / sd(f_j) (module docstring); rows of
    A features not in ``features`` (default: all) are NaN. sd over ``tokens`` [n, seq] from
    ``moments`` (:func:`jfig.saes.matching.site_moments`) or streamed here; a feature that never
    varies gets 0. read: "post" (B's activation, the default: the unit of sd(f_j)) or "pre"."""
    if site_key(sae_a.site) > site_key(sae_b.site):
        raise OptionError(f"causal matching clamps the earlier SAE and reads the later one: A reads {sae_a.site}, "
                          f"which comes after B's {sae_b.site}; swap them")
    if sae_a.site == sae_b.site:
        raise OptionError(f"A and B both read {sae_a.site}: clamping a feature cannot be read at its own site by "
                          f"another dictionary; use match_features there")
    feats = np.arange(sae_a.d_sae) if features is None else np.unique(np.asarray(features, np.int64))
    if len(feats) == 0 or feats.min() < 0 or feats.max() >= sae_a.d_sae:
        raise OptionError(f"features must be a non-empty selection of 0..{sae_a.d_sae - 1}")
    if moments is None:
        moments = site_moments(sae_a, sae_b, model=model, tokens=tokens, batch_size=batch_size,
                               skip_positions=skip_positions)
    sd_a, sd_b = moments_std(moments)
    if len(sd_a) != sae_a.d_sae or len(sd_b) != sae_b.d_sae:
        raise ShapeError(f"moments are of {len(sd_a)} x {len(sd_b)} features, expected {sae_a.d_sae} x {sae_b.d_sae}")
    eff = measure_effects(model, [sae_a, sae_b], {sae_a.site: feats}, tokens,
                          targets={sae_b.site: np.arange(sae_b.d_sae)}, method="clamp", read=read,
                          inputs_per_source=inputs_per_source, batch_size=batch_size, atlas=atlas,
                          progress=progress, seed=seed)
    slope = np.nan_to_num(eff.mean.astype(np.float64))                                 # [n, d_b]
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.where(sd_b[None, :] > 0, slope * sd_a[feats, None] / sd_b[None, :], 0.0)
    out = np.full((sae_a.d_sae, sae_b.d_sae), np.nan, np.float32)
    out[feats] = std
    return out


# ------------------------------------------------------------------------------ through depth

def match_layers(model, saes, tokens=None, *, method: str = "both", min_similarity: float = 0.5,
                 causal_features=None, inputs_per_source: int = 16, batch_size: int = 8, skip_positions: int = 0,
                 atlas=None, progress: bool = False) -> list[CrossMatching]:
    """Each SAE matched to the next (in forward order) by :func:`jfig.saes.matching.match_across`.

    method: as match_across; "activation", "both", "causal" and "all" stream activations over
    ``tokens`` (both sites in one run per batch). With "causal" / "all", or when
    ``causal_features`` is given, the causal score is measured (:func:`causal_similarity`) for the A
    features ``causal_features`` ({site: ids}, or an int: the first that many of every SAE; default
    every feature) and reported in each matching's ``causal``."""
    saes = sorted(saes, key=lambda s: site_key(s.site))
    if len(saes) < 2:
        raise OptionError(f"match_layers needs at least two SAEs at different sites, got {len(saes)}")
    if len({s.site for s in saes}) != len(saes):
        raise OptionError(f"two SAEs read one site ({[s.site for s in saes]}); give one SAE per site")
    wants_causal = method in ("causal", "all") or causal_features is not None
    needs_tokens = method != "decoder" or wants_causal
    if needs_tokens and (model is None or tokens is None):
        raise OptionError(f"method={method!r} (or causal_features=) runs the model: pass model and tokens")
    out = []
    for a, b in zip(saes[:-1], saes[1:]):
        moments = (site_moments(a, b, model=model, tokens=tokens, batch_size=batch_size, skip_positions=skip_positions)
                   if needs_tokens else None)
        causal = None
        if wants_causal:
            feats = (np.arange(a.d_sae) if causal_features is None
                     else np.arange(min(int(causal_features), a.d_sae)) if np.isscalar(causal_features)
                     else causal_features.get(a.site, ()))
            if len(feats):
                causal = causal_similarity(model, a, b, tokens, features=feats, moments=moments,
                                           inputs_per_source=inputs_per_source, batch_size=batch_size,
                                           skip_positions=skip_positions, atlas=atlas, progress=progress)
            elif method in ("causal", "all"):
                raise OptionError(f"method={method!r} needs causal features at {a.site}; causal_features gives none")
        out.append(match_across(a, b, method=method, min_similarity=min_similarity, moments=moments, causal=causal))
    return out


@dataclass(frozen=True, eq=False)
class FeatureChains:
    """Chains of "the same feature" through consecutive sites.

    sites [L]: in forward order; d_sae [L]; chains [n_chains, L] int64: the feature of each chain at
    each site (-1 before it emerges and after it stops); a chain starts at every feature of the first
    site and at every later feature that no feature of the previous site is matched to, and follows
    the one-to-one matches until a feature has no match in the next site. Per site [L]:
    ``persist`` (features matched to the next site; 0 at the last), ``emerge`` (features no previous
    feature is matched to; all at the first site), ``stop`` (features with no match in the next;
    0 at the last)."""

    sites: tuple
    d_sae: tuple
    chains: np.ndarray
    persist: np.ndarray
    emerge: np.ndarray
    stop: np.ndarray

    @property
    def length(self) -> np.ndarray:
        """[n_chains] sites each chain spans."""
        return (self.chains >= 0).sum(1)

    @property
    def start(self) -> np.ndarray:
        """[n_chains] index of the site where each chain emerges."""
        return np.argmax(self.chains >= 0, axis=1)

    def table(self, min_length: int = 1) -> pa.Table:
        """One row per chain spanning at least ``min_length`` sites: start_site, length and one column
        per site (the feature id, null where the chain is absent)."""
        keep = self.length >= min_length
        c = self.chains[keep]
        cols = {"start_site": pa.array(np.asarray(self.sites, object)[self.start[keep]].tolist(), pa.string()),
                "length": pa.array(self.length[keep], pa.int64())}
        for i, s in enumerate(self.sites):
            cols[s] = pa.array(c[:, i], pa.int64(), mask=c[:, i] < 0)
        return pa.table(cols)

    def summary_table(self) -> pa.Table:
        """One row per site: site, d_sae, emerge, persist, stop, and chains_through (chains present there
        that began at an earlier site)."""
        present = self.chains >= 0
        through = (present & (np.arange(len(self.sites))[None, :] > self.start[:, None])).sum(0)
        return pa.table({"site": list(self.sites), "d_sae": list(self.d_sae), "emerge": self.emerge,
                         "persist": self.persist, "stop": self.stop, "chains_through": through})

    def length_counts(self) -> dict[int, int]:
        """{chain length in sites: number of chains}."""
        values, counts = np.unique(self.length, return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))


def feature_chains(matchings) -> FeatureChains:
    """Chains of mutual-best matches through consecutive sites (:class:`FeatureChains`).

    matchings: [m_0, ..., m_{L-2}], m_l matching the SAE of site l to that of site l + 1 (as
    :func:`match_layers` returns them: each one's B is the next one's A). A feature matched to the
    next site persists; one no previous feature is matched to emerges; one with no match stops."""
    ms = list(matchings)
    if not ms:
        raise OptionError("feature_chains needs at least one matching (two sites)")
    for x, y in zip(ms[:-1], ms[1:]):
        b_site = getattr(x, "site_b", x.site)
        if b_site != y.site or x.d_sae_b != y.d_sae_a:
            raise ShapeError(f"matchings do not follow on: one ends at {b_site} with {x.d_sae_b} features, the next "
                             f"starts at {y.site} with {y.d_sae_a}")
    sites = tuple([m.site for m in ms] + [getattr(ms[-1], "site_b", ms[-1].site)])
    d_sae = tuple([m.d_sae_a for m in ms] + [ms[-1].d_sae_b])
    L = len(sites)
    persist, emerge, stop = np.zeros(L, np.int64), np.zeros(L, np.int64), np.zeros(L, np.int64)
    emerge[0] = d_sae[0]
    current = np.arange(d_sae[0])[:, None]                   # [chains, sites so far]
    for l, m in enumerate(ms):
        nxt = np.where(current[:, -1] >= 0, m.match[np.maximum(current[:, -1], 0)], -1)     # [chains]
        new = np.asarray(m.unmatched_b, np.int64)
        persist[l], stop[l], emerge[l + 1] = m.n_matched, m.d_sae_a - m.n_matched, len(new)
        grown = np.concatenate([current, nxt[:, None]], axis=1)
        fresh = np.full((len(new), l + 2), -1, np.int64)
        fresh[:, -1] = new
        current = np.concatenate([grown, fresh])
    return FeatureChains(sites=sites, d_sae=d_sae, chains=current, persist=persist, emerge=emerge, stop=stop)


# ------------------------------------------------------------------------------ splitting

@dataclass(frozen=True, eq=False)
class FeatureSplitting:
    """Features of a wide SAE traced to their parents in a narrow SAE of the same site.

    parent [d_wide]: each wide feature's most similar narrow feature by decoder cosine, -1 where the
    cosine is below ``min_similarity``; parent_cosine [d_wide]: that cosine (kept for orphans too);
    best_parent [d_wide]: the most similar narrow feature whatever the cosine; split_counts [d_narrow]:
    children per narrow feature (0: no wide feature descends from it)."""

    site: str
    min_similarity: float
    parent: np.ndarray
    parent_cosine: np.ndarray
    best_parent: np.ndarray
    split_counts: np.ndarray

    @property
    def d_wide(self) -> int:
        return len(self.parent)

    @property
    def d_narrow(self) -> int:
        return len(self.split_counts)

    def children(self, feature: int) -> np.ndarray:
        """The wide features whose parent is narrow ``feature``, ascending."""
        if not 0 <= int(feature) < self.d_narrow:
            raise OptionError(f"narrow feature must be in 0..{self.d_narrow - 1}, got {feature}")
        return np.flatnonzero(self.parent == int(feature))

    def distribution(self) -> dict[int, int]:
        """{children: number of narrow features with that many}."""
        values, counts = np.unique(self.split_counts, return_counts=True)
        return dict(zip(values.tolist(), counts.tolist()))

    def table(self) -> pa.Table:
        """One row per wide feature: feature, parent (null for orphans), parent_cosine, best_parent,
        siblings (the parent's child count, 0 for orphans)."""
        p = self.parent
        return pa.table({"feature": np.arange(self.d_wide), "parent": pa.array(p, pa.int64(), mask=p < 0),
                         "parent_cosine": self.parent_cosine, "best_parent": self.best_parent,
                         "siblings": np.where(p >= 0, self.split_counts[np.maximum(p, 0)], 0)})

    def summary(self) -> str:
        d = self.distribution()
        return (f"{self.site}: {int((self.parent >= 0).sum())} of {self.d_wide} wide features have a narrow parent "
                f"(cosine >= {self.min_similarity:g}); narrow features by children: "
                + ", ".join(f"{k}: {v}" for k, v in d.items()))


def feature_splitting(narrow, wide, *, min_similarity: float = 0.5, block: int | None = None) -> FeatureSplitting:
    """For each feature of the ``wide`` SAE its parent in the ``narrow`` SAE of the same site (the
    narrow feature of largest decoder cosine, at least ``min_similarity``), and each narrow feature's
    children. ShapeError / SiteError when the two do not read one site at one width, or when
    ``narrow`` is wider than ``wide``."""
    check_pair(narrow, wide)
    if narrow.d_sae > wide.d_sae:
        raise ShapeError(f"the narrow SAE has {narrow.d_sae} features and the wide one {wide.d_sae}: pass the "
                         f"narrower dictionary first")
    if not -1.0 <= float(min_similarity) <= 1.0:
        raise OptionError(f"min_similarity must be in [-1, 1] (a cosine), got {min_similarity}")
    r = mutual_best(wide.W_dec, narrow.W_dec, method="decoder", min_similarity=-1.0, block=block)
    parent = np.where(r.similarity >= float(min_similarity), r.best, -1)
    counts = np.bincount(parent[parent >= 0], minlength=narrow.d_sae).astype(np.int64)
    return FeatureSplitting(site=wide.site, min_similarity=float(min_similarity), parent=parent,
                            parent_cosine=r.similarity, best_parent=r.best, split_counts=counts)
