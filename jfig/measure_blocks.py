"""Resumable measurement stages of a graph build: source blocks, their null, and gating.

Each block of source features is measured on its candidate targets (and, every
`null_every`-th block, with random directions for the null) and written to
`out_dir/blocks/block_{i:05d}.npz` atomically; blocks already on disk are skipped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .measure import measure_effects, measure_gating
from .sites import parse_site
from .stats import sign_flip_normal_pvalues, sign_flip_pvalues

BLOCK_KEYS = ("source_site", "source", "target_site", "target", "mean", "var", "n", "p_value", "null_mean")


def _site_key(site: str):
    try:
        s = parse_site(site)
        return (s.layer, s.stage, site)
    except Exception:  # noqa: BLE001 -- models wrapped with from_function may use other names
        return (10**9, 0, site)


def plan_sources(pairs: dict, max_sources: int | None) -> list[tuple[str, int, dict]]:
    """[(source_site, source, {target_site: [targets]})] in a deterministic order."""
    by_src: dict[tuple[str, int], dict[str, set]] = {}
    for ss, s, ts, t in zip(pairs["source_site"], pairs["source"], pairs["target_site"], pairs["target"]):
        by_src.setdefault((ss, int(s)), {}).setdefault(ts, set()).add(int(t))
    order = sorted(by_src, key=lambda k: (_site_key(k[0]), k[1]))
    if max_sources is not None and len(order) > max_sources:
        n_pairs = {k: sum(len(v) for v in by_src[k].values()) for k in order}
        keep = set(sorted(order, key=lambda k: -n_pairs[k])[:max_sources])
        order = [k for k in order if k in keep]
    return [(ss, s, {t: sorted(v) for t, v in by_src[(ss, s)].items()}) for ss, s in order]


def _pvalues(eff, opts, seed):
    if opts.pvalue == "permutation":
        return sign_flip_pvalues(eff.per_input, eff.input_weight, n_perm=opts.n_perm, seed=seed)
    return sign_flip_normal_pvalues(eff.per_input, eff.input_weight)


def _measure_block(model, saes, tokens, atlas, block, opts, index):
    sources = [(ss, s) for ss, s, _ in block]
    tsets: dict[str, set] = {}
    for _, _, tg in block:
        for ts, t in tg.items():
            tsets.setdefault(ts, set()).update(t)
    targets = {ts: sorted(v) for ts, v in sorted(tsets.items(), key=lambda kv: _site_key(kv[0]))}
    kw = dict(method=opts.method, positions=opts.positions, targets=targets, inputs_per_source=opts.inputs_per_source,
              atlas=atlas, batch_size=opts.batch_size, memory_budget=opts.memory_budget, seed=opts.seed + index,
              progress=False)
    eff = measure_effects(model, saes, sources, tokens, keep_per_input=True, **kw)
    p = _pvalues(eff, opts, opts.seed + index)
    null = None
    if opts.null_every and index % opts.null_every == 0:
        null = measure_effects(model, saes, sources, tokens, direction="random", **kw).mean
    col = {(ts, t): c for c, (ts, t) in enumerate(eff.targets)}
    rows = {k: [] for k in BLOCK_KEYS}
    for r, (ss, s, tg) in enumerate(block):
        for ts, tl in tg.items():
            for t in tl:
                c = col[(ts, t)]
                rows["source_site"].append(ss)
                rows["source"].append(s)
                rows["target_site"].append(ts)
                rows["target"].append(t)
                rows["mean"].append(eff.mean[r, c])
                rows["var"].append(eff.var[r, c])
                rows["n"].append(eff.n[r, c])
                rows["p_value"].append(p[r, c])
                rows["null_mean"].append(np.nan if null is None else null[r, c])
    return {k: np.asarray(v) for k, v in rows.items()}


def measure_blocks(model, saes, tokens, atlas, pairs, opts, run, progress, on_block=None) -> dict:
    """Measure every candidate source in blocks (resumable); returns the concatenated block records."""
    from tqdm.auto import tqdm
    from .pipeline import _write_npz
    plan = plan_sources(pairs, opts.max_sources)
    blocks = [plan[i: i + opts.block_size] for i in range(0, len(plan), opts.block_size)]
    out = []
    bar = tqdm(total=len(blocks), desc="measure blocks", unit="block", disable=not progress, dynamic_ncols=True)
    for i, block in enumerate(blocks):
        path = None if run.dir is None else run.dir / "blocks" / f"block_{i:05d}.npz"
        rec = _load_block(path)
        if rec is None:
            rec = _measure_block(model, saes, tokens, atlas, block, opts, i)
            if path is not None:
                _write_npz(path, **rec)
        out.append(rec)
        bar.update(1)
        if on_block is not None:
            on_block(i)
    bar.close()
    if not out:
        return {k: np.zeros(0) for k in BLOCK_KEYS}
    return {k: np.concatenate([r[k] for r in out]) for k in BLOCK_KEYS}


def _load_block(path: Path | None):
    if path is None or not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        if not all(k in z.files for k in BLOCK_KEYS):
            return None
        return {k: z[k] for k in BLOCK_KEYS}


def gating_stage(model, saes, tokens, sig: dict, opts, run, progress) -> dict | None:
    """Second-order tests for targets with several significant inputs at one site (resumable)."""
    from .pipeline import _write_npz
    path = None if run.dir is None else run.dir / "gating.npz"
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    groups: dict[tuple[str, int, str], list[int]] = {}
    for ss, s, ts, t in zip(sig["source_site"], sig["source"], sig["target_site"], sig["target"]):
        groups.setdefault((ts, int(t), ss), []).append(int(s))
    multi = sorted(((k, sorted(set(v))) for k, v in groups.items() if len(set(v)) >= 2),
                   key=lambda kv: (-len(kv[1]), _site_key(kv[0][0]), kv[0][1], _site_key(kv[0][2])))
    multi = multi[: opts.gating_max_targets]
    rec = {k: [] for k in ("source_site", "source", "modulator", "target_site", "target", "mean", "var", "n")}
    for (ts, t, ss), srcs in multi:
        pairs = [((ss, a), (ss, b)) for ai, a in enumerate(srcs) for b in srcs[ai + 1:]][: opts.gating_max_pairs]
        g = measure_gating(model, saes, pairs, tokens, method=opts.gating_method, targets={ts: [t]},
                           inputs_per_pair=opts.inputs_per_source, batch_size=opts.batch_size, seed=opts.seed)
        col = list(g.targets).index((ts, t))
        for p, ((_, a), (_, b)) in enumerate(pairs):
            for k, v in (("source_site", ss), ("source", a), ("modulator", b), ("target_site", ts), ("target", t),
                         ("mean", g.mean[p, col]), ("var", g.var[p, col]), ("n", g.n[p, col])):
                rec[k].append(v)
    rec = {k: np.asarray(v) for k, v in rec.items()}
    if path is not None:
        _write_npz(path, **rec)
    return rec
