"""Planted models: `jfig.Model.from_function` models whose feature interactions are known exactly.

`planted_model(...)` returns (model, saes, truth). The model has `n_sites` sites,
``blocks.{s}.hook_resid_post`` for s = 0..n_sites-1, each `n_features` wide and read by an identity
ReLU SAE (feature f is coordinate f). Every interaction is per token (same position). Activations at
site s are

    x^s = X^s(token) + bias^s + Σ_{a<s} x^a W^{a,s} + Σ_gates g · x^a_i · x^c_k · e_j

- features that receive a planted edge or gate ("targets") carry a bias large enough that they are
  active (positive) on every token, also under the clamps a measurement applies, so the ReLU never
  clips them and every slope is linear;
- every other feature fires on a random half of the vocabulary with a value in [1, 2] (X^s);
- the two inputs of a gate (and every feature gated together with them) fire on the same tokens with
  one constant value each (`truth.values`), so a gate input's first-order slope on the gate's target,
  w + g · (its partner's value), is exact, not an average over inputs.

So the clamp slope of feature i on feature j (the change of j per unit of i, the number
`jfig.measure_effects` estimates with any method) is exactly the total of the planted linear paths
from i to j (plus g · partner value for a gate input on its target), and exactly zero for every other
pair. A gate's factorial contrast and mixed derivative are exactly g; those of every other pair of
features are exactly zero. The logits read every site (Σ_s x^s U_s with random U_s), so every
feature matters to the loss.

Gates keep this exact when their inputs receive no planted edge or gate and their target sends none;
`planted_model` refuses other gates.

`recovery(graph, truth)` compares a built `InteractionGraph` with the truth: precision, recall, sign
agreement and the largest weight error on the recovered planted edges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import OptionError
from ..graph import InteractionGraph
from ..models.model import Model
from ..saes.sae import SAE

FIRST_ORDER = ("excitatory", "inhibitory")
FIRING_MAX = 3.0     # bound on a firing feature's value under a measurement's clamps: values in [1, 2], levels
                     # widened by half when a feature has one constant value
SLOPE_TOLERANCE = 1e-9


def site_name(index: int) -> str:
    """The name of a planted model's site `index`: ``blocks.{index}.hook_resid_post``."""
    return f"blocks.{index}.hook_resid_post"


def identity_sae(site: str, width: int) -> SAE:
    """A ReLU SAE whose feature f is coordinate f of the site (identity encoder and decoder, no biases)."""
    eye = jnp.eye(width)
    return SAE(W_enc=eye, b_enc=jnp.zeros(width), W_dec=eye, b_dec=jnp.zeros(width), threshold=None, site=site,
               architecture="relu", apply_b_dec_to_input=False)


class PlantedEdge(NamedTuple):
    """One edge of a planted model, in the terms of an `InteractionGraph` row.

    kind: "excitatory" or "inhibitory" (weight: the exact clamp slope of target per unit of source,
    positive or negative) or "gating" (weight: g, the exact factorial contrast and mixed derivative of
    source and modulator on target; `modulator` is its (site, feature), None for first-order edges)."""

    source_site: str
    source: int
    target_site: str
    target: int
    kind: str
    weight: float
    modulator: tuple[str, int] | None = None


