"""The stages of a graph build, each resumable through the build folder's RunState.

    atlas_stage       co-activation atlas over the build's tokens            -> atlas/
    candidates_stage  importance (a measurement), then the pruning filters   -> candidates.json
    measure_blocks    blocks of source features on their candidate targets   -> blocks/block_{i:05d}.npz
                      (every `null_every`-th block and each source site's first block also with
                      random directions: the null for tau)
    first_order_edges significance of every measured pair (one path: jfig.stats.decide), tau per
                      (source site, target site); warns when Bonferroni's alpha / m is below the smallest p-value
                      the inputs allow
    gating_stage      second-order tests (source, modulator -> target) for targets with a significant
                      input, with the random-modulator null on every triple  -> gating.npz
    gating_edges      significance of every tested triple (the first-order test, tau_gate from the null)
"""
from __future__ import annotations

import logging

import numpy as np

from ..atlas import Atlas, build_atlas, tracked_features
from ..candidates import Report, select_candidates, select_sources, window_targets
from ..data.progress import progress_bar
from ..errors import JfigError
from ..graph import EdgeRecords
from ..measure import (CleanPrefix, activation_sd, clean_prefix, clean_prefix_bytes, feature_importance_by_site,
                       measure_gating, prefix_sites)
from ..saes import Transcoder
from ..sites import site_key
from ..stats import (Decision, decide, label_permutation_pvalue, min_attainable_pvalue, min_inputs_for_pvalue,
                     null_threshold, pair_thresholds, robust_pvalues, sign_flip_normal_pvalues, sign_flip_pvalues,
                     sign_flip_saddlepoint_pvalues)
from .dense import DENSE_KEYS, measure_dense_block, plan_dense, sweep_block
from .options import BuildOptions
from .state import RunState

BLOCK_KEYS = ("source_site", "source", "target_site", "target", "mean", "var", "n", "p_value", "null_mean",
              "target_active")
PAIR_FLAGS = ("low_coactivation", "admitted_by")
PAIR_KEYS = ("source_site", "source", "target_site", "target")
GATE_KEYS = ("source_site", "source", "modulator_site", "modulator", "target_site", "target", "mean", "var", "n",
             "p_value", "null_mean")
GATING_FLAG_CV = 1.0    # first-order edges with std/|mean| of their per-input slopes above this are flagged
log = logging.getLogger(__name__)


def atlas_stage(model, sae_list, tokens, opts: BuildOptions, state: RunState, progress: bool,
                corpus_hash: str, shard: tuple[int, int] = (0, 1), peer_atlas=None) -> Atlas:
    """The co-activation atlas of the build's tokens (resumable). With shard = (i, P), P > 1 processes:
    this one counts its contiguous share of the rows (`atlas_part`, tracking the features the whole
    corpus selects), then merges every process's part in row order (`peer_atlas(j)` -> process j's
    part, waiting for it): exactly the counts, histograms and contexts of one atlas over all rows."""
    atlas = state.load_atlas()
    if atlas is not None:
        log.info("atlas loaded from %s", state.path("atlas"))
        return atlas
    index, count = shard
    kw = dict(window=opts.window, position_window=opts.position_window, batch_size=opts.batch_size, progress=progress)
    if count == 1:
        atlas = build_atlas(model, sae_list, tokens, corpus_hash=corpus_hash, **kw)
    else:
        part = state.load_atlas("atlas_part")
        if part is None:
            bounds = np.linspace(0, len(tokens), count + 1).astype(int)
            features = tracked_features(model, sae_list, tokens, batch_size=opts.batch_size)
            part = build_atlas(model, sae_list, tokens[bounds[index]: bounds[index + 1]], features=features, **kw)
            state.save_atlas(part, "atlas_part")
        state.save_json("atlas_done.json", {"process": index})
        parts = [part if j == index else peer_atlas(j) for j in range(count)]
        atlas = parts[0]
        for other in parts[1:]:
            atlas = Atlas.merge(atlas, other)
        atlas.corpus_hash = corpus_hash
        log.info("atlas merged from %d processes' parts", count)
    state.save_atlas(atlas)
    return atlas


