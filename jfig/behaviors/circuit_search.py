"""Feature circuit search: ACDC-style greedy pruning over SAE features and feature-to-feature edges.

The universe is a set of *candidate* features at the search sites (residual, ``hook_attn_out`` and
``hook_mlp_out`` SAEs): the top `candidates` per site by attribution patching. Every feature outside
the candidates is ablated throughout. Every edit keeps the SAE error and touches every prompt position
but the first (the sequence-start token is an attention sink). Ablating a feature sets it, per token,
to its *ablation value*: its value on the corrupted prompt at that position (``"corrupted"``, ACDC's
patching), its mean over the suite (``"mean"``) or 0 (``"zero"``).

Definitions (m = the behaviour metric, by default the mean logit difference; span = m_clean - m_none,
m_none = every feature of every search site ablated):

- **node ablation** of feature i at site s: x_s' = x_s + decode(f') - decode(f) with f'_i = its
  ablation value (the other features and the error unchanged).
- **edge** u -> v, u = (a, i) at site a, v = (b, j) at a later site b. Its *contribution* is the
  per-token change D_uv [n, seq] of f_j at b when u alone is ablated at a in the clean model *with
  every feature of every search site strictly between a and b held at its clean value* (error kept):
  the direct effect of u on v, not the paths through intermediate features (those are edges of their
  own). **Ablating the edge** adds D_uv to v's value at b (error-preserving, through v's decoder
  direction) and changes nothing else: u itself, and every other path from u, stay as they are.
  Ablating several edges into v adds their contributions (as ACDC sums a node's incoming edges).
- The circuit's metric m(C) is the metric with every feature outside C's nodes ablated and every
  candidate edge among C's nodes that is not in C ablated, all in one run.

The search (``feature_circuit``) prunes nodes first, then edges among the kept nodes, each in
ACDC's order from the output backwards: nodes site by site from the last search site; edges grouped
by their downstream site, from the last. Within a group the pruning is greedy and batched: all
remaining items are ablated one at a time on top of the current state (one vmapped pass), ordered by
|change|, and the longest prefix of that order whose every step changes m by at most
``threshold · |span|`` is removed (the prefixes are a second vmapped pass; this is exactly ACDC's
sequential test in that order up to the first item that must stay). Passes repeat until none of the
remaining items can go, so every kept item of a group, ablated alone from the final state of its
group, changes m by more than the threshold.

faithfulness = (m(C) - m_none) / (m_clean - m_none): 1 keeps the whole behaviour, 0 is no better than
ablating every feature. ``direct_circuit_metric`` recomputes m(C) without the search's machinery
(stock edits, one run per contribution and one for the circuit) as a check.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from ..edits import Clamp, SAEEdit, SetFeatures, ShiftFeatures, where_positions
from ..errors import JfigError, ShapeError, SiteError
from ..graph import InteractionGraph
from ..models.model import Prefix
from ..sites import RESIDUAL_BASIS, parse_site, site_layer
from .metric import final_site, logit_diff, residual_logit_diff
from .seeds import edit_positions
from .subgraph import Subgraph
from .suite import SuiteTokens, as_suite, tokenize_suite

log = logging.getLogger(__name__)
ABLATIONS = ("corrupted", "mean", "zero")
REST = -1            # a site's rest node: every feature of the site that is not a candidate


# ------------------------------------------------------------------------------------------ the edit

class CircuitEdit(SAEEdit):
    """The search's one edit per site, error-preserving: f' = where(ablate, ablated, where(hold, held, f))
    + shift and x' = x + decode(f') - decode(f) at `positions`.

    ablate, hold: bool [d_sae] (traced, so vmapped over states); ablated, held: per-token feature values
    broadcastable to the features [batch, seq, d_sae] (ablation values; clean values); shift: added
    feature values [batch, seq, d_sae] (ablated edges' contributions); positions: bool [batch, seq].
    """

    sae: Any
    ablate: jax.Array
    ablated: jax.Array
    hold: jax.Array
    held: jax.Array
    shift: jax.Array
    positions: jax.Array | None = None

    def __init__(self, sae, ablate, ablated, hold, held, shift, positions=None):
        self.sae = sae
        self.ablate, self.hold = jnp.asarray(ablate), jnp.asarray(hold)
        for name, mask in (("ablate", self.ablate), ("hold", self.hold)):
            if mask.dtype != jnp.bool_ or mask.shape != (sae.d_sae,):
                raise ShapeError(f"CircuitEdit at {sae.site}: {name} must be bool [d_sae={sae.d_sae}], got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
        self.ablated, self.held, self.shift = (jnp.asarray(a, jnp.float32) for a in (ablated, held, shift))
        self.positions = None if positions is None else jnp.asarray(positions)

    def apply(self, x, pos_axis: int = 1):
        self.check(x.shape, pos_axis)
        f, stats = self.sae.encode_with_stats(x)
        new = jnp.where(self.ablate, self.ablated, jnp.where(self.hold, self.held, f)) + self.shift
        delta = (self.sae.decode(new.astype(f.dtype), stats) - self.sae.decode(f, stats)).reshape(x.shape)
        return where_positions(self.positions, x + delta.astype(x.dtype), x, pos_axis)


# ------------------------------------------------------------------------------------------ data

class SearchData(NamedTuple):
    """Everything the search's runs share, per prompt (leading axis n): tokens [n, w], last / answer /
    distractor [n], positions bool [n, w] (the edited positions), clean and ablated {site: [n, w, d_sae]}
    (clean feature values; ablation values)."""

    tokens: np.ndarray
    last: np.ndarray
    answer: np.ndarray
    distractor: np.ndarray
    positions: np.ndarray
    clean: dict
    ablated: dict

    def rows(self, sl: slice) -> "SearchData":
        return SearchData(self.tokens[sl], self.last[sl], self.answer[sl], self.distractor[sl], self.positions[sl],
                          {s: a[sl] for s, a in self.clean.items()}, {s: a[sl] for s, a in self.ablated.items()})


def check_sites(model, saes: dict, sites) -> tuple[str, ...]:
    """The search sites in forward order: SAE sites whose stage is a residual, hook_attn_out or hook_mlp_out
    (all such SAE sites when `sites` is None); SiteError naming a bad one otherwise."""
    if sites is None:
        sites = [s for s in saes if _stage(s) in RESIDUAL_BASIS]
        if not sites:
            raise SiteError(f"none of the SAE sites {list(saes)} is a residual, hook_attn_out or hook_mlp_out site")
    if isinstance(sites, str):
        sites = [sites]
    out = []
    for s in sites:
        if not isinstance(s, str) or s not in saes:
            raise SiteError(f"unknown search site {s!r}: expected one of the SAE sites {list(saes)}")
        if _stage(s) not in RESIDUAL_BASIS:
            raise SiteError(f"search site {s!r} is not a residual, hook_attn_out or hook_mlp_out site (expected a "
                            f"stage in {sorted(RESIDUAL_BASIS)})")
        out.append(s)
    if len(set(out)) != len(out):
        raise SiteError(f"search sites {out} repeat a site")
    return tuple(s for s in saes if s in out)                      # saes are in forward order


def _stage(site: str) -> str | None:
    try:
        return parse_site(site).local
    except SiteError:
        return None


def suite_tokens(model, suite, n: int | None, seed: int) -> tuple[str, SuiteTokens]:
    """(name, SuiteTokens) from a suite, a behaviour name, a .jsonl path, a list of prompts or SuiteTokens;
    JfigError for an empty one."""
    if isinstance(suite, SuiteTokens):
        if len(suite.tokens) == 0:
            raise JfigError("the prompts (SuiteTokens) have no rows; expected at least one prompt")
        return "tokens", suite
    if isinstance(suite, (list, tuple)) and not suite:
        raise JfigError("the suite is an empty list of prompts; expected at least one prompt")
    s = as_suite(suite, n, seed)
    return s.name, tokenize_suite(model, s)


def rows_for(batch: SuiteTokens, ablation: str) -> np.ndarray:
    """The prompts the search uses: all, or for corrupted ablation those whose corrupted prompt is aligned
    with the clean one token for token."""
    if ablation != "corrupted":
        return np.arange(len(batch.tokens))
    if batch.corrupted is None or not batch.aligned.any():
        raise JfigError("ablation='corrupted' needs corrupted prompts with the clean prompts' token length "
                        "(aligned); this suite has none. Use ablation='mean' or 'zero', or a suite with "
                        "corrupted prompts")
    return np.flatnonzero(batch.aligned)


@eqx.filter_jit
def _features(model, saes, tokens):
    cache = model.run(tokens, capture=tuple(saes), logits=False).cache
    return {s: saes[s].encode(cache[s]) for s in saes}                # [b, w, d_sae]


def search_data(model, saes: dict, batch: SuiteTokens, rows: np.ndarray, ablation: str, *,
                batch_size: int = 16) -> SearchData:
    """Clean feature values and ablation values at every search site for the prompts `rows`."""
    tokens = batch.tokens[rows]
    positions = edit_positions(batch)[rows]

    def feats(toks):
        parts = [jax.tree.map(np.asarray, _features(model, saes, jnp.asarray(toks[lo:lo + batch_size])))
                 for lo in range(0, len(toks), batch_size)]
        return {s: np.concatenate([p[s] for p in parts]) for s in saes}

    clean = feats(tokens)
    if ablation == "corrupted":
        ablated = feats(batch.corrupted[rows])
    elif ablation == "mean":
        m = positions[..., None]
        ablated = {s: np.broadcast_to((f * m).sum((0, 1)) / max(int(m.sum()), 1), f.shape).astype(np.float32)
                   for s, f in clean.items()}
    else:
        ablated = {s: np.zeros_like(f) for s, f in clean.items()}
    return SearchData(tokens, batch.last[rows], batch.answer[rows], batch.distractor[rows], positions, clean, ablated)


# ------------------------------------------------------------------------------------------ runs

def _edits(saes, data, ablate, hold, removed, contrib, target):
    """One CircuitEdit per site for one state: ablate / hold bool [d_sae], removed [E] (1 = edge ablated),
    contrib [b, w, E] (edge contributions), target int [E] (their downstream features)."""
    out = []
    for s, sae in saes.items():
        shift = jnp.zeros(data.clean[s].shape, jnp.float32).at[..., target[s]].add(contrib[s] * removed[s])
        out.append(CircuitEdit(sae, ablate[s], data.ablated[s], hold[s], data.clean[s], shift, data.positions))
    return tuple(out)


@eqx.filter_jit
def _metric_chunk(model, saes, metric, data, ablate, removed, contrib, target):
    """Summed metric [c] over the prompts of `data` for each of c states: ablate {site: bool [c, d_sae]},
    removed {site: [c, E]}."""
    def one(a, r):
        hold = {s: jnp.zeros_like(a[s]) for s in a}
        edits = _edits(saes, data, a, hold, r, contrib, target)
        return metric(model, data.tokens, data.last, data.answer, data.distractor, edits).sum()
    return jax.vmap(one)(ablate, removed)


@eqx.filter_jit
def _suffix_chunk(model, saes, data, start, acts, resid, ablate, removed, contrib, target):
    """As _metric_chunk for the logit difference on a built-in model, each state run from the clean prefix
    at the first search site `start` (acts, resid: that site's activations and the residual its suffix
    needs): the layers before it are run once, not once per state."""
    site = final_site(model)
    rows = jnp.arange(data.tokens.shape[0])

    def one(a, r):
        hold = {s: jnp.zeros_like(a[s]) for s in a}
        edits = _edits(saes, data, a, hold, r, contrib, target)
        x = model.run_suffix(Prefix(start, acts, resid), edits=edits, capture=(site,)).cache[site]
        return residual_logit_diff(model.config, model.params, x[rows, data.last], data.answer, data.distractor).sum()
    return jax.vmap(one)(ablate, removed)


@eqx.filter_jit
def _read_chunk(model, saes, data, ablate, hold, read):
    """Feature values {site: [c, b, w, k]} of the features `read` {site: int [k]} in each of c states
    (ablate / hold {site: bool [c, d_sae]}; no edge ablated)."""
    def one(a, h):
        zero = {s: jnp.zeros((1,), jnp.float32) for s in saes}
        contrib = {s: jnp.zeros(data.clean[s].shape[:2] + (1,), jnp.float32) for s in saes}
        target = {s: jnp.zeros((1,), jnp.int32) for s in saes}
        edits = _edits(saes, data, a, h, zero, contrib, target)
        cache = model.run(data.tokens, edits=edits, capture=tuple(saes), logits=False).cache
        return {s: jnp.take(saes[s].encode(cache[s]), read[s], axis=-1) for s in saes}
    return jax.vmap(one)(ablate, hold)


def _pad(a: np.ndarray, rows: int) -> np.ndarray:
    """a [r, ...] padded with copies of its last row to [rows, ...] (one compiled shape per chunk size)."""
    return a if len(a) == rows else np.concatenate([a, np.repeat(a[-1:], rows - len(a), 0)])


class Evaluator:
    """Runs states of the search in vmapped chunks of `chunk` over prompt batches of `batch_size` and
    counts the states run (`n_states`). With the logit difference on a built-in model each state runs
    from a clean prefix at the first search site (edits change nothing before it)."""

    def __init__(self, model, saes: dict, metric: Callable, data: SearchData, *, batch_size: int, chunk: int):
        self.model, self.saes, self.metric, self.data = model, saes, metric, data
        self.batch_size, self.chunk, self.n_states = batch_size, chunk, 0
        self.start = next(iter(saes)) if metric is logit_diff and model.config is not None else None
        self.prefixes: dict = {}
        self.edges = {s: (np.zeros(data.clean[s].shape[:2] + (1,), np.float32), np.zeros(1, np.int32)) for s in saes}

    def set_edges(self, contrib: dict, target: dict) -> None:
        """Candidate edges per downstream site: contrib {site: [n, w, E]}, target {site: int [E]} (E is padded
        to a multiple of 8 with zero contributions, so the compiled shape changes rarely)."""
        out = {}
        for s in self.saes:
            c, t = contrib.get(s), target.get(s)
            if c is None or not len(t):
                c, t = np.zeros(self.data.clean[s].shape[:2] + (0,), np.float32), np.zeros(0, np.int32)
            width = max(8, -(-len(t) // 8) * 8)
            pad = width - len(t)
            out[s] = (np.concatenate([c, np.zeros(c.shape[:2] + (pad,), np.float32)], -1),
                      np.concatenate([t, np.zeros(pad, np.int32)]).astype(np.int32))
        self.edges = out

    def metrics(self, ablate: dict, removed: dict | None = None) -> np.ndarray:
        """[c]: the mean metric over the prompts for each state: ablate {site: bool [c, d_sae]}, removed
        {site: [c, E]} (edges of set_edges ablated; None: none)."""
        c = next(iter(ablate.values())).shape[0]
        if removed is None:
            removed = {s: np.zeros((c, self.edges[s][1].shape[0]), np.float32) for s in self.saes}
        removed = {s: np.concatenate([r, np.zeros((c, self.edges[s][1].shape[0] - r.shape[1]), np.float32)], 1)
                   for s, r in removed.items()}
        total = np.zeros(c)
        n = len(self.data.tokens)
        for lo in range(0, n, self.batch_size):
            sl = slice(lo, lo + self.batch_size)
            part = jax.tree.map(jnp.asarray, self.data.rows(sl))
            contrib = {s: jnp.asarray(e[0][sl]) for s, e in self.edges.items()}
            target = {s: jnp.asarray(e[1]) for s, e in self.edges.items()}
            for a in range(0, c, self.chunk):
                am = {s: jnp.asarray(_pad(m[a:a + self.chunk], self.chunk)) for s, m in ablate.items()}
                rm = {s: jnp.asarray(_pad(r[a:a + self.chunk], self.chunk)) for s, r in removed.items()}
                if self.start is None:
                    got = _metric_chunk(self.model, self.saes, self.metric, part, am, rm, contrib, target)
                else:
                    pre = self.prefix(lo, part.tokens)
                    got = _suffix_chunk(self.model, self.saes, part, self.start, pre.acts, pre.resid, am, rm, contrib,
                                        target)
                got = np.asarray(got, np.float64)
                total[a:a + self.chunk] += got[:min(self.chunk, c - a)]
        self.n_states += c
        return total / n

    def prefix(self, lo: int, tokens) -> Prefix:
        """The clean prefix at the first search site of the prompt batch starting at row `lo` (kept)."""
        if lo not in self.prefixes:
            self.prefixes[lo] = self.model.prefix(tokens, self.start)
        return self.prefixes[lo]

    def read(self, ablate: dict, hold: dict, read: dict) -> dict:
        """{site: [c, n, w, k]}: the features `read` {site: int [k]} in each state (ablate / hold
        {site: bool [c, d_sae]})."""
        c = next(iter(ablate.values())).shape[0]
        out = {s: [] for s in self.saes}
        n = len(self.data.tokens)
        for lo in range(0, n, self.batch_size):
            sl = slice(lo, lo + self.batch_size)
            part = jax.tree.map(jnp.asarray, self.data.rows(sl))
            rows = {s: [] for s in self.saes}
            for a in range(0, c, self.chunk):
                am = {s: jnp.asarray(_pad(m[a:a + self.chunk], self.chunk)) for s, m in ablate.items()}
                hm = {s: jnp.asarray(_pad(m[a:a + self.chunk], self.chunk)) for s, m in hold.items()}
                got = _read_chunk(self.model, self.saes, part, am, hm, {s: jnp.asarray(r) for s, r in read.items()})
                for s in self.saes:
                    rows[s].append(np.asarray(got[s])[:min(self.chunk, c - a)])
            for s in self.saes:
                out[s].append(np.concatenate(rows[s]))
        self.n_states += c
        return {s: np.concatenate(v, axis=1) for s, v in out.items()}


# ------------------------------------------------------------------------------------------ pruning

def greedy_prune(items: list, metric_of: Callable, tolerance: float) -> tuple[list, list, dict, int]:
    """Batched ACDC over `items` (module docstring). metric_of(list of frozensets of items ablated on top
    of the fixed state) -> [len] metrics. Returns (kept, removed in removal order, {item: change of the
    metric when it was last ablated: on removal, or alone from the final state for kept ones}, passes)."""
    removed: list = []
    remaining = list(items)
    change: dict = {}
    passes = 0
    while remaining:
        passes += 1
        gone = frozenset(removed)
        m = metric_of([gone] + [gone | {i} for i in remaining])
        single = m[1:] - m[0]
        change.update({i: float(d) for i, d in zip(remaining, single)})
        order = np.argsort(np.abs(single), kind="stable")
        if abs(single[order[0]]) > tolerance:
            break
        seq = [remaining[j] for j in order]
        if len(seq) == 1:
            steps = single[order]
        else:
            prefixes = metric_of([gone | frozenset(seq[:k]) for k in range(1, len(seq) + 1)])
            steps = np.diff(np.concatenate([[m[0]], prefixes]))
        bad = np.flatnonzero(np.abs(steps) > tolerance)
        stop = max(int(bad[0]) if bad.size else len(seq), 1)
        for k in range(stop):
            removed.append(seq[k])
            change[seq[k]] = float(steps[k])
        remaining = [i for i in remaining if i not in set(seq[:stop])]
    return remaining, removed, change, passes


# ------------------------------------------------------------------------------------------ result

class CircuitEdge(NamedTuple):
    """A kept edge: `delta` = change of the metric when it was ablated alone from the final circuit
    (or when last tested); `contribution` = mean over edited positions of v's clean value minus its
    value with u ablated (the direct effect; positive: u excites v)."""

    source_site: str
    source: int
    target_site: str
    target: int
    delta: float
    contribution: float


@dataclass
class FeatureCircuit:
    """What `feature_circuit` found (fields documented in `as_dict`; metrics are mean metric values)."""

    behavior: str
    threshold: float
    ablation: str
    sites: tuple
    nodes: tuple                       # ((site, feature), ...) in forward order
    node_delta: dict                   # {(site, feature): metric change when ablated (last test)}
    edges: tuple                       # CircuitEdge, ...
    n_candidate_edges: int
    rest_sites: tuple                  # sites whose rest node (every non-candidate feature) the circuit keeps
    rest_delta: dict                   # {site: metric change when its rest node was ablated (last test)}
    candidates: dict                   # {site: [features]} (the search's universe)
    attribution: dict                  # {site: [attribution of each candidate]}
    clean: float
    none: float
    start: float                       # only the candidates kept
    node_metric: float                 # after node pruning (every candidate edge among the nodes kept)
    metric: float                      # the circuit's metric
    sparse_metric: float               # the circuit without its rest nodes (its features and edges only)
    direct_metric: float | None = None
    n_prompts: int = 0
    n_states: int = 0
    seconds: float = 0.0
    options: dict = field(default_factory=dict)

    def retained(self, m: float) -> float:
        """(m - m_none) / (m_clean - m_none)."""
        return float((m - self.none) / (self.clean - self.none))

    @property
    def faithfulness(self) -> float:
        return self.retained(self.metric)

    @property
    def node_faithfulness(self) -> float:
        return self.retained(self.node_metric)

    @property
    def sparse_faithfulness(self) -> float:
        return self.retained(self.sparse_metric)

    @property
    def candidate_faithfulness(self) -> float:
        return self.retained(self.start)

    @property
    def direct_faithfulness(self) -> float | None:
        return None if self.direct_metric is None else self.retained(self.direct_metric)

    def by_site(self) -> dict:
        """{site: sorted features of the circuit's nodes}."""
        out: dict = {s: [] for s in self.sites}
        for s, f in self.nodes:
            out[s].append(f)
        return {s: sorted(v) for s, v in out.items()}

    def table(self) -> pa.Table:
        """The kept edges: source_site, source, target_site, target, delta, contribution."""
        cols = list(zip(*self.edges)) if self.edges else [[] for _ in CircuitEdge._fields]
        types = (pa.string(), pa.int64(), pa.string(), pa.int64(), pa.float64(), pa.float64())
        return pa.table({k: pa.array(list(v), t) for k, v, t in zip(CircuitEdge._fields, cols, types)})

    def node_table(self) -> pa.Table:
        """The nodes: site, feature, delta (metric change when ablated)."""
        return pa.table({"site": pa.array([s for s, _ in self.nodes], pa.string()),
                         "feature": pa.array([f for _, f in self.nodes], pa.int64()),
                         "delta": pa.array([self.node_delta[n] for n in self.nodes], pa.float64())})

    def to_graph(self, saes: dict | None = None) -> InteractionGraph:
        """The circuit as an InteractionGraph: its nodes, and its edges as first-order rows (weight: the
        contribution, estimator 'ablate', positions 'all', n: prompts). `saes` {site: SAE} fills the
        manifest's d_sae."""
        layer = {s: site_layer(s, self.sites) for s in self.sites}
        nodes = {"site": [s for s, _ in self.nodes], "feature": [f for _, f in self.nodes],
                 "layer": [layer[s] for s, _ in self.nodes], "firing_rate": [None] * len(self.nodes),
                 "label": [None] * len(self.nodes), "top_contexts": [None] * len(self.nodes)}
        e = self.edges
        edges = {"source_site": [x.source_site for x in e], "source": [x.source for x in e],
                 "target_site": [x.target_site for x in e], "target": [x.target for x in e],
                 "kind": ["excitatory" if x.contribution >= 0 else "inhibitory" for x in e],
                 "weight": [x.contribution for x in e], "p_value": [None] * len(e), "p_bonferroni": [None] * len(e),
                 "q_value": [None] * len(e), "variance": [None] * len(e), "n": [self.n_prompts] * len(e),
                 "estimator": ["ablate"] * len(e), "positions": ["all"] * len(e),
                 "source_layer": [layer[x.source_site] for x in e], "target_layer": [layer[x.target_site] for x in e],
                 "modulator_site": pa.array([None] * len(e), pa.string()),
                 "modulator": pa.array([None] * len(e), pa.int64()),
                 "cv": [None] * len(e), "gating_flag": pa.array([None] * len(e), pa.bool_())}
        saes = saes or {}
        manifest = {"saes": [{"site": s, **({"d_sae": int(saes[s].d_sae)} if s in saes else {})} for s in self.sites],
                    "options": {"feature_circuit": {"behavior": self.behavior, "threshold": self.threshold,
                                                    "ablation": self.ablation, **self.options}}}
        return InteractionGraph.from_tables(pa.table(nodes), pa.table(edges), manifest)

    def as_dict(self) -> dict:
        """behavior, threshold (fraction of |m_clean - m_none|), ablation, sites, metrics (clean, none,
        start, node_metric, metric, direct_metric) and faithfulness (circuit, after node pruning, of the
        candidates, direct), nodes and edges with their deltas, candidates with attributions, counts."""
        return {"behavior": self.behavior, "threshold": self.threshold, "ablation": self.ablation,
                "sites": list(self.sites), "n_prompts": self.n_prompts, "options": self.options,
                "metric": {"clean": self.clean, "none": self.none, "candidates": self.start,
                           "nodes": self.node_metric, "circuit": self.metric, "sparse": self.sparse_metric,
                           "direct": self.direct_metric},
                "faithfulness": {"circuit": self.faithfulness, "nodes": self.node_faithfulness,
                                 "sparse": self.sparse_faithfulness, "candidates": self.candidate_faithfulness,
                                 "direct": self.direct_faithfulness},
                "rest_sites": list(self.rest_sites), "rest_delta": self.rest_delta,
                "n_nodes": len(self.nodes), "n_edges": len(self.edges), "n_candidate_edges": self.n_candidate_edges,
                "nodes": [{"site": s, "feature": f, "delta": self.node_delta[(s, f)]} for s, f in self.nodes],
                "edges": [e._asdict() for e in self.edges],
                "candidates": {s: [int(x) for x in v] for s, v in self.candidates.items()},
                "attribution": {s: [float(x) for x in v] for s, v in self.attribution.items()},
                "n_states": self.n_states, "seconds": self.seconds}

    def summary(self) -> str:
        """A Markdown summary: metrics, faithfulness, nodes per site and the strongest edges."""
        per_site = self.by_site()
        lines = [f"# Feature circuit: {self.behavior}", "",
                 f"ACDC-style search over {sum(len(v) for v in self.candidates.values())} candidate features at "
                 f"{len(self.sites)} sites ({self.ablation} ablation, threshold {self.threshold:g} of "
                 f"|m_clean - m_none|, {self.n_prompts} prompts, {self.n_states} states run in {self.seconds:.0f} s).",
                 "", "| quantity | metric | faithfulness |", "|---|---|---|",
                 f"| clean model | {self.clean:.4f} | 1 |",
                 f"| every search-site feature ablated | {self.none:.4f} | 0 |",
                 f"| candidates only | {self.start:.4f} | {self.candidate_faithfulness:.3f} |",
                 f"| circuit nodes (all their edges) | {self.node_metric:.4f} | {self.node_faithfulness:.3f} |",
                 f"| circuit | {self.metric:.4f} | {self.faithfulness:.3f} |",
                 f"| circuit without its rest nodes | {self.sparse_metric:.4f} | {self.sparse_faithfulness:.3f} |"]
        if self.direct_metric is not None:
            lines.append(f"| circuit, direct ablation check | {self.direct_metric:.4f} | "
                         f"{self.direct_faithfulness:.3f} |")
        lines += ["", f"{len(self.nodes)} feature nodes, {len(self.edges)} of {self.n_candidate_edges} candidate edges "
                      f"kept; rest nodes (a site's non-candidate features together) kept at "
                      f"{', '.join(self.rest_sites) or 'no site'}.", "",
                  "| site | candidates | feature nodes | rest node (metric change when ablated) |", "|---|---|---|---|"]
        lines += [f"| {s} | {len(self.candidates[s])} | {', '.join(map(str, per_site[s])) or '-'} | "
                  f"{('kept' if s in self.rest_sites else 'pruned') if s in self.rest_delta else '-'}"
                  f"{f' ({self.rest_delta[s]:+.4f})' if s in self.rest_delta else ''} |" for s in self.sites]
        if self.edges:
            lines += ["", "| edge | metric change when ablated | contribution |", "|---|---|---|"]
            for e in sorted(self.edges, key=lambda e: -abs(e.delta))[:20]:
                lines.append(f"| {e.source_site}#{e.source} → {e.target_site}#{e.target} | {e.delta:+.4f} | "
                             f"{e.contribution:+.4f} |")
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ the search

def check_search_args(threshold, candidates, ablation: str, metric, batch_size: int, chunk: int) -> float:
    """The pre-work checks of feature_circuit; returns the threshold as a float."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(threshold)) or threshold < 0:
        raise JfigError(f"threshold must be a finite number >= 0 (a fraction of |m_clean - m_none|), got {threshold!r}")
    if ablation not in ABLATIONS:
        raise JfigError(f"unknown ablation {ablation!r}; expected one of {ABLATIONS}")
    if not callable(metric):
        raise JfigError(f"metric must be a function (model, tokens, last, answer, distractor, edits) -> [n] like "
                        f"jfig.behaviors.logit_diff, got {type(metric).__name__}")
    whole = isinstance(candidates, (int, np.integer)) and not isinstance(candidates, bool)
    if not isinstance(candidates, dict) and (not whole or candidates < 1):
        raise JfigError(f"candidates must be an int >= 1 (features per site) or {{site: [features]}}, "
                        f"got {candidates!r}")
    for name, v in (("batch_size", batch_size), ("chunk", chunk)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise JfigError(f"{name} must be an int >= 1, got {v!r}")
    return float(threshold)


@eqx.filter_jit
def _attribution_chunk(model, saes, metric, data):
    """Σ over prompts and edited positions of (f - ablation value) · ∂metric/∂f: {site: [d_sae]}."""
    def total(deltas):
        edits = tuple(ShiftFeatures(saes[s], deltas[s]) for s in saes)
        return metric(model, data.tokens, data.last, data.answer, data.distractor, edits).sum()
    grads = jax.grad(total)({s: jnp.zeros_like(f) for s, f in data.clean.items()})
    m = data.positions[..., None].astype(jnp.float32)
    return {s: ((data.clean[s] - data.ablated[s]) * grads[s] * m).sum((0, 1)) for s in saes}


def candidate_attribution(model, saes: dict, metric: Callable, data: SearchData, *, batch_size: int = 16) -> dict:
    """{site: [d_sae]}: attribution patching, the first-order change of the mean metric when each feature is
    set to its ablation value at every edited position (gradients through ShiftFeatures at 0)."""
    acc = None
    for lo in range(0, len(data.tokens), batch_size):
        part = jax.tree.map(jnp.asarray, data.rows(slice(lo, lo + batch_size)))
        got = jax.tree.map(lambda a: np.asarray(a, np.float64), _attribution_chunk(model, saes, metric, part))
        acc = got if acc is None else jax.tree.map(np.add, acc, got)
    return {s: a / len(data.tokens) for s, a in acc.items()}


def pick_candidates(saes: dict, attribution: dict, candidates) -> dict:
    """{site: int array} of candidate features: the top-k by |attribution| per site, or given lists (checked)."""
    if isinstance(candidates, dict):
        unknown = sorted(set(candidates) - set(saes))
        if unknown:
            raise SiteError(f"candidates name site(s) {unknown} that are not search sites {list(saes)}")
        out = {}
        for s in saes:
            f = np.unique(np.asarray(candidates.get(s, []), np.int64))
            if f.size and (f.min() < 0 or f.max() >= saes[s].d_sae):
                raise JfigError(f"candidate features at {s} must lie in [0, {saes[s].d_sae}), got {f.tolist()}")
            out[s] = f
        return out
    return {s: np.sort(np.argsort(-np.abs(attribution[s]), kind="stable")[:min(candidates, saes[s].d_sae)])
            for s in saes}


def node_masks_from(saes: dict, keep: dict, candidates: dict, c: int = 1) -> dict:
    """{site: bool [c, d_sae]} ablating every feature not in keep {site: features}; REST in keep[site] keeps
    the site's non-candidate features (candidates {site: features})."""
    out = {}
    for s, sae in saes.items():
        m = np.ones(sae.d_sae, bool)
        m[np.asarray([f for f in keep.get(s, ()) if f != REST], np.int64)] = False
        if REST in keep.get(s, ()):
            m[rest_mask(sae.d_sae, candidates[s])] = False
        out[s] = np.repeat(m[None], c, 0)
    return out


def rest_mask(d_sae: int, candidates) -> np.ndarray:
    """bool [d_sae]: the features that are not candidates (a site's rest node)."""
    m = np.ones(d_sae, bool)
    m[np.asarray(list(candidates), np.int64)] = False
    return m


def edge_contributions(ev: Evaluator, saes: dict, nodes: list, candidates: dict) -> dict:
    """{((a, i), (b, j)): D [n, w]} for every pair of `nodes` [(site, feature)] at sites a before b: the change of
    f_j at b when (a, i) alone is ablated with every feature of every search site strictly between held at its
    clean value (module docstring). One state per (upstream node, downstream site), vmapped; every candidate
    {site: features} is read, so the compiled shapes do not depend on which nodes were kept."""
    sites = list(saes)
    read = {s: np.asarray(list(candidates[s]) or [0], np.int32) for s in sites}
    combos = [(u, b) for u in nodes for b in sites if sites.index(b) > sites.index(u[0])
              and any(t == b for t, _ in nodes)]
    if not combos:
        return {}
    d = {s: sae.d_sae for s, sae in saes.items()}
    ablate = {s: np.zeros((len(combos), d[s]), bool) for s in sites}
    hold = {s: np.zeros((len(combos), d[s]), bool) for s in sites}
    for k, ((a, i), b) in enumerate(combos):
        ablate[a][k, i] = True
        for s in sites[sites.index(a) + 1: sites.index(b)]:
            hold[s][k] = True
    got = ev.read(ablate, hold, read)
    out = {}
    for k, ((a, i), b) in enumerate(combos):
        for col, j in enumerate(read[b]):
            if (b, int(j)) in nodes:
                out[((a, i), (b, int(j)))] = (got[b][k, ..., col] - ev.data.clean[b][..., j]).astype(np.float32)
    return out


def feature_circuit(model, saes, suite, metric: Callable = logit_diff, *, threshold: float, sites=None,
                    candidates=8, ablation: str = "corrupted", rest: bool = True, edges: bool = True,
                    n: int | None = 32, seed: int = 0, check: bool = True, batch_size: int = 16,
                    chunk: int = 8) -> FeatureCircuit:
    """The circuit of a behaviour over SAE features (module docstring has the definitions).

    model: a jfig Model; saes: SAEs (list or {site: SAE}); suite: a behaviour name, .jsonl path,
    BehaviorSuite, list of prompts, or SuiteTokens (models without a tokenizer; n prompts of a built-in
    suite); metric: f(model, tokens, last, answer, distractor, edits) -> [n] (default the logit
    difference). threshold: an item stays when ablating it changes the mean metric by more than
    threshold · |m_clean - m_none|. sites: the search sites (residual, hook_attn_out, hook_mlp_out SAE
    sites; None: every such SAE site). candidates: features per site by |attribution| (or {site:
    [features]}). ablation: "corrupted" (aligned corrupted prompts only), "mean" or "zero". rest: each site's
    non-candidate features form one more node, which the search keeps or prunes like the others (False: they
    are ablated throughout, and the candidates are the whole universe). edges: prune
    edges among the kept nodes (False: nodes only). check: recompute the circuit's metric with
    `direct_circuit_metric`. batch_size prompts per run, chunk states per vmapped run.
    """
    t0 = time.time()
    threshold = check_search_args(threshold, candidates, ablation, metric, batch_size, chunk)
    saes = model.check_saes(saes)
    search_sites = check_sites(model, saes, sites)
    saes = {s: saes[s] for s in search_sites}
    name, batch = suite_tokens(model, suite, n, seed)
    rows = rows_for(batch, ablation)
    if isinstance(candidates, dict):
        pick_candidates(saes, {}, candidates)                    # checked before any run
    data = search_data(model, saes, batch, rows, ablation, batch_size=batch_size)
    ev = Evaluator(model, saes, metric, data, batch_size=batch_size, chunk=chunk)
    attribution = candidate_attribution(model, saes, metric, data, batch_size=batch_size)
    cand = pick_candidates(saes, attribution, candidates)
    d = {s: sae.d_sae for s, sae in saes.items()}
    base = ev.metrics({s: np.stack([np.zeros(d[s], bool), np.ones(d[s], bool),
                                    node_masks_from(saes, cand, cand)[s][0]]) for s in saes})
    clean, none, start = (float(x) for x in base)
    span = clean - none
    if abs(span) < 1e-9:
        raise JfigError(f"ablating every feature of the search sites leaves the metric unchanged ({clean:.4g}); "
                        f"faithfulness is undefined for this suite, these SAEs and ablation={ablation!r}")
    tol = threshold * abs(span)
    log.info("%s: %d prompts; metric clean %.4f, all ablated %.4f, candidates only %.4f", name, len(rows), clean,
             none, start)

    keep = {s: set(int(f) for f in cand[s]) | ({REST} if rest and len(cand[s]) < d[s] else set()) for s in saes}
    node_delta: dict = {}
    for s in reversed(search_sites):                       # nodes, from the output backwards
        others = rest_mask(d[s], cand[s])

        def node_metric_of(sets, s=s, others=others):
            masks = node_masks_from(saes, keep, cand, len(sets))
            for k, gone in enumerate(sets):
                masks[s][k, [f for f in gone if f != REST]] = True
                if REST in gone:
                    masks[s][k, others] = True
            return ev.metrics(masks)
        kept, removed, change, passes = greedy_prune(sorted(keep[s]), node_metric_of, tol)
        keep[s] = set(kept)
        node_delta.update({(s, f): v for f, v in change.items()})
        log.info("%s: %d of %d candidates kept%s (%d removed, %d passes)", s, len(set(kept) - {REST}), len(cand[s]),
                 " and the rest node" if REST in kept else "", len(removed), passes)
    nodes = [(s, f) for s in search_sites for f in sorted(keep[s]) if f != REST]
    rest_sites = tuple(s for s in search_sites if REST in keep[s])
    node_masks = node_masks_from(saes, keep, cand)
    sparse_masks = node_masks_from(saes, {s: keep[s] - {REST} for s in saes}, cand)
    node_metric = float(ev.metrics(node_masks)[0])

    kept_edges, n_candidate_edges, edge_delta, contrib = [], 0, {}, {}
    final = node_metric
    sparse = float(ev.metrics(sparse_masks)[0])
    if edges and len(nodes) > 1:
        contrib = edge_contributions(ev, saes, nodes, cand)
        n_candidate_edges = len(contrib)
        index = {s: [e for e in contrib if e[1][0] == s] for s in search_sites}
        ev.set_edges({s: np.stack([contrib[e] for e in index[s]], -1) for s in saes if index[s]},
                     {s: np.asarray([e[1][1] for e in index[s]], np.int32) for s in saes if index[s]})
        position = {e: (s, k) for s in saes for k, e in enumerate(index[s])}
        gone_edges: set = set()

        def edge_metric_of(sets, masks=node_masks):
            removed = {s: np.zeros((len(sets), max(len(index[s]), 1)), np.float32) for s in saes}
            for k, extra in enumerate(sets):
                for e in gone_edges | extra:
                    s, col = position[e]
                    removed[s][k, col] = 1.0
            return ev.metrics({s: np.repeat(m, len(sets), 0) for s, m in masks.items()}, removed)

        for s in reversed(search_sites):                   # edges by downstream site, from the output backwards
            if not index[s]:
                continue
            kept, removed, change, passes = greedy_prune(index[s], edge_metric_of, tol)
            gone_edges |= set(removed)
            edge_delta.update(change)
            kept_edges += kept
            log.info("edges into %s: %d of %d kept (%d passes)", s, len(kept), len(index[s]), passes)
        final = float(edge_metric_of([frozenset()])[0])
        sparse = float(edge_metric_of([frozenset()], sparse_masks)[0])
        kept_edges = sorted(kept_edges, key=lambda e: (search_sites.index(e[0][0]), e[0][1],
                                                       search_sites.index(e[1][0]), e[1][1]))
    pos = data.positions
    edge_rows = tuple(CircuitEdge(u[0], u[1], v[0], v[1], edge_delta[(u, v)],
                                  float(-(contrib[(u, v)] * pos).sum() / max(int(pos.sum()), 1)))
                      for u, v in kept_edges)
    circuit = FeatureCircuit(
        behavior=name, threshold=threshold, ablation=ablation, sites=search_sites, nodes=tuple(nodes),
        node_delta={k: node_delta[k] for k in nodes}, edges=edge_rows, n_candidate_edges=n_candidate_edges,
        rest_sites=rest_sites, rest_delta={s: node_delta[(s, REST)] for s in saes if (s, REST) in node_delta},
        candidates={s: [int(x) for x in cand[s]] for s in saes},
        attribution={s: [float(attribution[s][f]) for f in cand[s]] for s in saes}, clean=clean, none=none,
        start=start, node_metric=node_metric, metric=final, sparse_metric=sparse, n_prompts=len(rows),
        options=dict(n=n, seed=seed, rest=rest, edges=edges, metric=getattr(metric, "__name__", repr(metric)),
                     candidates=candidates if not isinstance(candidates, dict) else "given"))
    circuit.n_states = ev.n_states
    if check:
        circuit.direct_metric = direct_circuit_metric(model, saes, data, circuit, metric)
    circuit.seconds = round(time.time() - t0, 1)
    log.info("%s: %d nodes, %d edges, faithfulness %.3f (direct %s) in %.0f s", name, len(nodes), len(edge_rows),
             circuit.faithfulness, circuit.direct_faithfulness, circuit.seconds)
    return circuit


# ------------------------------------------------------------------------------------------ the check

def direct_circuit_metric(model, saes: dict, data: SearchData, circuit: FeatureCircuit,
                          metric: Callable = logit_diff) -> float:
    """The circuit's mean metric (rest nodes included) recomputed without the search's machinery: every
    contribution of an
    ablated edge from its own run (the upstream feature ablated with a stock `Clamp` to its per-token
    ablation value, the features between held at their clean values), then one run per prompt batch with
    every feature outside the nodes ablated (stock `SetFeatures` for mean / zero ablation) and every
    ablated edge added to its downstream feature (stock `ShiftFeatures`)."""
    sites = list(circuit.sites)
    nodes = set(circuit.nodes)
    kept = {(e.source_site, e.source, e.target_site, e.target) for e in circuit.edges}
    shift = {s: np.zeros_like(data.clean[s]) for s in sites}
    tokens = jnp.asarray(data.tokens)
    pos = jnp.asarray(data.positions)
    if circuit.options.get("edges", True):
        for a, i in circuit.nodes:
            for b in sites[sites.index(a) + 1:]:
                targets = [j for t, j in circuit.nodes if t == b and (a, i, b, j) not in kept]
                if not targets:
                    continue
                edits = [Clamp(saes[a], i, data.ablated[a][..., i], positions=pos)]
                for s in sites[sites.index(a) + 1: sites.index(b)]:
                    d = saes[s].d_sae
                    edits.append(CircuitEdit(saes[s], np.zeros(d, bool), 0.0, np.ones(d, bool), data.clean[s],
                                             0.0, pos))
                x = model.run(tokens, edits=edits, capture=(b,), logits=False).cache[b]
                f = np.asarray(saes[b].encode(x))
                for j in targets:
                    shift[b][..., j] += f[..., j] - data.clean[b][..., j]
    edits = []
    for s in sites:
        outside = np.ones(saes[s].d_sae, bool)
        outside[[f for t, f in nodes if t == s]] = False
        if s in circuit.rest_sites:
            outside[rest_mask(saes[s].d_sae, circuit.candidates[s])] = False
        if circuit.ablation in ("mean", "zero"):
            values = data.ablated[s][0, 0] if circuit.ablation == "mean" else 0.0
            edits.append(SetFeatures(saes[s], outside, values, positions=pos))
        else:
            edits.append(CircuitEdit(saes[s], outside, data.ablated[s], np.zeros(saes[s].d_sae, bool), 0.0, 0.0, pos))
        edits.append(ShiftFeatures(saes[s], shift[s]))
    m = metric(model, tokens, jnp.asarray(data.last), jnp.asarray(data.answer), jnp.asarray(data.distractor), edits)
    return float(np.asarray(m, np.float64).mean())


# ------------------------------------------------------------------------------------------ comparison

def set_faithfulness(model, saes, suite, circuit: FeatureCircuit, node_sets: list, metric: Callable = logit_diff,
                     *, rest_sites=(), batch_size: int = 16, chunk: int = 8) -> np.ndarray:
    """[len(node_sets)]: faithfulness of node sets [(site, feature)] under the circuit's metric, ablation and
    sites (every feature outside a set ablated; features at other sites are ignored). At `rest_sites` the
    features that are not the circuit's candidates are kept too (the rest nodes)."""
    saes = model.check_saes(saes)
    saes = {s: saes[s] for s in circuit.sites}
    _, batch = suite_tokens(model, suite, circuit.options.get("n"), circuit.options.get("seed", 0))
    data = search_data(model, saes, batch, rows_for(batch, circuit.ablation), circuit.ablation, batch_size=batch_size)
    ev = Evaluator(model, saes, metric, data, batch_size=batch_size, chunk=chunk)
    masks = {s: np.ones((len(node_sets), sae.d_sae), bool) for s, sae in saes.items()}
    for s in rest_sites:
        masks[s][:, rest_mask(saes[s].d_sae, circuit.candidates[s])] = False
    for k, nodes in enumerate(node_sets):
        for s, f in nodes:
            if s in masks:
                masks[s][k, f] = False
    return np.asarray([circuit.retained(m) for m in ev.metrics(masks)])


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else float("nan")


@dataclass(frozen=True)
class CircuitComparison:
    """A feature circuit against a behaviour subgraph: overlaps and each one's faithfulness under the same
    metric; `rows` is the small table (one dict per line), `table()` its Markdown."""

    rows: tuple
    overlap: dict

    def table(self) -> str:
        lines = ["| set | nodes | nodes at shared sites | edges at shared sites | faithfulness |",
                 "|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['set']} | {r['nodes']} | {r['nodes_shared_sites']} | {r['edges_shared_sites']} | "
                         f"{r['faithfulness']:.3f} |")
        o = self.overlap
        lines += ["", f"Shared sites: {', '.join(o['shared_sites']) or 'none'}. Node Jaccard {o['node_jaccard']:.3f} "
                      f"({o['shared_nodes']} shared); at the shared sites {o['node_jaccard_shared_sites']:.3f}; edge "
                      f"Jaccard at the shared sites {o['edge_jaccard_shared_sites']:.3f} ({o['shared_edges']} shared)."]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict:
        return {"rows": list(self.rows), "overlap": self.overlap}


def compare_circuits(model, saes, suite, circuit: FeatureCircuit, subgraph, metric: Callable = logit_diff, *,
                     batch_size: int = 16, chunk: int = 8) -> CircuitComparison:
    """The feature circuit against a behaviour subgraph (a BehaviorCircuit or Subgraph of the interaction
    graph): node Jaccard (all nodes, and at the sites both cover), edge Jaccard at the shared sites (the
    subgraph's first-order edges against the circuit's edges), and faithfulness under the circuit's metric,
    ablation and sites (every feature outside a set ablated; subgraph nodes at sites the search did not
    cover are ignored): of the circuit's features alone and of the subgraph's features alone (all their
    edges, no rest nodes: like with like), and the circuit's own faithfulness (rest nodes kept, pruned
    edges ablated)."""
    sub = getattr(subgraph, "subgraph", subgraph)
    if not isinstance(sub, Subgraph):
        raise JfigError(f"expected a BehaviorCircuit or a Subgraph, got {type(subgraph).__name__}")
    shared = sorted(set(circuit.sites) & set(sub.by_site()), key=circuit.sites.index)
    a, b = set(circuit.nodes), set(sub.nodes)
    a_s, b_s = {x for x in a if x[0] in shared}, {x for x in b if x[0] in shared}
    cols = sub.edges.select(["source_site", "source", "target_site", "target", "kind"]).to_pydict()
    b_edges = {(ss, s, ts, t) for ss, s, ts, t, k in zip(*cols.values()) if k != "gating" and ss in shared
               and ts in shared}
    a_edges = {(e.source_site, e.source, e.target_site, e.target) for e in circuit.edges
               if e.source_site in shared and e.target_site in shared}
    faith = set_faithfulness(model, saes, suite, circuit, [circuit.nodes, sub.nodes], metric,
                             batch_size=batch_size, chunk=chunk)
    rows = ({"set": "feature circuit: its features alone", "nodes": len(a), "nodes_shared_sites": len(a_s),
             "edges_shared_sites": len(a_edges), "faithfulness": float(faith[0])},
            {"set": "feature circuit: features, pruned edges, rest nodes", "nodes": len(a), "nodes_shared_sites": len(a_s),
             "edges_shared_sites": len(a_edges), "faithfulness": float(circuit.faithfulness)},
            {"set": "behaviour subgraph: its features alone", "nodes": len(b), "nodes_shared_sites": len(b_s),
             "edges_shared_sites": len(b_edges), "faithfulness": float(faith[1])})
    overlap = {"shared_sites": shared, "node_jaccard": jaccard(a, b), "shared_nodes": len(a & b),
               "node_jaccard_shared_sites": jaccard(a_s, b_s), "edge_jaccard_shared_sites": jaccard(a_edges, b_edges),
               "shared_edges": len(a_edges & b_edges)}
    return CircuitComparison(rows, overlap)


def random_circuits(circuit: FeatureCircuit, pools: dict, n_random: int, *, seed: int = 0) -> list:
    """n_random node sets with the circuit's number of nodes per site, drawn uniformly without replacement
    from pools {site: features} (e.g. the candidates, or the features active on the suite)."""
    rng = np.random.default_rng(seed)
    per_site = circuit.by_site()
    out = []
    for _ in range(n_random):
        nodes = []
        for s, fs in per_site.items():
            pool = np.asarray(pools.get(s, []), np.int64)
            if len(pool) < len(fs):
                raise JfigError(f"site {s}: a pool of {len(pool)} features cannot hold random sets of {len(fs)}")
            nodes += [(s, int(f)) for f in rng.choice(pool, len(fs), replace=False)]
        out.append(nodes)
    return out