@dataclass(frozen=True)
class PlantedTruth:
    """What a planted model's interactions are.

    `edges`: every edge a perfect graph of the model has: the total first-order slope of every pair
    of features at different sites whose slope is not zero (planted edges, paths of planted edges
    through intermediate sites, and the first-order slopes of gate inputs on their targets) and every
    planted gate. `planted`: the edges as they were given (inhibitory weights negative). `values`:
    the constant value of each gate input, {(site, feature): value}, when it fires.
    """

    sites: tuple[str, ...]
    n_features: int
    vocab_size: int
    edges: tuple[PlantedEdge, ...]
    planted: tuple[PlantedEdge, ...]
    values: dict = field(default_factory=dict)

    @property
    def first_order(self) -> dict:
        """{(source_site, source, target_site, target): slope} of every first-order edge."""
        return {(e.source_site, e.source, e.target_site, e.target): e.weight for e in self.edges
                if e.kind in FIRST_ORDER}

    @property
    def gates(self) -> dict:
        """{(source_site, source, modulator_site, modulator, target_site, target): g} of every gate."""
        return {(e.source_site, e.source, *e.modulator, e.target_site, e.target): e.weight for e in self.edges
                if e.kind == "gating"}

    def slopes(self, source_site: str, target_site: str) -> np.ndarray:
        """[n_features, n_features]: the exact clamp slope of each target feature (columns) per unit of each
        source feature (rows); the identity when the sites are the same, zeros when the target site comes
        first."""
        a, b = self.sites.index(source_site), self.sites.index(target_site)
        if a == b:
            return np.eye(self.n_features)
        out = np.zeros((self.n_features, self.n_features))
        for (ss, s, ts, t), w in self.first_order.items():
            if ss == source_site and ts == target_site:
                out[s, t] = w
        return out

    def slope(self, source: tuple[str, int], target: tuple[str, int]) -> float:
        """The exact clamp slope of `target` (site, feature) per unit of `source` (site, feature)."""
        return float(self.slopes(source[0], target[0])[source[1], target[1]])

    def gate(self, source: tuple[str, int], modulator: tuple[str, int], target: tuple[str, int]) -> float:
        """g of a planted gate (either input order), 0.0 for any other triple."""
        gates = self.gates
        for a, b in ((source, modulator), (modulator, source)):
            key = (*a, *b, *target)
            if key in gates:
                return gates[key]
        return 0.0


# ------------------------------------------------------------------------------------- parsing

def site_index(value, n_sites: int, sites: tuple[str, ...], what: str) -> int:
    """A site given by index or name, as an index in [0, n_sites)."""
    if isinstance(value, str):
        if value not in sites:
            raise OptionError(f"{what}: unknown site {value!r}; the planted sites are {sites}", what)
        return sites.index(value)
    if not isinstance(value, (int, np.integer)) or not 0 <= value < n_sites:
        raise OptionError(f"{what}: site {value!r} must be an index in [0, {n_sites}) or a site name", what)
    return int(value)


def feature_index(value, n_features: int, what: str) -> int:
    if not isinstance(value, (int, np.integer)) or not 0 <= value < n_features:
        raise OptionError(f"{what}: feature {value!r} must be an int in [0, {n_features})", what)
    return int(value)


def nonzero_weight(value, what: str) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"{what}: weight {value!r} must be a number", what) from None
    if not math.isfinite(w) or w == 0.0:
        raise OptionError(f"{what}: weight {value!r} must be finite and not zero", what)
    return w


def parse_first_order(specs, kind: str, n_sites: int, n_features: int, sites: tuple[str, ...]) -> list:
    """[(a, i, b, j, w)] from (i, j, w) (site 0 -> site 1) or (source_site, i, target_site, j, w) entries;
    inhibitory weights become -|w|."""
    out = []
    for spec in specs:
        spec = tuple(spec)
        what = f"{kind} {spec!r}"
        if len(spec) == 3:
            a, b, (i, j, w) = 0, 1, spec
        elif len(spec) == 5:
            a, i, b, j, w = spec
            a, b = site_index(a, n_sites, sites, what), site_index(b, n_sites, sites, what)
        else:
            raise OptionError(f"{what}: expected (source, target, weight) or (source_site, source, target_site, "
                              f"target, weight)", kind)
        w = nonzero_weight(w, what)
        if a >= b:
            raise OptionError(f"{what}: the source site must come before the target site", kind)
        out.append((a, feature_index(i, n_features, what), b, feature_index(j, n_features, what),
                    abs(w) if kind == "excitatory" else -abs(w)))
    return out


def parse_gates(specs, n_sites: int, n_features: int, sites: tuple[str, ...]) -> list:
    """[(a, i, c, k, b, j, g)] from (i, k, j, g) (inputs at site 0, target at site 1) or (source_site,
    source, modulator_site, modulator, target_site, target, g) entries."""
    out = []
    for spec in specs:
        spec = tuple(spec)
        what = f"gating {spec!r}"
        if len(spec) == 4:
            a, c, b, (i, k, j, g) = 0, 0, 1, spec
        elif len(spec) == 7:
            a, i, c, k, b, j, g = spec
            a, c, b = (site_index(x, n_sites, sites, what) for x in (a, c, b))
        else:
            raise OptionError(f"{what}: expected (source, modulator, target, g) or (source_site, source, "
                              f"modulator_site, modulator, target_site, target, g)", "gating")
        g = nonzero_weight(g, what)
        i, k, j = (feature_index(x, n_features, what) for x in (i, k, j))
        if max(a, c) >= b:
            raise OptionError(f"{what}: both inputs' sites must come before the target's", "gating")
        if (a, i) == (c, k):
            raise OptionError(f"{what}: a gate needs two different input features", "gating")
        out.append((a, i, c, k, b, j, g))
    return out


