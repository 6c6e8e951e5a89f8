"""Result containers and feature references for the measurement engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from treescope import repr_lib

from ..errors import JfigError, SiteError
from ..models.validation import check_features
from ..sites import parse_site


@dataclass(frozen=True)
class FeatureList:
    """An ordered list of (site, feature) pairs; `sites` and `features` are parallel arrays."""

    sites: tuple[str, ...]
    features: np.ndarray  # [n] int

    def __len__(self):
        return len(self.sites)

    def __iter__(self):
        return iter(zip(self.sites, self.features.tolist()))

    def __getitem__(self, i):
        return self.sites[i], int(self.features[i])

    def at(self, site: str) -> np.ndarray:
        """Row indices of the entries at `site`."""
        return np.asarray([i for i, s in enumerate(self.sites) if s == site], np.int64)

    def unique_sites(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.sites))

    def as_table(self):
        return pa.table({"site": list(self.sites), "feature": self.features.astype(np.int64)})


def feature_list(spec, saes: dict) -> FeatureList:
    """FeatureList from [(site, feature), ...], {site: features}, or an existing FeatureList."""
    if isinstance(spec, FeatureList):
        out = spec
    elif isinstance(spec, dict):
        sites, feats = [], []
        for site, fs in spec.items():
            fs = np.atleast_1d(np.asarray(fs, np.int64))
            sites += [str(site)] * len(fs)
            feats.append(fs)
        out = FeatureList(tuple(sites), np.concatenate(feats) if feats else np.zeros(0, np.int64))
    else:
        pairs = list(spec)
        if pairs and not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
            raise JfigError("features must be (site, feature) pairs, a {site: features} dict or a FeatureList")
        out = FeatureList(tuple(str(p[0]) for p in pairs), np.asarray([int(p[1]) for p in pairs], np.int64))
    for site in out.unique_sites():
        if site not in saes:
            raise SiteError(f"no SAE given for site {site!r}; SAEs are at {sorted(saes)}")
        check_features(out.features[out.at(site)], saes[site].d_sae, site)
    return out


def store_stats(mean, var, count, rows, cols, n, mu, m2) -> None:
    """Write per-row (n [R] or [R, C], mean [R, C], m2 [R, C]) into the [rows, cols] block of the result
    arrays: mean is NaN without inputs, var (unbiased) NaN with fewer than two."""
    block = np.ix_(rows, cols)
    n = np.broadcast_to(n[:, None] if np.ndim(n) == 1 else n, np.shape(mu))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean[block] = np.where(n > 0, mu, np.nan)
        var[block] = np.where(n > 1, m2 / np.maximum(n - 1, 1), np.nan)
    count[block] = n


@dataclass
class Effects:
    """Per-pair effect statistics over inputs.

    mean, var, n: [n_sources, n_targets]; `n` counts the inputs an entry averages over
    (0 where the target cannot be affected, e.g. it comes before the source; mean is NaN there).
    per_input (optional): [n_sources, M, n_targets] per-input effects, with `input_weight`
    [n_sources, M] (1 for a real input, 0 for padding) and `input_index` [n_sources, M].
    """

    mean: np.ndarray
    var: np.ndarray
    n: np.ndarray
    sources: FeatureList
    targets: FeatureList
    method: str
    positions: str
    alphas: np.ndarray | None = None          # [n_sources, 2] (lo, hi) or [n_sources, 1]
    per_input: np.ndarray | None = None
    input_weight: np.ndarray | None = None
    input_index: np.ndarray | None = None
    options: dict = field(default_factory=dict)
    pair_weight: np.ndarray | None = None     # [n_sources, M, n_targets] with inputs="target_active"
    target_active: np.ndarray | None = None   # [n_sources, n_targets]: fraction of inputs with the target active
                                              # in the clean run (NaN where the method made no clean run)

    def __treescope_repr__(self, path, subtree_renderer):
        """Notebook display (treescope): method, sources and targets by site, then the arrays."""
        by_site = lambda fl: {s: int(np.sum(np.asarray(fl.sites) == s)) for s in dict.fromkeys(fl.sites)}  # noqa: E731
        summary = {"method": self.method, "positions": self.positions,
                   "sources": by_site(self.sources), "targets": by_site(self.targets), "mean": self.mean,
                   "var": self.var, "n": self.n, "alphas": self.alphas, "per_input": self.per_input,
                   "options": self.options}
        return repr_lib.render_object_constructor(type(self), summary, path=None, subtree_renderer=subtree_renderer)

    @property
    def weights(self) -> np.ndarray | None:
        """Per-input weights for the p-values: pair weights [S, M, T] when inputs were chosen per pair,
        else input weights [S, M]."""
        return self.pair_weight if self.pair_weight is not None else self.input_weight

    @property
    def sem(self) -> np.ndarray:
        """Standard error of the mean, [n_sources, n_targets]."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(self.var / np.maximum(self.n, 1))

    def top(self, k: int = 10) -> list[tuple[Any, Any, float]]:
        """The k largest |mean| entries as ((source site, feature), (target site, feature), mean)."""
        m = np.nan_to_num(self.mean)
        flat = np.argsort(-np.abs(m), axis=None)[:k]
        rows, cols = np.unravel_index(flat, m.shape)
        return [(self.sources[r], self.targets[c], float(m[r, c])) for r, c in zip(rows, cols)]