def candidates_stage(model, sae_list, atlas: Atlas, tokens, opts: BuildOptions, state: RunState,
                     progress: bool) -> tuple[dict, Report]:
    """Candidate pairs {source_site, source, target_site, target: lists} and the pruning report; with
    targets = "all", {"dense": the sources and their target sites} (SourceCandidates.to_json)."""
    saved = state.load_json("candidates.json")
    if saved is not None:
        return saved["pairs"], Report(rows=[dict(r) for r in saved["report"]])
    imp_tokens = tokens[: opts.importance_sequences] if opts.importance_sequences else tokens
    pool = 4 * opts.top_k if opts.importance_pool is None else opts.importance_pool
    effects = None
    ranked = sae_list      # a dense build ranks only features that are sources (targets are every feature)
    if opts.targets == "all":
        ranked = [s for s in sae_list if s.site in window_targets(atlas.sites, opts.window)]
    if opts.importance != "rate":
        effects = feature_importance_by_site(atlas, ranked, model, imp_tokens, kind=opts.importance, pool=pool,
                                             batch_size=opts.batch_size, memory_budget=opts.memory_budget,
                                             progress=progress)
    if opts.targets == "all":
        dense = select_sources(atlas, sae_list, effects=effects, importance=opts.importance, top_k=opts.top_k,
                               window=opts.window)
        pairs, report = {"dense": dense.to_json()}, dense.report
        state.save_json("candidates.json", {"pairs": pairs, "report": report.rows})
        return pairs, report
    cands = select_candidates(atlas, sae_list, effects=effects, importance=opts.importance, top_k=opts.top_k,
                              min_coact=opts.min_coact, keep_low_coact=opts.keep_low_coact,
                              min_alignment=opts.min_alignment, window=opts.window)
    pairs = cands.pairs.select([*PAIR_KEYS, "low_coactivation", "admitted_by", "priority"]).to_pydict()
    state.save_json("candidates.json", {"pairs": pairs, "report": cands.report.rows})
    return pairs, cands.report


def plan_sources(pairs: dict, max_sources: int | None) -> list[tuple[str, int, dict]]:
    """[(source_site, source, {target_site: [targets]})] in a deterministic order."""
    by_src: dict[tuple[str, int], dict[str, set]] = {}
    for ss, s, ts, t in zip(pairs["source_site"], pairs["source"], pairs["target_site"], pairs["target"]):
        by_src.setdefault((ss, int(s)), {}).setdefault(ts, set()).add(int(t))
    order = sorted(by_src, key=lambda k: (*site_key(k[0]), k[0], k[1]))
    if max_sources is not None and len(order) > max_sources:
        n_pairs = {k: sum(len(v) for v in by_src[k].values()) for k in order}
        prior: dict[tuple[str, int], float] = {}
        for ss, s, p in zip(pairs["source_site"], pairs["source"], pairs.get("priority", [0.0] * len(pairs["source"]))):
            prior[(ss, int(s))] = prior.get((ss, int(s)), 0.0) + float(p)
        keep = set(sorted(order, key=lambda k: (-n_pairs[k], -prior.get(k, 0.0)))[:max_sources])
        order = [k for k in order if k in keep]
    return [(ss, s, {t: sorted(v) for t, v in by_src[(ss, s)].items()}) for ss, s in order]


def pvalues(per_input, weights, opts: BuildOptions, seed: int) -> np.ndarray:
    """p-values [rows, n_targets] of mean effect = 0 from per-input effects [rows, M, n_targets] and
    weights [rows, M] (or [rows, M, n_targets]) by the `pvalue` option; first-order and gating alike."""
    if opts.pvalue == "permutation":
        return sign_flip_pvalues(per_input, weights, n_perm=opts.n_perm, seed=seed)
    if opts.pvalue == "normal":
        return sign_flip_normal_pvalues(per_input, weights)
    if opts.pvalue == "saddlepoint":
        return sign_flip_saddlepoint_pvalues(per_input, weights)
    return robust_pvalues(per_input, weights)


