"""Weight-only estimates: the direct residual-path term, computed without a forward pass."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..models.validation import saes_by_site
from ..sites import RESIDUAL_BASIS, parse_site, site_key
from .types import Effects, feature_list


def _residual(site: str) -> bool:
    s = parse_site(site)
    return s.layer < 0 or s.local in RESIDUAL_BASIS


def weight_effects(saes, sources, targets=None) -> Effects:
    """Direct residual-path term e_j · d_i for every (source, later target) pair.

    d_i is the source's decoder direction, e_j the target's encoder column W_enc[:, j]. Both
    SAEs read and write the residual stream directly (no norm between them on the residual
    path), so for residual-basis sites this is the first-order effect of the source on the
    target's pre-activation when nothing in between responds. SAEs that normalise their
    input scale it by a per-token factor (1/std, c) not known without data: the term is
    reported unscaled. Entries whose sites are not residual-basis, or where the target comes
    before the source, are NaN with n = 0.
    """
    saes = saes_by_site(saes)
    src = feature_list(sources, saes)
    if targets is None:
        first = min(site_key(s) for s in src.unique_sites())
        targets = {s: np.arange(x.d_sae) for s, x in saes.items() if site_key(s) >= first}
    tgt = feature_list(targets, saes)
    mean = np.full((len(src), len(tgt)), np.nan, np.float32)
    for ss in src.unique_sites():
        rows = src.at(ss)
        d = jnp.asarray(saes[ss].W_dec)[src.features[rows]]          # [n_src, d]
        if saes[ss].rescale_acts_by_decoder_norm:
            d = d / jnp.linalg.norm(d, axis=-1, keepdims=True)
        for ts in tgt.unique_sites():
            if site_key(ts) < site_key(ss) or not (_residual(ss) and _residual(ts)):
                continue
            cols = tgt.at(ts)
            enc = jnp.asarray(saes[ts].W_enc)[:, tgt.features[cols]]  # [d, n_t]
            mean[np.ix_(rows, cols)] = np.asarray(d.reshape(len(rows), -1) @ enc)
    n = np.isfinite(mean).astype(np.float32)
    return Effects(mean=mean, var=np.zeros_like(mean), n=n, sources=src, targets=tgt, method="weights",
                   positions="none")