def check_structure(linear: list, gates: list, sites: tuple[str, ...]) -> None:
    """No repeated pair or gate; gate inputs receive nothing planted and gate targets send nothing."""
    seen = {}
    for a, i, b, j, w in linear:
        if (a, i, b, j) in seen:
            raise OptionError(f"the pair {sites[a]}#{i} -> {sites[b]}#{j} is planted twice "
                              f"({seen[(a, i, b, j)]:g} and {w:g})", "excitatory")
        seen[(a, i, b, j)] = w
    triples = set()
    for a, i, c, k, b, j, _ in gates:
        key = (frozenset({(a, i), (c, k)}), b, j)
        if key in triples:
            raise OptionError(f"the gate {sites[a]}#{i}, {sites[c]}#{k} -> {sites[b]}#{j} is planted twice", "gating")
        triples.add(key)
    receives = {(b, j) for a, i, b, j, _ in linear} | {(b, j) for *_, b, j, _ in gates}
    sends = {(a, i) for a, i, *_ in linear} | {(a, i) for a, i, *_ in gates} | {(c, k) for _, _, c, k, *_ in gates}
    for a, i, c, k, b, j, _ in gates:
        for s, f in ((a, i), (c, k)):
            if (s, f) in receives:
                raise OptionError(f"gate input {sites[s]}#{f} also receives a planted edge or gate; gate inputs must "
                                  f"be features that only fire (their value is then constant, and every slope exact)",
                                  "gating")
        if (b, j) in sends:
            raise OptionError(f"gate target {sites[b]}#{j} also sends a planted edge or gate; a gate's target must "
                              f"be an end point (else its downstream slopes would vary with the gate)", "gating")