def smallest_pvalue(rec: dict) -> float:
    """The smallest p-value the measured pairs' inputs allow (exact sign-flip floor 2 / 2^n at the
    largest n); 1 without inputs."""
    n = np.asarray(rec["n"], np.float64)
    n = n[np.isfinite(n)]
    return min_attainable_pvalue(n.max() if n.size else 0)


def warn_unreachable(n_max: int, opts: BuildOptions, n_tested: int) -> None:
    """Log a warning when no pair can pass Bonferroni: alpha / m is below the smallest p-value that
    n_max inputs (the most any pair had) allow (the normal approximation and the Monte-Carlo test
    have higher floors still)."""
    if opts.correction != "bonferroni" or n_tested == 0:
        return
    floor, need = min_attainable_pvalue(n_max), opts.alpha / n_tested
    if floor >= need:
        log.warning("Bonferroni over m = %d tests at alpha = %g needs p < %.3g, but with n = %d inputs the "
                    "smallest attainable p-value is %.3g; raise inputs_per_source to at least %d or use "
                    "correction = 'bh'", n_tested, opts.alpha, need, n_max, floor, min_inputs_for_pvalue(need))


def shared_prefix(model, saes: dict, tokens, opts: BuildOptions) -> CleanPrefix | None:
    """The clean run of the build's tokens at every SAE site with every layer's keys/values, shared by
    every block and the gating tests (one prefix run instead of one per block and site); None for
    wrapped models or when it would not fit `memory_budget` (each sweep then runs its own prefix)."""
    if model.apply_fn is not None:
        return None
    sites = prefix_sites(saes)                   # a transcoder: its input and its output site
    need = clean_prefix_bytes(model.config, tokens.shape[0], tokens.shape[1],
                              [model.site_width(s) or model.config.d_model for s in sites])
    if need > opts.memory_budget:
        log.info("clean prefix of %d bytes exceeds memory_budget; each sweep runs its own prefix", need)
        return None
    return clean_prefix(model, tokens, sites, opts.batch_size)


def measure_block(model, saes, tokens, atlas, block, opts: BuildOptions, index: int,
                  clean: CleanPrefix | None = None, with_null: bool = False) -> dict[str, np.ndarray]:
    """One block of sources measured on their candidate targets (+ the random-direction null when
    `with_null`): a record per (source, target) pair. `clean`: the shared clean prefix."""
    sources = [(ss, s) for ss, s, _ in block]
    tsets: dict[str, set] = {}
    for _, _, tg in block:
        for ts, t in tg.items():
            tsets.setdefault(ts, set()).update(t)
    targets = {ts: sorted(v) for ts, v in sorted(tsets.items(), key=lambda kv: (*site_key(kv[0]), kv[0]))}
    eff, p, null = sweep_block(model, saes, sources, tokens, targets, atlas, opts, index, clean, pvalues, with_null)
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
                rows["target_active"].append(eff.target_active[r, c])
    return {k: np.asarray(v) for k, v in rows.items()}


