"""The dense build (`targets="all"`): every selected source against every feature of every later site in
its layer window, measured block by block and tested without ever holding all pairs in memory.

    measure       blocks/block_{i:05d}.npz: every (source, target) row of the block, compact (site codes
                  into the build's sorted SAE sites, float32 statistics, float64 p-values)
    significance  pass 1 reads each block for the family size, every p-value <= alpha (the only ones a
                  correction can keep) and a fixed-size sample of its random-direction null per site
                  pair (tau); pass 2 reads each block again and keeps only the edges

Memory holds one block, the p-values <= alpha (8 bytes each), the null sample and the edges; the
records (about 40 bytes a pair) stay on disk. The decision is exactly `decide` over the whole family (`jfig.stats.StreamedFamily`);
tau is the `tau_quantile` of a sample of at most NULL_SAMPLE null effects per (source site, target
site) and null block (evenly spaced over the block's rows), where the candidate build uses every
null effect.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..measure import CleanPrefix, measure_effects
from ..sites import site_key
from ..stats import Decision, StreamedFamily, null_threshold
from .options import BuildOptions

DENSE_KEYS = ("source_site", "source", "target_site", "target", "mean", "var", "n", "p_value", "null_mean",
              "target_active")
NULL_SAMPLE = 8192        # random-direction effects kept per site pair and null block for tau


def build_sites(saes: dict) -> tuple[str, ...]:
    """The build's SAE sites in forward order: what the site codes of dense blocks index."""
    return tuple(sorted(saes, key=lambda s: (*site_key(s), s)))


def plan_dense(dense: dict, max_sources: int | None) -> list[tuple[str, int, dict]]:
    """[(source_site, source, {target_site: None (every feature)})] in (site, feature) order; with
    max_sources, the most important sources (importance rank first, then site order)."""
    sources, tsites = dense["sources"], dense["target_sites"]
    ranked = [(rank, site_key(ss), ss, int(f)) for ss, feats in sources.items() for rank, f in enumerate(feats)]
    if max_sources is not None:
        ranked = sorted(ranked)[:max_sources]
    keep = sorted(ranked, key=lambda r: (r[1], r[2], r[3]))
    return [(ss, f, {ts: None for ts in tsites[ss]}) for _, _, ss, f in keep]


def sweep_block(model, saes: dict, sources, tokens, targets, atlas, opts: BuildOptions, index: int,
                clean: CleanPrefix | None, pvalues: Callable, with_null: bool):
    """One block's sweep with the build's measurement options and seed (seed + block index): (Effects
    with per-input values, p-values [sources, targets], the random-direction null's means or None)."""
    kw = dict(method=opts.method, positions=opts.positions, clamp_at=opts.clamp_at, read=opts.read, inputs=opts.inputs,
              targets=targets, inputs_per_source=opts.inputs_per_source, atlas=atlas, batch_size=opts.batch_size,
              memory_budget=opts.memory_budget, seed=opts.seed + index, clean=clean, progress=False)
    eff = measure_effects(model, saes, sources, tokens, keep_per_input=True, **kw)
    p = pvalues(eff.per_input, eff.weights, opts, opts.seed + index)
    null = measure_effects(model, saes, sources, tokens, direction="random", **kw).mean if with_null else None
    return eff, p, null


