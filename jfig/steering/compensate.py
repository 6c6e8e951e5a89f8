"""Compensated steering: clamp a few more features so that an edit changes what it should and little else.

Given the edited sources (`deltas`) and their predicted cascade p, a set U of control features is
clamped too, each at a change u_c; a clamped control cuts the paths through it. On the graph,
Δ(u) ≈ Δ(0) + R u, with Δ(0) the cascade with every control held at change 0 and R [C, N] the
linear response to a unit change of each control (the gating rows linearised at Δ(0); no bounds).
u minimises

    Σ_{off-target o} Δ_o(u)² + ridge·|u|² + keep_weight·Σ_{t ∈ intended} (Δ_t(u) − p_t)²

by least squares (numpy.linalg.lstsq). Off-target is every node but the sources and `intended` (or the
nodes given as `off_target`), so the controls' own changes u_c count too. Per-token deltas ([n] arrays)
and baselines are averaged over the tokens first: one u for all tokens, solved at the mean edit.

Graphs whose edges are total effects (measured by clamping, every site pair tested; see
`predict_cascade`'s compose): a source's weight to j already includes the path through a control c,
which the control's clamp replaces, so Δ_j(u) = p_j + Σ_c w_cj (u_c − p_c): R is the controls' own
first-order rows and Δ(0) = p − Σ_c w_cj p_c.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..edits import Clamp
from ..errors import OptionError, ShapeError, SiteError
from ..models.validation import saes_by_site
from .cascade import COMPOSE, CascadeNetwork, Key, check_deltas, check_key, composition_matrix, tested_site_pairs


@dataclass(frozen=True, eq=False)
class Compensation:
    """controls: C (site, feature) keys; u [C]: their changes; predicted_naive / predicted_compensated:
    {(site, feature): float} cascades (sources alone; sources and controls clamped), nonzero entries
    and the clamped features; off_target_naive / off_target_compensated: RMS of the predicted changes
    over the off-target nodes (every node but the sources and the intended features)."""

    controls: list[Key]
    u: np.ndarray
    predicted_naive: dict[Key, float]
    predicted_compensated: dict[Key, float]
    off_target_naive: float
    off_target_compensated: float

    def edits(self, saes, clean_features: Mapping, positions=None) -> list[Clamp]:
        """Clamp edits setting each control to its clean value + u_c (floored at 0), one Clamp per site.

        saes: a list or dict of SAEs covering the controls' sites; clean_features: {site: [batch, seq,
        d_sae]} clean SAE features (e.g. `ObservedCascade.clean`); positions: where the clamps apply
        (as for any edit; None: every position). Values are [batch, seq, k] for the k controls at a site.
        """
        by_site = saes_by_site(saes)
        edits = []
        for site in dict.fromkeys(s for s, _ in self.controls):
            picked = [i for i, (s, _) in enumerate(self.controls) if s == site]
            features = np.array([self.controls[i][1] for i in picked], np.int32)
            clean = clean_site_features(by_site, clean_features, site)
            value = np.maximum(clean[..., features] + self.u[picked], 0.0)      # a feature cannot go below 0
            edits.append(Clamp(by_site[site], features, value, positions))
        return edits


def clean_site_features(by_site: dict, clean_features: Mapping, site: str) -> np.ndarray:
    """The clean features [batch, seq, d_sae] at `site`, checked against its SAE."""
    if site not in by_site:
        raise SiteError(f"no SAE given for control site {site!r}; SAEs were given for {list(by_site)}")
    if site not in clean_features:
        raise SiteError(f"no clean features given for control site {site!r}; given for {list(clean_features)}")
    clean = np.asarray(clean_features[site])
    d_sae = by_site[site].d_sae
    if clean.ndim != 3 or clean.shape[-1] != d_sae:
        raise ShapeError(f"clean features at {site} have shape {clean.shape}; expected [batch, seq, {d_sae}]")
    return clean


def check_compensate_options(n_controls, ridge, keep_weight) -> None:
    if isinstance(n_controls, bool) or not isinstance(n_controls, (int, np.integer)) or n_controls < 0:
        raise OptionError(f"n_controls must be an int >= 0, got {n_controls!r}", key="n_controls")
    for name, value in (("ridge", ridge), ("keep_weight", keep_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 <= value < np.inf:
            raise OptionError(f"{name} must be a finite number >= 0, got {value!r}", key=name)


def mean_baseline(baseline):
    """A baseline (see `predict_cascade`) averaged over its tokens: dict values to floats, [n, N] to [N]."""
    if baseline is None:
        return None
    if isinstance(baseline, Mapping):
        return {k: float(np.mean(v)) for k, v in baseline.items()}
    b = np.asarray(baseline, np.float64)
    return b.mean(axis=0) if b.ndim == 2 else b


def pick_controls(network: CascadeNetwork, controls, n_controls: int, naive: np.ndarray,
                  off_target: np.ndarray) -> np.ndarray:
    """Control node indices: the given `controls` (off-target nodes only), or the `n_controls`
    off-target nodes with the largest nonzero |naive change| (naive [N])."""
    if controls is not None:
        index = network.locate(dict.fromkeys(check_key(k, "controls") for k in controls))
        if not off_target[index].all():
            bad = network.index.keys[int(index[~off_target[index]][0])]
            raise OptionError(f"control {bad!r} is an edited source or an intended feature; controls must be "
                              f"other nodes", key="controls")
        return index
    candidates = np.flatnonzero(off_target & (naive != 0))
    order = np.argsort(-np.abs(naive[candidates]), kind="stable")
    return np.sort(candidates[order[:n_controls]])


def compensate(graph, deltas, *, intended=(), controls=None, n_controls: int = 10, baseline=None,
               ridge: float = 1e-2, keep_weight: float = 100.0, off_target=None, compose: str = "auto") -> Compensation:
    """Controls and their changes u that cancel the off-target part of the cascade of `deltas`.

    deltas: {(site, feature): change} as for `predict_cascade` (arrays [n] are averaged over tokens);
    intended: the features whose naive predicted change p_t should be kept; controls: the control
    features, or None for the `n_controls` off-target nodes with the largest |predicted change|;
    baseline: as for `predict_cascade` (averaged over tokens), bounds Δ(0) and the reported cascades;
    ridge: penalty on |u|²; keep_weight: weight of keeping the intended changes (each unit² of
    intended change that costs about one unit² of off-target change loses about 1/keep_weight of it);
    off_target: the nodes whose changes count as side effects (default: all but sources and intended;
    e.g. only the features active where the edit applies); compose: as for `predict_cascade`.
    """
    check_compensate_options(n_controls, ridge, keep_weight)
    keys, values, _ = check_deltas(deltas)
    network = CascadeNetwork.from_graph(graph)
    sources = network.locate(keys)
    source_values = np.array([[float(np.mean(values[k])) for k in keys]])          # [1, k]
    targets = network.locate(dict.fromkeys(check_key(k, "intended") for k in intended))
    if np.isin(targets, sources).any():
        raise OptionError("an intended feature is also an edited source; intended features are the ones the "
                          "edit should change downstream", key="intended")
    if compose not in COMPOSE:
        raise OptionError(f"unknown compose {compose!r}; expected one of {COMPOSE}", key="compose")
    tested = tested_site_pairs(graph) if compose != "all" else None
    lower = network.lower_bounds(mean_baseline(baseline), None)
    if off_target is None:
        off_target = np.ones(network.n_nodes, bool)
    else:
        listed = network.locate(dict.fromkeys(check_key(k, "off_target") for k in off_target))
        off_target = np.zeros(network.n_nodes, bool)
        off_target[listed] = True
    off_target[sources] = off_target[targets] = False
    matrix = composition_matrix(network, sources, tested) if tested is not None else None
    naive = network.propagate(sources, source_values, lower=lower, matrix=matrix)[0]
    chosen = pick_controls(network, controls, n_controls, naive, off_target)
    fixed = np.concatenate([sources, chosen])
    if tested is not None:                                  # total effects: a control's clamp replaces its change
        rows = network.first_order[chosen].toarray()        # R [C, N]
        held = naive - (naive[chosen] @ rows)
        held[chosen] = 0.0
        u = solve_linear(held, rows, chosen, targets, naive, off_target, ridge, keep_weight)
        compensated = held + u @ rows
        compensated[chosen] = u
        if lower is not None:
            compensated = np.maximum(compensated, lower[0])
        compensated[sources] = source_values[0]
    else:
        u = solve_controls(network, sources, source_values, chosen, targets, naive, off_target, lower, ridge,
                           keep_weight)
        compensated = network.propagate(fixed, np.concatenate([source_values, u[None]], axis=1), lower=lower)[0]
    nodes = network.index.keys
    return Compensation(
        controls=[nodes[i] for i in chosen.tolist()], u=u,
        predicted_naive=as_floats(network.changes(naive[None], sources, per_token=False)),
        predicted_compensated=as_floats(network.changes(compensated[None], fixed, per_token=False)),
        off_target_naive=rms(naive[off_target]), off_target_compensated=rms(compensated[off_target]))


def solve_controls(network: CascadeNetwork, sources, source_values, chosen, targets, naive, off_target, lower,
                   ridge: float, keep_weight: float) -> np.ndarray:
    """u [C] by least squares on Δ(u) = Δ(0) + R u (see the module docstring)."""
    c = len(chosen)
    if c == 0:
        return np.zeros(0)
    fixed = np.concatenate([sources, chosen])
    held = network.propagate(fixed, np.concatenate([source_values, np.zeros((1, c))], axis=1), lower=lower)[0]  # Δ(0)
    unit = np.concatenate([np.zeros((c, len(sources))), np.eye(c)], axis=1)                          # [C, k + C]
    response = network.propagate(fixed, unit, gating=False, matrix=network.tangent(held))            # R [C, N]
    return solve_linear(held, response, chosen, targets, naive, off_target, ridge, keep_weight)


def solve_linear(held, response, chosen, targets, naive, off_target, ridge: float, keep_weight: float) -> np.ndarray:
    """u [C] minimising |Δ(0) + R u|² over off-target nodes (+ |u|² for the controls themselves, which R
    [C, N] holds as unit entries when they are off-target), ridge |u|² and keep_weight |Δ_t(u) − p_t|²."""
    c = len(chosen)
    if c == 0:
        return np.zeros(0)
    response = response.copy()
    response[np.arange(c), chosen] = 1.0            # a control's own change is u_c
    keep = np.sqrt(keep_weight)
    a = np.concatenate([response[:, off_target].T, np.sqrt(ridge) * np.eye(c), keep * response[:, targets].T])
    b = np.concatenate([-held[off_target], np.zeros(c), keep * (naive[targets] - held[targets])])
    return np.linalg.lstsq(a, b, rcond=None)[0]


def as_floats(changes: dict) -> dict[Key, float]:
    return {k: float(v) for k, v in changes.items()}


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x ** 2))) if x.size else 0.0