def measure_blocks(model, saes, tokens, atlas, pairs: dict, opts: BuildOptions, state: RunState, progress: bool,
                   on_block=None, clean=lambda: None, shard: tuple[int, int] = (0, 1), peers=None):
    """Measure every candidate source in blocks (resumable); returns the concatenated block records, or
    for a dense build (pairs {"dense": ...}) `blocks()`, which yields each block's records from disk in
    block order (never all in memory, given a build folder). `clean()` gives the shared clean prefix (called only
    when a block has to be measured).

    With shard = (i, P), P > 1 processes: this one measures blocks b with b % P == i and records
    `done.json`; process 0 then reads the others' blocks (`peers()` -> {file name: PeerState holding
    it}) and returns all records in block order, as one process would; the others return None."""
    dense = "dense" in pairs
    plan = plan_dense(pairs["dense"], opts.max_sources) if dense else plan_sources(pairs, opts.max_sources)
    keys = DENSE_KEYS if dense else BLOCK_KEYS
    blocks = [plan[i: i + opts.block_size] for i in range(0, len(plan), opts.block_size)]
    nulls = null_blocks(blocks, opts.null_every)
    index, count = shard
    mine = [b for b in range(len(blocks)) if b % count == index]
    name = "blocks/block_{:05d}.npz".format
    got: dict[int, dict] = {}
    with progress_bar(len(mine), desc="measure blocks", unit="block", enabled=progress) as bar:
        for i in mine:
            rec = state.load_npz(name(i))
            if rec is None or not all(k in rec for k in keys):
                rec = measure_dense_block(model, saes, tokens, atlas, blocks[i], opts, i, clean(), pvalues,
                                          i in nulls) if dense \
                    else measure_block(model, saes, tokens, atlas, blocks[i], opts, i, clean(), i in nulls)
                state.save_npz(name(i), rec)
            if not dense or state.dir is None:       # a dense build without a folder holds its blocks
                got[i] = {k: rec[k] for k in keys}
            bar.update(1)
            if on_block is not None:
                on_block(i)
    holders = {}
    if count > 1:
        state.save_json("done.json", {"blocks": mine, "n_blocks": len(blocks)})
        if index != 0:
            return None
        holders = peers()
        missing = [name(b) for b in range(len(blocks)) if b % count != 0 and name(b) not in holders]
        if missing:
            raise JfigError(f"the other processes did not measure {missing[:3]} (of {len(missing)} blocks); "
                            f"were they given the same inputs and options?")

    def load(b: int) -> dict:
        if b in got:
            return got[b]
        rec = state.load_npz(name(b)) if b % count == 0 else holders[name(b)].load_npz(name(b))
        if rec is None:
            raise JfigError(f"block file {name(b)} changed or vanished after it was measured")
        return {k: rec[k] for k in keys}

    if dense:
        return lambda: (load(b) for b in range(len(blocks)))
    got.update({b: load(b) for b in range(len(blocks)) if b not in got})
    if not got:
        rec = {k: np.zeros(0) for k in BLOCK_KEYS}
    else:
        rec = {k: np.concatenate([got[b][k] for b in sorted(got)]) for k in BLOCK_KEYS}
    return {**rec, **pair_flags(pairs, rec)}


def pair_flags(pairs: dict, rec: dict) -> dict[str, np.ndarray]:
    """How each measured pair was admitted (low co-activation flag, the admitting filter), [n_pairs]."""
    if not all(k in pairs for k in PAIR_FLAGS):
        return {}
    flags = {(ss, int(s), ts, int(t)): (bool(lo), str(by)) for ss, s, ts, t, lo, by in
             zip(*(pairs[k] for k in (*PAIR_KEYS, *PAIR_FLAGS)))}
    got = [flags.get((str(ss), int(s), str(ts), int(t)), (False, "")) for ss, s, ts, t in
           zip(*(rec[k] for k in PAIR_KEYS))]
    return {"low_coactivation": np.asarray([g[0] for g in got], bool),
            "admitted_by": np.asarray([g[1] for g in got], dtype=object if not got else None)}


def target_scales(model, saes: dict, tokens, rec: dict, opts: BuildOptions, clean: CleanPrefix | None) -> np.ndarray:
    """[n_pairs]: the standard deviation over the build's tokens of each pair's target, as measured
    (activation, or pre-activation with read="pre"); weights divided by it are in target SDs."""
    out = np.full(len(rec["target"]), np.nan)
    sites = np.asarray(rec["target_site"]).astype(str)
    targets = np.asarray(rec["target"], np.int64)
    for site in np.unique(sites):
        rows = sites == site
        feats = np.unique(targets[rows])
        sd = activation_sd(model, saes[site], feats, tokens, read=opts.read, batch_size=opts.batch_size, clean=clean)
        out[rows] = sd[np.searchsorted(feats, targets[rows])]
    return out