def measure_dense_block(model, saes: dict, tokens, atlas, block, opts: BuildOptions, index: int,
                        clean: CleanPrefix | None, pvalues: Callable, with_null: bool) -> dict[str, np.ndarray]:
    """One block of sources measured on every feature of their target sites (+ the random-direction
    null when `with_null`): a compact record per (source, target) pair.
    pvalues(per_input, weights, opts, seed) -> p [rows, n_targets] is the build's p-value function."""
    sites = build_sites(saes)
    code = {s: i for i, s in enumerate(sites)}
    sources = [(ss, s) for ss, s, _ in block]
    tsites = sorted({ts for _, _, tg in block for ts in tg}, key=lambda s: code[s])
    targets = {ts: np.arange(saes[ts].d_sae) for ts in tsites}
    start = dict(zip(tsites, np.cumsum([0] + [saes[ts].d_sae for ts in tsites])[:-1].tolist()))
    eff, p, null = sweep_block(model, saes, sources, tokens, targets, atlas, opts, index, clean, pvalues, with_null)
    parts: dict[str, list] = {k: [] for k in DENSE_KEYS}
    for r, (ss, s, tg) in enumerate(block):
        for ts in tg:
            cols = start[ts] + np.arange(saes[ts].d_sae)
            n = len(cols)
            parts["source_site"].append(np.full(n, code[ss], np.int16))
            parts["source"].append(np.full(n, s, np.int32))
            parts["target_site"].append(np.full(n, code[ts], np.int16))
            parts["target"].append(np.arange(n, dtype=np.int32))
            parts["mean"].append(eff.mean[r, cols].astype(np.float32))
            parts["var"].append(eff.var[r, cols].astype(np.float32))
            parts["n"].append(eff.n[r, cols].astype(np.float32))
            parts["p_value"].append(np.asarray(p[r, cols], np.float64))
            parts["null_mean"].append((np.full(n, np.nan) if null is None else null[r, cols]).astype(np.float32))
            parts["target_active"].append(eff.target_active[r, cols].astype(np.float32))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def null_sample(rec: dict, size: int = NULL_SAMPLE) -> dict[tuple[int, int], np.ndarray]:
    """(source site code, target site code) -> at most `size` finite null effects of a block's rows of
    that site pair, evenly spaced (deterministic)."""
    out = {}
    null = np.asarray(rec["null_mean"], np.float64)
    pair = np.asarray(rec["source_site"], np.int64) * 65536 + np.asarray(rec["target_site"], np.int64)
    for c in np.unique(pair[np.isfinite(null)]):
        v = null[(pair == c) & np.isfinite(null)]
        out[(int(c) // 65536, int(c) % 65536)] = v[np.linspace(0, v.size - 1, min(size, v.size)).astype(np.int64)]
    return out


@dataclass
class DenseResult:
    """The edges of a dense build and what the manifest reports about the whole family."""

    kept: dict[str, np.ndarray]     # the kept rows, sites as names (PAIR_KEYS, mean, var, n, p_value, ...)
    decision: Decision              # of the kept rows (all kept), with the family's size
    taus: dict[tuple[str, str], float]    # tau per (source site, target site)
    n_null: int
    n_tested: int
    n_tested_by_pair: dict[tuple[str, str], int]   # finite p-values per (source site, target site)
    n_max: int                      # the most inputs any pair had
    n_cannot_inhibit: int
    sources: list[tuple[str, int]]  # every measured source (a node of the graph, edge or not)


def dense_significance(blocks: Callable[[], Iterable[dict]], sites: tuple[str, ...], opts: BuildOptions,
                       ) -> DenseResult:
    """Two passes over the blocks (`blocks()` yields each block's records, in block order): the family
    and tau, then the edges. Memory: one block, the p-values <= alpha, the null sample, the edges."""
    small, samples, sources = [], {}, set()
    n_tested = n_max = n_cannot = 0
    by_pair = np.zeros((len(sites), len(sites)), np.int64)       # [source code, target code]
    for rec in blocks():
        p = np.asarray(rec["p_value"], np.float64)
        ok = np.isfinite(p)
        n_tested += int(ok.sum())
        np.add.at(by_pair, (np.asarray(rec["source_site"], np.int64)[ok], np.asarray(rec["target_site"], np.int64)[ok]), 1)
        small.append(p[ok & (p <= opts.alpha)])
        n = np.asarray(rec["n"], np.float64)
        n_max = max(n_max, int(n[np.isfinite(n)].max(initial=0)))
        if opts.read != "pre":
            n_cannot += int(((np.asarray(rec["target_active"]) == 0) & ok).sum())
        sources |= set(zip(np.asarray(rec["source_site"]).tolist(), np.asarray(rec["source"]).tolist()))
        for c, v in null_sample(rec).items():
            samples.setdefault(c, []).append(v)
    family = StreamedFamily.from_smallest(np.concatenate(small) if small else np.zeros(0), n_tested,
                                          alpha=opts.alpha, correction=opts.correction)
    tau_code = {c: null_threshold(np.concatenate(v), opts.tau_quantile) for c, v in samples.items()}
    tau_of = np.zeros((len(sites), len(sites)))            # [source code, target code]; 0 without a null
    for (a, b), t in tau_code.items():
        tau_of[a, b] = t
    kept: dict[str, list] = {k: [] for k in DENSE_KEYS}
    extra = {"p_bonferroni": [], "q_value": [], "tau": []}
    for rec in blocks():
        tau = tau_of[np.asarray(rec["source_site"], np.int64), np.asarray(rec["target_site"], np.int64)]
        d = family.decide_block(rec["mean"], rec["p_value"], tau)
        for k in DENSE_KEYS:
            kept[k].append(np.asarray(rec[k])[d.keep])
        for k in extra:
            extra[k].append(getattr(d, k)[d.keep])
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in {**kept, **extra}.items()}
    names = np.asarray(sites, dtype=object)
    rows = {k: cat[k] for k in DENSE_KEYS}
    for k in ("source_site", "target_site"):
        rows[k] = names[cat[k].astype(np.int64)].astype(str) if len(cat[k]) else np.zeros(0, str)
    for k in ("source", "target"):
        rows[k] = cat[k].astype(np.int64)
    for k in ("mean", "var", "n", "null_mean", "target_active"):
        rows[k] = cat[k].astype(np.float64)
    decision = Decision(keep=np.ones(len(rows["mean"]), bool), p_bonferroni=cat["p_bonferroni"],
                        q_value=cat["q_value"], tau=cat["tau"], n_tested=n_tested)
    return DenseResult(kept=rows, decision=decision, n_null=sum(int(sum(map(len, v))) for v in samples.values()),
                       taus={(sites[a], sites[b]): t for (a, b), t in tau_code.items()}, n_tested=n_tested, n_max=n_max,
                       n_tested_by_pair={(sites[a], sites[b]): int(by_pair[a, b]) for a, b in zip(*np.nonzero(by_pair))},
                       n_cannot_inhibit=n_cannot, sources=[(sites[c], int(f)) for c, f in sorted(sources)])
