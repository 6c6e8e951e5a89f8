"""The feature circuit search's machinery (definitions in `circuit_search`'s docstring): the one edit per
site (`CircuitEdit`), the data every run shares (`SearchData`: clean and ablation values), and `Evaluator`,
which runs states of the search in vmapped chunks (metrics, or feature values for edge contributions)."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..edits import SAEEdit, where_positions
from ..errors import JfigError, ShapeError, SiteError
from ..models.model import Prefix
from ..sites import RESIDUAL_BASIS, parse_site
from .metric import final_site, logit_diff, residual_logit_diff
from .seeds import edit_positions
from .suite import SuiteTokens, as_suite, tokenize_suite


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


def rest_mask(d_sae: int, candidates) -> np.ndarray:
    """bool [d_sae]: the features that are not candidates (a site's rest node)."""
    m = np.ones(d_sae, bool)
    m[np.asarray(list(candidates), np.int64)] = False
    return m
