"""2x2 designs by stimulus: prompts that cross two binary properties, every SAE feature's response.

Each prompt carries two labels (e.g. tone positive / negative and fact true / false). A feature's
activation on a prompt (at its last token, or its mean or max over tokens) is fitted by ordinary
least squares with an interaction term in effect coding (x = ±1/2 per factor):

    y = c + a·x_A + b·x_B + d·x_A·x_B,

so a is the main effect of factor A averaged over B's levels, b likewise, and d the interaction
m11 − m10 − m01 + m00 of the four cell means (the saturated model fits the cell means exactly, so
this holds for unbalanced cells too). t statistics and two-sided p-values use the residual variance
with N − 4 degrees of freedom; for a balanced 2x2 these are the two-way ANOVA's F tests (F = t²),
for unbalanced cells its type-III tests. "Discriminative features" are those with the largest |t|.

Why numpy OLS and scipy.stats rather than statsmodels: the design matrix [N, 4] is shared by every
feature, so one least-squares solve fits thousands of features at once (statsmodels fits one model
per response) and statsmodels is not a dependency; scipy gives the t distribution.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import t as student_t

from ..errors import JfigError
from ..sites import site_key

REDUCTIONS = ("last", "mean", "max")
EFFECTS = ("a", "b", "interaction")


@dataclass(frozen=True)
class StimulusDesign:
    """A 2x2 stimulus design over n features: factor A (`levels_a` = (off, on) labels) x factor B.

    counts [2, 2] prompts per cell ([A level, B level]); cell_means [2, 2, n]; for each effect in
    ("a", "b", "interaction"): estimate, t and p [n] in `effects[name]` (a dict with keys "estimate",
    "t", "p"). sites [n] and features [n] name the columns (the SAE site and feature id; site is ""
    for values given without a model). dof: N − 4.
    """

    levels_a: tuple[str, str]
    levels_b: tuple[str, str]
    counts: np.ndarray
    cell_means: np.ndarray
    effects: dict
    sites: np.ndarray
    features: np.ndarray
    dof: int

    @property
    def interaction(self) -> np.ndarray:
        """[n] m11 − m10 − m01 + m00."""
        return self.effects["interaction"]["estimate"]

    def discriminative(self, effect: str = "interaction", k: int = 10) -> list[dict]:
        """The k features with the largest |t| of `effect` ("a", "b" or "interaction"), largest first:
        dicts of site, feature, estimate, t, p and the four cell means (m00, m01, m10, m11)."""
        if effect not in EFFECTS:
            raise JfigError(f"effect must be one of {EFFECTS}, got {effect!r}")
        t = self.effects[effect]["t"]
        order = np.argsort(-np.where(np.isfinite(t), np.abs(t), -1.0), kind="stable")[:k]
        m = self.cell_means
        return [dict(site=str(self.sites[i]), feature=int(self.features[i]),
                     estimate=float(self.effects[effect]["estimate"][i]), t=float(t[i]),
                     p=float(self.effects[effect]["p"][i]), m00=float(m[0, 0, i]), m01=float(m[0, 1, i]),
                     m10=float(m[1, 0, i]), m11=float(m[1, 1, i])) for i in order if np.isfinite(t[i])]


def design_levels(labels, levels, factor: str) -> tuple[np.ndarray, tuple[str, str]]:
    """(x [N] in {0, 1}, (off, on) level names) from string labels; `levels` fixes the order."""
    lab = np.asarray([str(x) for x in labels])
    found = tuple(sorted(set(lab.tolist())))
    if levels is None:
        if len(found) != 2:
            raise JfigError(f"factor {factor} has labels {list(found)}; a 2x2 design needs exactly two levels "
                            f"(or give levels_{factor.lower()}=(off, on))")
        levels = found
    levels = tuple(str(x) for x in levels)
    if len(levels) != 2 or levels[0] == levels[1]:
        raise JfigError(f"levels_{factor.lower()} must be two distinct labels (off, on), got {levels!r}")
    unknown = sorted(set(found) - set(levels))
    if unknown:
        raise JfigError(f"factor {factor}: unknown label(s) {unknown}; expected one of {list(levels)}")
    return (lab == levels[1]).astype(np.int64), levels


def fit_stimulus_design(values, labels_a, labels_b, *, levels_a=None, levels_b=None, sites=None,
                        features=None) -> StimulusDesign:
    """The 2x2 design of `values` [N, n] (one row per prompt, one column per feature) with two labels
    per prompt (labels_a, labels_b: [N] strings; levels_*: (off, on), default the sorted labels).
    sites / features [n] name the columns (default "" and 0..n-1)."""
    y = np.asarray(values, np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise JfigError(f"values must be [n_prompts, n_features], got shape {y.shape}")
    N = y.shape[0]
    if len(labels_a) != N or len(labels_b) != N:
        raise JfigError(f"{N} prompts but {len(labels_a)} labels for factor A and {len(labels_b)} for factor B; "
                        f"expected one label per prompt for each factor")
    bad = ~np.isfinite(y)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise JfigError(f"values hold {int(bad.sum())} NaN or infinite entries (first: prompt {r}, column {c}); "
                        f"expected finite activations")
    xa, levels_a = design_levels(labels_a, levels_a, "A")
    xb, levels_b = design_levels(labels_b, levels_b, "B")
    counts = np.zeros((2, 2), np.int64)
    np.add.at(counts, (xa, xb), 1)
    for i in range(2):
        for j in range(2):
            if counts[i, j] == 0:
                raise JfigError(f"a 2x2 design with an empty cell: no prompt has A={levels_a[i]!r} and "
                                f"B={levels_b[j]!r}; every one of the four cells needs at least one prompt")
    cell = xa * 2 + xb
    means = np.stack([y[cell == c].mean(0) for c in range(4)]).reshape(2, 2, -1)
    ea, eb = xa - 0.5, xb - 0.5
    X = np.stack([np.ones(N), ea, eb, ea * eb], axis=1)       # x_A·x_B = ±1/4, so d is the cell-mean contrast
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)                                 # [4, n]
    dof = N - 4
    resid = y - X @ beta
    with np.errstate(invalid="ignore", divide="ignore"):
        s2 = (resid * resid).sum(0) / dof if dof > 0 else np.full(y.shape[1], np.nan)
        se = np.sqrt(np.outer(np.diag(np.linalg.inv(X.T @ X)), s2))              # [4, n]
        t = np.where(se > 0, beta / se, np.nan)
    p = 2.0 * student_t.sf(np.abs(t), max(dof, 1)) if dof > 0 else np.full_like(t, np.nan)
    effects = {name: dict(estimate=beta[k], t=t[k], p=p[k]) for k, name in ((1, "a"), (2, "b"), (3, "interaction"))}
    n = y.shape[1]
    return StimulusDesign(levels_a, levels_b, counts, means, effects,
                          np.asarray([""] * n if sites is None else sites, object),
                          np.arange(n) if features is None else np.asarray(features, np.int64), dof)


def load_design_prompts(path, factor_a: str, factor_b: str, *, text_key: str = "text"):
    """(texts, labels_a, labels_b) from a JSONL file with one object per line holding `text_key` and the
    two factors' labels."""
    texts, la, lb = [], [], []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        for key in (text_key, factor_a, factor_b):
            if key not in row:
                raise JfigError(f"{path}:{n} has no {key!r} field; expected {text_key!r}, {factor_a!r} and "
                                f"{factor_b!r}")
        texts.append(str(row[text_key]))
        la.append(str(row[factor_a]))
        lb.append(str(row[factor_b]))
    if not texts:
        raise JfigError(f"{path} holds no prompts")
    return texts, la, lb