def first_order_edges(rec: dict, opts: BuildOptions) -> tuple[EdgeRecords, dict[tuple[str, str], float], int]:
    """Every measured pair with its decision: corrected p < alpha and |mean| > tau, tau per (source
    site, target site) from the random-direction null. Also returns tau by site pair and the number
    of null effects."""
    ok = np.isfinite(rec["null_mean"])
    taus = pair_thresholds(rec["null_mean"][ok], rec["source_site"][ok], rec["target_site"][ok], opts.tau_quantile)
    tau = np.asarray([taus.get((str(a), str(b)), 0.0) for a, b in zip(rec["source_site"], rec["target_site"])],
                     np.float64)
    decision = decide(rec["mean"], rec["p_value"], alpha=opts.alpha, correction=opts.correction, tau=tau)
    n = np.asarray(rec["n"], np.float64)
    warn_unreachable(int(n[np.isfinite(n)].max(initial=0)), opts, decision.n_tested)
    return edge_records(rec, decision, opts), taus, int(ok.sum())


def tested_by_site_pair(rec: dict) -> dict[tuple[str, str], int]:
    """(source site, target site) -> how many of its pairs were tested (have a finite p-value)."""
    ok = np.isfinite(np.asarray(rec["p_value"], np.float64))
    pairs = zip(np.asarray(rec["source_site"])[ok].tolist(), np.asarray(rec["target_site"])[ok].tolist())
    out: dict[tuple[str, str], int] = {}
    for pair in pairs:
        out[pair] = out.get(pair, 0) + 1
    return out


def tau_summary(taus: dict[tuple[str, str], float]) -> tuple[dict[str, float], dict[str, float]]:
    """For the manifest: tau per target site (the smallest over its source sites: the least any edge
    into the site had to exceed) and tau per "source -> target" site pair (what each edge exceeded)."""
    by_target: dict[str, float] = {}
    for (a, b), t in taus.items():
        by_target[b] = min(by_target.get(b, t), t)
    return by_target, {f"{a} -> {b}": t for (a, b), t in sorted(taus.items())}


def null_blocks(blocks: list, null_every: int) -> set[int]:
    """Blocks also measured with random directions: every `null_every`-th, and the first block of each
    source site (so every site pair has a null for its tau); none when null_every is 0."""
    if not null_every:
        return set()
    out, seen = set(range(0, len(blocks), null_every)), set()
    for i, block in enumerate(blocks):
        sites = {ss for ss, _, _ in block}
        if sites - seen:
            out.add(i)
        seen |= sites
    return out


