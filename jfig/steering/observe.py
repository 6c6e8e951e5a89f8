"""Observed cascades: what an edit really changes at every SAE site, and how well a prediction fits it.

`observe_cascade` runs the model twice on the same tokens (clean, then with the edits), encodes
every SAE site and keeps edited − clean per feature. `compare_cascade` scores a predicted cascade
(`predict_cascade`) against an observed one.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ..errors import JfigError, OptionError, ShapeError, SiteError
from .cascade import Key, check_key


@dataclass(frozen=True, eq=False)
class ObservedCascade:
    """clean, changes: {site: float32 [batch, seq, d_sae]} (encoded SAE features; edited − clean);
    mask: bool [batch, seq], the observed tokens (the `positions` of `observe_cascade`), the
    default of every `mask=` argument. Token-wise values ([n]) list the tokens of a mask row-major."""

    clean: dict[str, np.ndarray]
    changes: dict[str, np.ndarray]
    mask: np.ndarray
    clean_pre: dict[str, np.ndarray] | None = None        # {site: [batch, seq, d_sae]} pre-activations
    threshold: dict[str, np.ndarray] | None = None        # {site: broadcastable to clean_pre} activation thresholds

    def clean_columns(self, nodes, mask=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(activations, pre-activations, thresholds), each [n, len(nodes)] at the masked tokens, for
        predict_cascade's baseline= or pre= / threshold= (nodes in cascade_nodes(graph) order)."""
        m = self.check_mask(mask)
        cols = lambda d: np.stack([np.broadcast_to(d[s], self.clean[s].shape)[..., f][m]  # noqa: E731
                                   for s, f in nodes], axis=1) if nodes else np.zeros((int(m.sum()), 0))
        if self.clean_pre is None:
            raise JfigError("this ObservedCascade has no pre-activations (made by an older observe_cascade)")
        return cols(self.clean), cols(self.clean_pre), cols(self.threshold)

    def at(self, site: str, feature: int) -> np.ndarray:
        """[batch, seq]: the change of one feature."""
        return self.changes[self.check_site(site)][..., self.check_feature(site, feature)]

    def mean_changes(self, mask=None) -> dict[Key, float]:
        """{(site, feature): mean change over the tokens where `mask` [batch, seq] is True}, nonzero means only."""
        m = self.check_mask(mask)
        out = {}
        for site, change in self.changes.items():
            means = change[m].mean(axis=0) if m.any() else np.zeros(change.shape[-1])
            out.update({(site, int(f)): float(means[f]) for f in np.flatnonzero(means)})
        return out

    def token_changes(self, mask=None) -> dict[Key, np.ndarray]:
        """{(site, feature): change [n]} at the n tokens of `mask`, for features that change at any of them."""
        m = self.check_mask(mask)
        out = {}
        for site, change in self.changes.items():
            rows = change[m]                                                   # [n, d_sae]
            out.update({(site, int(f)): rows[:, f].astype(np.float64) for f in np.flatnonzero(np.any(rows, axis=0))})
        return out

    def clean_values(self, nodes, mask=None) -> np.ndarray:
        """[n, len(nodes)]: the clean activations of `nodes` ((site, feature) keys, e.g. `cascade_nodes(graph)`)
        at the n tokens of `mask`: a per-token `baseline` for `predict_cascade`."""
        m = self.check_mask(mask)
        nodes = [check_key(k, "nodes") for k in nodes]
        out = np.empty((int(m.sum()), len(nodes)))
        for site in dict.fromkeys(s for s, _ in nodes):
            cols = [i for i, (s, _) in enumerate(nodes) if s == site]
            features = [self.check_feature(site, nodes[i][1]) for i in cols]
            out[:, cols] = self.clean[self.check_site(site)][m][:, features]
        return out

    def check_site(self, site: str) -> str:
        if site not in self.changes:
            raise SiteError(f"no SAE was observed at site {site!r}; observed sites: {list(self.changes)}")
        return site

    def check_feature(self, site: str, feature) -> int:
        d_sae = self.changes[site].shape[-1]
        if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)) or not 0 <= feature < d_sae:
            raise JfigError(f"feature {feature!r} is not a feature of the SAE at {site} (expected an int in "
                            f"[0, {d_sae}))")
        return int(feature)

    def check_mask(self, mask) -> np.ndarray:
        """`mask` (None: self.mask) as bool [batch, seq]; a [seq] mask applies to every row."""
        if mask is None:
            return self.mask
        m = np.asarray(mask)
        if m.dtype != bool or m.shape[-1:] != self.mask.shape[-1:] or m.ndim not in (1, 2) \
                or (m.ndim == 2 and m.shape[0] != self.mask.shape[0]):
            raise ShapeError(f"mask must be bool [batch, seq] = {self.mask.shape} or [seq], got {m.dtype} {m.shape}")
        return np.broadcast_to(m, self.mask.shape)