def prompt_features(model, saes, texts, *, features=None, reduce: str = "last", skip_positions: int = 1,
                    batch_size: int = 16):
    """(values [N, n], sites [n], features [n]): each SAE feature's activation on each text, at its last
    token, or the mean or max over its tokens from `skip_positions` on. `features`: {site: ids}
    (default every feature of every SAE)."""
    if reduce not in REDUCTIONS:
        raise JfigError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if model.tokenizer is None:
        raise JfigError("prompt_features tokenizes texts: the model needs a tokenizer")
    saes = model.check_saes(saes)
    sites = sorted(saes, key=site_key)
    cols = {s: (np.arange(saes[s].d_sae) if features is None or s not in features
                else np.asarray(features[s], np.int64)) for s in sites}
    if features is not None:
        sites = [s for s in sites if s in features]
        unknown = sorted(set(features) - set(saes))
        if unknown:
            raise JfigError(f"features at {unknown}: no SAE there; SAEs are at {sorted(saes)}")
    ids = model.tokenizer.encode_batch(list(texts))
    lengths = np.asarray([len(i) for i in ids])
    if (lengths <= skip_positions).any():
        raise JfigError(f"text {int(np.argmax(lengths <= skip_positions))} has {lengths.min()} token(s); expected "
                        f"more than skip_positions={skip_positions}")
    S = int(lengths.max())
    toks = np.zeros((len(ids), S), np.int32)
    for r, i in enumerate(ids):
        toks[r, :len(i)] = i                      # right padding: causal attention never reads it
    pos = np.arange(S)
    valid = (pos[None] >= skip_positions) & (pos[None] < lengths[:, None])            # [N, S]
    out = []
    for b0 in range(0, len(ids), batch_size):
        run = model.run(toks[b0:b0 + batch_size], capture=tuple(sites), stop_at=sites[-1], logits=False)
        v = valid[b0:b0 + batch_size]
        last = lengths[b0:b0 + batch_size] - 1
        parts = []
        for s in sites:
            f = np.asarray(saes[s].encode(run.cache[s]))[..., cols[s]]                  # [b, S, n_s]
            if reduce == "last":
                parts.append(f[np.arange(len(last)), last])
            elif reduce == "mean":
                parts.append((f * v[..., None]).sum(1) / v.sum(1, keepdims=True))
            else:
                parts.append(np.where(v[..., None], f, -np.inf).max(1))
        out.append(np.concatenate(parts, axis=1))
    site_col = np.concatenate([np.full(len(cols[s]), s, object) for s in sites])
    return np.concatenate(out), site_col, np.concatenate([cols[s] for s in sites])


def stimulus_design(model, saes, texts, labels_a, labels_b, *, levels_a=None, levels_b=None, features=None,
                    reduce: str = "last", skip_positions: int = 1, batch_size: int = 16) -> StimulusDesign:
    """The 2x2 stimulus design of `texts` (two labels each) over every feature of `saes` (or `features`,
    {site: ids}); see `prompt_features` and `fit_stimulus_design`. The labels are checked first."""
    if len(labels_a) != len(texts) or len(labels_b) != len(texts):
        raise JfigError(f"{len(texts)} texts but {len(labels_a)} labels for factor A and {len(labels_b)} for "
                        f"factor B; expected one label per text for each factor")
    fit_stimulus_design(np.zeros((len(texts), 1)), labels_a, labels_b, levels_a=levels_a, levels_b=levels_b)
    values, sites, feats = prompt_features(model, saes, texts, features=features, reduce=reduce,
                                           skip_positions=skip_positions, batch_size=batch_size)
    return fit_stimulus_design(values, labels_a, labels_b, levels_a=levels_a, levels_b=levels_b, sites=sites,
                               features=feats)