def edge_records(rec: dict, decision: Decision, opts: BuildOptions) -> EdgeRecords:
    """EdgeRecords of measured pairs and their decision. Each pair also gets cv = std/|mean| of its
    per-input slopes and the variance-based gating flag cv > GATING_FLAG_CV (the effect changes a lot
    from input to input: possibly gated), and weight_sd = mean / target_sd where target_sd is given."""
    extra = {k: rec[k] for k in (*PAIR_FLAGS, "target_active") if k in rec}
    if "target_sd" in rec:
        sd = np.asarray(rec["target_sd"], np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            extra["weight_sd"] = np.where(sd > 0, np.asarray(rec["mean"], np.float64) / sd, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        cv = np.sqrt(np.asarray(rec["var"], np.float64)) / np.abs(np.asarray(rec["mean"], np.float64))
    return EdgeRecords(**{k: rec[k] for k in (*PAIR_KEYS, "mean", "var", "n", "p_value")}, decision=decision,
                       estimator=opts.method, positions=opts.positions, cv=cv,
                       gating_flag=np.isfinite(cv) & (cv > GATING_FLAG_CV), extra=extra)


def _source_modulator(a: tuple[str, int], b: tuple[str, int], order: dict) -> tuple:
    """(source, modulator) for two features: the one at the later site is the source (the modulator
    must sit at the source's site or before it); at one site, the smaller feature id."""
    if order[a[0]] != order[b[0]]:
        return (a, b) if order[a[0]] > order[b[0]] else (b, a)
    return (a, b) if a[1] < b[1] else (b, a)


def gating_pairs(sig: dict, atlas: Atlas, opts: BuildOptions, sites: tuple[str, ...]) -> list:
    """[((target_site, target), [((site_i, i), (site_k, k)), ...])]: the triples to test for gating.

    Targets: every target with at least one significant first-order input, most inputs first, at most
    `gating_max_targets`. Per target, at most `gating_max_pairs` (source, modulator) pairs:
    (a) every pair of its significant inputs (the input at the later site is the source); then
    (b) pure modulators: for each significant input i, features k at i's site or an earlier one that the
        atlas shows co-activating with both j and i (P(j | k) >= min_coact and P(i | k) >= min_coact),
        k not i and not an input of j, ranked by PMI(k, j) (then P(j | k)·P(i | k)), highest first.
    """
    order = {s: n for n, s in enumerate(sites)}
    inputs: dict[tuple[str, int], set] = {}
    for ss, s, ts, t in zip(sig["source_site"], sig["source"], sig["target_site"], sig["target"]):
        inputs.setdefault((str(ts), int(t)), set()).add((str(ss), int(s)))
    targets = sorted(inputs, key=lambda j: (-len(inputs[j]), order[j[0]], j[1]))[: opts.gating_max_targets]
    cond, pmis = {}, {}                       # atlas matrices, computed once per site pair

    def p_cond(a: str, b: str) -> np.ndarray:
        if (a, b) not in cond:
            cond[(a, b)] = atlas.conditional_probability(a, b)
        return cond[(a, b)]

    def pmi_of(a: str, b: str) -> np.ndarray:
        if (a, b) not in pmis:
            pmis[(a, b)] = np.nan_to_num(atlas.pmi(a, b), nan=-np.inf)
        return pmis[(a, b)]

    out = []
    for j in targets:
        srcs = sorted(inputs[j], key=lambda f: (order[f[0]], f[1]))
        pairs = [_source_modulator(a, b, order) for n, a in enumerate(srcs) for b in srcs[n + 1:]]
        if len(pairs) >= opts.gating_max_pairs:          # (a) fills the quota: no modulator search
            out.append((j, pairs[: opts.gating_max_pairs]))
            continue
        found = []
        for i in srcs:
            for sk in sites:
                if sk not in atlas.sites or order[sk] > order[i[0]] or (sk, j[0]) not in atlas.pairs or \
                        (sk, i[0]) not in atlas.pairs:
                    continue
                tj, ti = atlas.tracked_index(j[0], [j[1]])[0], atlas.tracked_index(i[0], [i[1]])[0]
                if tj < 0 or ti < 0:
                    continue
                pj = p_cond(sk, j[0])[:, tj]
                pi = p_cond(sk, i[0])[:, ti]
                pmi = pmi_of(sk, j[0])[:, tj]
                for r in np.flatnonzero((np.nan_to_num(pj) >= opts.min_coact) & (np.nan_to_num(pi) >= opts.min_coact)):
                    k = (sk, int(atlas.features[sk][r]))
                    if k != i and k not in inputs[j]:
                        found.append((-pmi[r], -pj[r] * pi[r], order[sk], k[1], order[i[0]], i[1], i, k))
        seen = set(pairs)
        for *_, i, k in sorted(found, key=lambda f: f[:6]):
            if (i, k) not in seen:
                seen.add((i, k))
                pairs.append((i, k))
        if pairs:
            out.append((j, pairs[: opts.gating_max_pairs]))
    return out


def gating_pvalues(g, opts: BuildOptions) -> np.ndarray:
    """p-values [n_pairs, n_targets]: the first-order test (the `pvalue` option) on the per-input values
    (mixed, factorial: under no gating, reversing the modulator's edit flips each input's sign), or
    the label-permutation test of k active vs inactive (conditional)."""
    if g.method != "conditional":
        return pvalues(g.per_input, g.input_weight, opts, opts.seed)
    p = np.full(g.mean.shape, np.nan)
    for r in range(len(g.pairs)):
        w = g.input_weight[r] > 0
        p[r] = label_permutation_pvalue(g.slopes[r][w], g.k_active[r][w], n_perm=opts.n_perm, seed=opts.seed + r)
    return p


def gating_stage(model, saes, tokens, atlas: Atlas, sig: dict, opts: BuildOptions, state: RunState,
                 clean=lambda: None) -> dict:
    """Second-order tests of the triples `gating_pairs` selects, measured like the first-order pairs
    (the build's positions, clamp_at, read and atlas α levels), each also with the modulator's direction
    replaced by a random one of the same norm (the null for tau_gate). Every (source, modulator) pair
    is measured once, on all gating targets together (one compiled sweep per site pair, not one per
    target); each triple reads its own target. Resumable."""
    saved = state.load_npz("gating.npz")
    if saved is not None and all(k in saved for k in GATE_KEYS):
        return saved
    rec = {k: [] for k in GATE_KEYS}
    triples = gating_pairs(sig, atlas, opts, model.sites)
    if opts.gating_method != "conditional":      # these methods edit both features at their own sites
        tc_sites = {s for s, d in saes.items() if isinstance(d, Transcoder)}
        kept = [(j, [pr for pr in prs if pr[0][0] not in tc_sites and pr[1][0] not in tc_sites]) for j, prs in triples]
        dropped = sum(len(prs) for _, prs in triples) - sum(len(prs) for _, prs in kept)
        if dropped:
            log.info("gating: %d (source, modulator) pairs with a transcoder feature are not tested by method %r "
                     "(use gating_method='conditional' for them)", dropped, opts.gating_method)
        triples = [(j, prs) for j, prs in kept if prs]
    if triples:
        kw = dict(method=opts.gating_method, positions=opts.positions, clamp_at=opts.clamp_at, read=opts.read,
                  atlas=atlas, inputs_per_pair=opts.inputs_per_source, batch_size=opts.batch_size, seed=opts.seed,
                  clean=clean())
        pairs = list(dict.fromkeys(pair for _, prs in triples for pair in prs))
        targets: dict[str, list[int]] = {}
        for (ts, t), _ in triples:
            targets.setdefault(ts, []).append(t)
        targets = {ts: sorted(set(v)) for ts, v in targets.items()}
        g = measure_gating(model, saes, pairs, tokens, targets=targets, keep_per_input=True, **kw)
        null = measure_gating(model, saes, pairs, tokens, targets=targets, direction="random", **kw).mean \
            if opts.gating_method != "conditional" else np.full(g.mean.shape, np.nan)
        p = gating_pvalues(g, opts)
        row = {pair: r for r, pair in enumerate(pairs)}
        col = {(ts, t): c for c, (ts, t) in enumerate(g.targets)}
        for (ts, t), prs in triples:
            c = col[(ts, t)]
            for pair in prs:
                r = row[pair]
                (ss, a), (ks, b) = pair
                for k, v in (("source_site", ss), ("source", a), ("modulator_site", ks), ("modulator", b),
                             ("target_site", ts), ("target", t), ("mean", g.mean[r, c]), ("var", g.var[r, c]),
                             ("n", g.n[r, c]), ("p_value", p[r, c]), ("null_mean", null[r, c])):
                    rec[k].append(v)
    rec = {k: np.asarray(v) for k, v in rec.items()}
    state.save_npz("gating.npz", rec)
    return rec


def gating_edges(gate: dict, opts: BuildOptions) -> tuple[EdgeRecords | None, float, int]:
    """Every tested (source, modulator, target) triple with its decision: corrected p < alpha and
    |statistic| > tau_gate, the `tau_quantile` of |random-modulator null statistics|. Also returns
    tau_gate and the number of null values it came from."""
    if len(gate.get("mean", [])) == 0:
        return None, 0.0, 0
    null = np.asarray(gate["null_mean"], np.float64)
    null = null[np.isfinite(null)]
    tau = null_threshold(null, opts.tau_quantile) if null.size else 0.0
    decision = decide(gate["mean"], gate["p_value"], alpha=opts.alpha, correction=opts.correction, tau=tau)
    return EdgeRecords(**{k: gate[k] for k in (*PAIR_KEYS, "mean", "var", "n", "p_value")}, decision=decision,
                       estimator=opts.gating_method, positions=opts.positions, modulator=gate["modulator"],
                       modulator_site=gate["modulator_site"]), tau, int(null.size)