def gate_components(gates: list) -> list[list[tuple[int, int]]]:
    """The gate inputs grouped into connected components (features gated together, directly or not)."""
    parent: dict = {}

    def root(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, i, c, k, *_ in gates:
        parent[root((a, i))] = root((c, k))
    groups: dict = {}
    for x in sorted(parent):
        groups.setdefault(root(x), []).append(x)
    return list(groups.values())


# --------------------------------------------------------------------------------------- the model

def planted_model(n_sites: int = 2, n_features: int = 16, excitatory=(), inhibitory=(), gating=(), *,
                  vocab_size: int = 64, seed: int = 0):
    """(model, saes, truth) of a planted model with known interactions (module docstring).

    n_sites sites ``blocks.{s}.hook_resid_post``, each `n_features` wide with an identity ReLU SAE.
    excitatory / inhibitory: (i, j, w) entries (feature i at site 0 -> feature j at site 1, clamp slope
    w; inhibitory weights are taken as -|w|) or (source_site, i, target_site, j, w) with sites as
    indices or names, source site first. gating: (i, k, j, g) (inputs i and k at site 0, target j at
    site 1) or (source_site, i, modulator_site, k, target_site, j, g): x_j += g · x_i · x_k. Tokens are
    ids in [0, vocab_size); `seed` draws the firing tables and the unembeddings.

    >>> model, saes, truth = planted_model(excitatory=[(0, 1, 2.0)], inhibitory=[(2, 3, 1.5)],
    ...                                    gating=[(4, 5, 6, 1.0)])
    >>> truth.slope((truth.sites[0], 0), (truth.sites[1], 1))
    2.0
    """
    if not isinstance(n_sites, int) or n_sites < 2:
        raise OptionError(f"n_sites must be an int >= 2, got {n_sites!r}", "n_sites")
    if not isinstance(n_features, int) or n_features < 1:
        raise OptionError(f"n_features must be an int >= 1, got {n_features!r}", "n_features")
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise OptionError(f"vocab_size must be an int >= 2, got {vocab_size!r}", "vocab_size")
    D = n_features
    sites = tuple(site_name(s) for s in range(n_sites))
    linear = (parse_first_order(excitatory, "excitatory", n_sites, D, sites)
              + parse_first_order(inhibitory, "inhibitory", n_sites, D, sites))
    gates = parse_gates(gating, n_sites, D, sites)
    check_structure(linear, gates, sites)

    rng = np.random.default_rng(seed)
    half = max(1, vocab_size // 2)
    receives = {(b, j) for a, i, b, j, _ in linear} | {(b, j) for *_, b, j, _ in gates}
    components = gate_components(gates)
    gated = {x for group in components for x in group}
    X = np.zeros((n_sites, vocab_size, D), np.float32)
    for s in range(n_sites):
        for f in range(D):
            if (s, f) not in receives and (s, f) not in gated:
                on = rng.permutation(vocab_size)[:half]
                X[s, on, f] = rng.uniform(1.0, 2.0, half)
    values = {}
    for group in components:
        on = rng.permutation(vocab_size)[:half]
        for s, f in group:
            c = np.float32(rng.uniform(1.0, 2.0))
            X[s, on, f] = c
            values[(sites[s], f)] = float(c)

    # biases: a target stays positive for any input values (and clamps) within the inputs' bounds
    bound = np.full((n_sites, D), FIRING_MAX)
    bias = np.zeros((n_sites, D), np.float32)
    for b in range(n_sites):
        for j in range(D):
            if (b, j) not in receives:
                continue
            reach = sum(abs(w) * bound[a, i] for a, i, bb, jj, w in linear if (bb, jj) == (b, j))
            reach += sum(abs(g) * bound[a, i] * bound[c, k] for a, i, c, k, bb, jj, g in gates if (bb, jj) == (b, j))
            bias[b, j] = 1.0 + reach
            bound[b, j] = 1.5 * (bias[b, j] + reach)

    W = {}
    for a, i, b, j, w in linear:
        W.setdefault((a, b), np.zeros((D, D), np.float32))[i, j] = w
    gate_groups: dict = {}
    for a, i, c, k, b, j, g in gates:
        gate_groups.setdefault((a, c, b), []).append((i, k, j, g))
    links = {b: sorted(a for a, bb in W if bb == b) for b in range(n_sites)}
    gate_index = {key: tuple(np.asarray(col, np.int32) for col in list(zip(*rows))[:3])
                  for key, rows in gate_groups.items()}
    keys = jax.random.split(jax.random.PRNGKey(seed), n_sites)
    params = {"X": [jnp.asarray(X[s]) for s in range(n_sites)],
              "bias": [jnp.asarray(bias[s]) for s in range(n_sites)],
              "W": {f"{a}->{b}": jnp.asarray(m) for (a, b), m in W.items()},
              "G": {f"{a},{c}->{b}": jnp.asarray([r[3] for r in rows], jnp.float32)
                    for (a, c, b), rows in gate_groups.items()},
              "U": [jax.random.normal(keys[s], (D, vocab_size)) / math.sqrt(D) for s in range(n_sites)]}

    def apply(p, tokens, hook):
        xs, logits = [], 0.0
        for s in range(n_sites):
            t = p["X"][s][tokens] + p["bias"][s]
            for a in links[s]:
                t = t + xs[a] @ p["W"][f"{a}->{s}"]
            for (a, c, b), (gi, gk, gj) in gate_index.items():
                if b == s:
                    t = t.at[..., gj].add(p["G"][f"{a},{c}->{b}"] * xs[a][..., gi] * xs[c][..., gk])
            x = hook(sites[s], t)
            xs.append(x)
            logits = logits + x @ p["U"][s]
        return logits

    model = Model.from_function(apply, params, sites=sites, vocab_size=vocab_size, site_widths={s: D for s in sites})
    saes = [identity_sae(s, D) for s in sites]
    truth = PlantedTruth(sites, D, vocab_size, total_edges(linear, gates, values, sites, D),
                         planted_edges(linear, gates, sites), values)
    return model, saes, truth


def planted_edges(linear: list, gates: list, sites: tuple[str, ...]) -> tuple[PlantedEdge, ...]:
    """The edges as given, in the order given (excitatory, inhibitory, then gates)."""
    out = [PlantedEdge(sites[a], i, sites[b], j, "excitatory" if w > 0 else "inhibitory", float(w))
           for a, i, b, j, w in linear]
    out += [PlantedEdge(sites[a], i, sites[b], j, "gating", float(g), (sites[c], k)) for a, i, c, k, b, j, g in gates]
    return tuple(out)


def total_edges(linear: list, gates: list, values: dict, sites: tuple[str, ...], D: int) -> tuple[PlantedEdge, ...]:
    """Every nonzero total first-order slope (sums over planted paths of products of slopes; a gate input's
    slope on its target is g times its partner's constant value) and every gate."""
    n = len(sites) * D
    A = np.zeros((n, n))
    for a, i, b, j, w in linear:
        A[a * D + i, b * D + j] += w
    for a, i, c, k, b, j, g in gates:
        A[a * D + i, b * D + j] += g * values[(sites[c], k)]
        A[c * D + k, b * D + j] += g * values[(sites[a], i)]
    total, power = np.zeros_like(A), np.eye(n)
    for _ in range(len(sites) - 1):          # paths go forward across sites: at most n_sites - 1 steps
        power = power @ A
        total += power
    scale = max(1.0, float(np.abs(total).max(initial=0.0)))
    out = []
    for src, tgt in zip(*np.nonzero(np.abs(total) > SLOPE_TOLERANCE * scale)):
        w = float(total[src, tgt])
        out.append(PlantedEdge(sites[src // D], int(src % D), sites[tgt // D], int(tgt % D),
                               "excitatory" if w > 0 else "inhibitory", w))
    out += [PlantedEdge(sites[a], i, sites[b], j, "gating", float(g), (sites[c], k)) for a, i, c, k, b, j, g in gates]
    return tuple(out)


# ------------------------------------------------------------------------------------- recovery

def edge_key(source_site, source, target_site, target, kind, modulator_site=None, modulator=None):
    """How an edge is matched: first-order edges by (source, target); gates by their target and the
    unordered pair of inputs (a build names the later-site input, or either one, the source)."""
    if kind == "gating":
        return ("gating", target_site, int(target), frozenset({(source_site, int(source)),
                                                                (modulator_site, int(modulator))}))
    return ("first", source_site, int(source), target_site, int(target))


def graph_edges(graph: InteractionGraph) -> dict:
    """{key: PlantedEdge} of a graph's rows (the first row of a repeated key)."""
    cols = graph.edges.select(["source_site", "source", "target_site", "target", "kind", "weight", "modulator_site",
                               "modulator"]).to_pydict()
    out = {}
    for ss, s, ts, t, kind, w, ms, m in zip(*cols.values()):
        key = edge_key(ss, s, ts, t, kind, ms, m)
        if key not in out:
            out[key] = PlantedEdge(ss, int(s), ts, int(t), kind, float(w), None if m is None else (ms, int(m)))
    return out


def truth_edges(truth: PlantedTruth) -> dict:
    return {edge_key(e.source_site, e.source, e.target_site, e.target, e.kind,
                     *(e.modulator if e.modulator is not None else (None, None))): e for e in truth.edges}


def scores(found: dict, true: dict) -> dict:
    matched = [k for k in found if k in true]
    errors = [abs(found[k].weight - true[k].weight) for k in matched]
    signs = [np.sign(found[k].weight) == np.sign(true[k].weight) for k in matched]
    return {"precision": len(matched) / len(found) if found else math.nan,
            "recall": len(matched) / len(true) if true else math.nan,
            "sign_agreement": float(np.mean(signs)) if signs else math.nan,
            "max_slope_error": float(max(errors)) if errors else math.nan,
            "n_true": len(true), "n_found": len(found), "n_matched": len(matched)}


def recovery(graph: InteractionGraph, truth: PlantedTruth) -> dict:
    """How well `graph` recovers a planted model's `truth`.

    An edge of the graph matches a true edge with the same source and target (first order, whatever
    its sign) or the same target and the same two inputs (gating, in either order). Returns
    precision (matched / graph edges), recall (matched / true edges), sign_agreement (fraction of
    matched edges whose weight has the true weight's sign) and max_slope_error (the largest
    |graph weight - true weight| over matched edges: clamp slopes for first-order edges, the gating
    statistic against g for gates), NaN where undefined (no edges to divide by); n_true, n_found
    and n_matched; the same numbers per kind under "first_order" and "gating"; and the unmatched
    edges, "missed" (true edges, PlantedEdge) and "spurious" (graph edges, PlantedEdge).
    """
    found, true = graph_edges(graph), truth_edges(truth)
    out = scores(found, true)
    for name, test in (("first_order", lambda k: k[0] == "first"), ("gating", lambda k: k[0] == "gating")):
        out[name] = scores({k: v for k, v in found.items() if test(k)}, {k: v for k, v in true.items() if test(k)})
    out["missed"] = [e for k, e in true.items() if k not in found]
    out["spurious"] = [e for k, e in found.items() if k not in true]
    return out
