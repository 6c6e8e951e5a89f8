"""Candidate feature pairs: checked id arrays, every pair of a set, or the most co-active pairs of an atlas."""
from __future__ import annotations

import numpy as np

from ..atlas import Atlas
from ..errors import JfigError, ShapeError
from ..models.validation import check_features


def check_pairs(pairs, d_sae: int, site: str) -> np.ndarray:
    """Pairs as int64 [P, 2] of distinct feature ids in [0, d_sae); raises ShapeError / JfigError."""
    arr = np.asarray(pairs)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ShapeError(f"pairs at {site} must be an integer array [n_pairs, 2], got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ShapeError(f"pairs at {site} must have shape [n_pairs >= 1, 2], got {tuple(arr.shape)}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise ShapeError(f"pairs at {site} must hold integer feature ids; got non-integer or NaN values")
    arr = check_features(arr.astype(np.int64).reshape(-1), d_sae, site).reshape(-1, 2)
    same = arr[:, 0] == arr[:, 1]
    if same.any():
        raise JfigError(f"pair {arr[same][0].tolist()} at {site} pairs a feature with itself; pairs need two "
                        f"distinct features")
    return arr


def all_pairs(features) -> np.ndarray:
    """[P, 2] every unordered pair (a, b), a < b, of the distinct ids in `features`."""
    f = np.unique(np.asarray(features, np.int64).reshape(-1))
    a, b = np.triu_indices(len(f), k=1)
    return np.stack([f[a], f[b]], axis=1)


def coactive_pairs(atlas: Atlas, site: str, k: int = 256, *, min_count: int = 1) -> np.ndarray:
    """[<= k, 2] the pairs of distinct tracked features of `site` that fire together on the most tokens
    (the atlas's same-site co-activation counts), most co-active first; pairs below `min_count` are left out."""
    if k < 1:
        raise JfigError(f"k must be >= 1, got {k}")
    co = np.asarray(atlas.coactivation(site, site), np.int64)
    co = np.triu(np.maximum(co, co.T), k=1)        # symmetric already when the atlas counts same-token pairs
    a, b = np.nonzero(co >= max(min_count, 1))
    order = np.lexsort((b, a, -co[a, b]))[:k]
    feats = atlas.features[site]
    return np.stack([feats[a[order]], feats[b[order]]], axis=1)