def positions_mask(positions, batch: int, seq: int) -> np.ndarray:
    """bool [batch, seq] from positions as edits take them: None (all), int / int [k] (negative from the
    end), bool [seq] or [batch, seq]."""
    if positions is None:
        return np.ones((batch, seq), bool)
    p = np.asarray(positions)
    if p.dtype == bool:
        if p.shape not in ((seq,), (batch, seq), (1, seq)):
            raise ShapeError(f"a position mask must be bool [seq] = ({seq},) or [batch, seq] = ({batch}, {seq}), "
                             f"got shape {p.shape}")
        return np.broadcast_to(p, (batch, seq)).copy()
    if not np.issubdtype(p.dtype, np.integer) or p.ndim > 1:
        raise ShapeError(f"positions must be None, an int, an int array [k] or a bool mask, got {p.dtype} {p.shape}")
    if ((p < -seq) | (p >= seq)).any():
        raise ShapeError(f"position {int(p[(p < -seq) | (p >= seq)].ravel()[0])} is out of range for a sequence "
                         f"of length {seq} (expected -{seq} <= position < {seq})")
    m = np.zeros(seq, bool)
    m[p] = True
    return np.broadcast_to(m, (batch, seq)).copy()


def observe_cascade(model, saes, edits, tokens, *, positions=None) -> ObservedCascade:
    """One clean and one edited run of `model` on tokens [batch, seq]; SAE features at every SAE site.

    saes: a list or dict of SAEs (checked against the model); edits: jfig.edits edits (or a Compose).
    positions: the tokens to observe (None: all; int / int [k]; bool [seq] / [batch, seq]), kept as
    the result's `mask`. Works on built-in models and on models wrapped with `Model.from_function`.
    """
    by_site = model.check_saes(saes)
    tokens = model.check_tokens(tokens)
    mask = positions_mask(positions, *tokens.shape)
    sites = tuple(by_site)
    clean_run = model.run(tokens, capture=sites, logits=False)
    edited_run = model.run(tokens, edits=edits, capture=sites, logits=False)
    clean = {s: np.asarray(by_site[s].encode(clean_run.cache[s]), np.float32) for s in sites}
    edited = {s: np.asarray(by_site[s].encode(edited_run.cache[s]), np.float32) for s in sites}
    pre = {s: np.asarray(by_site[s].pre_activations(clean_run.cache[s]), np.float32) for s in sites}
    return ObservedCascade(clean, {s: edited[s] - clean[s] for s in sites}, mask, pre,
                           {s: activation_threshold(by_site[s], pre[s]) for s in sites})


def activation_threshold(sae, pre: np.ndarray) -> np.ndarray:
    """Thresholds broadcastable to pre [..., d_sae]: a feature is on where its pre-activation exceeds
    max(threshold, 0). ReLU 0; JumpReLU / BatchTopK (at inference) their thresholds; TopK the
    k-th largest pre-activation of each token (the last one kept)."""
    if sae.architecture == "relu":
        return np.zeros((1,) * pre.ndim, np.float32)
    if sae.architecture in ("jumprelu", "batchtopk"):
        return np.asarray(sae.threshold, np.float32).reshape((1,) * (pre.ndim - 1) + (-1,))
    kth = -np.partition(-pre, sae.k - 1, axis=-1)[..., sae.k - 1:sae.k]
    return np.nextafter(kth, -np.inf).astype(np.float32)    # the k-th itself stays on (z > threshold)


@dataclass(frozen=True)
class CascadeFit:
    """How well predicted changes p fit observed changes o, over n values (features × tokens):
    r2 = 1 − Σ(o − p)² / Σ(o − ō)² (the raw prediction), r2_linear = Pearson r², spearman = rank
    correlation. NaN where undefined (fewer than 2 values, or a constant side)."""

    r2: float
    r2_linear: float
    spearman: float
    n: int


def compare_cascade(predicted: Mapping, observed: Mapping, *, features=None, exclude=()) -> CascadeFit:
    """Score predicted against observed changes, {(site, feature): float or [n]} each.

    Over `features` when given, else the union of both key sets (a missing key is a change of 0),
    less `exclude` (pass the edited features: they match by construction). Values of one key
    broadcast together (a scalar against [n]); all are concatenated.
    """
    exclude = {check_key(k, "exclude") for k in exclude}
    if features is None:
        keys = list(dict.fromkeys([check_key(k, "predicted") for k in predicted]
                                  + [check_key(k, "observed") for k in observed]))
    else:
        keys = [check_key(k, "features") for k in features]
    p_parts, o_parts = [], []
    for key in (k for k in keys if k not in exclude):
        p, o = np.asarray(predicted.get(key, 0.0), np.float64), np.asarray(observed.get(key, 0.0), np.float64)
        try:
            p, o = np.broadcast_arrays(p, o)
        except ValueError:
            raise ShapeError(f"predicted and observed changes of {key!r} have shapes {p.shape} and {o.shape}; "
                             f"expected equal shapes (or a scalar)") from None
        p_parts.append(p.ravel())
        o_parts.append(o.ravel())
    p, o = (np.concatenate(x) if x else np.zeros(0) for x in (p_parts, o_parts))
    if not (np.isfinite(p).all() and np.isfinite(o).all()):
        raise OptionError("predicted and observed changes must be finite", key="predicted")
    return fit_scores(p, o)


def fit_scores(p: np.ndarray, o: np.ndarray) -> CascadeFit:
    """CascadeFit of predictions p [n] against observations o [n]."""
    n = len(o)
    if n < 2 or np.ptp(o) == 0:
        return CascadeFit(float("nan"), float("nan"), float("nan"), n)
    r2 = 1.0 - float(np.sum((o - p) ** 2) / np.sum((o - o.mean()) ** 2))
    if np.ptp(p) == 0:
        return CascadeFit(r2, float("nan"), float("nan"), n)
    r = float(np.corrcoef(p, o)[0, 1])
    return CascadeFit(r2, r * r, float(stats.spearmanr(p, o).statistic), n)
