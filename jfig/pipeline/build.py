"""build_graph: atlas -> candidates -> measure -> significance -> InteractionGraph, resumable.

With `out_dir`, every stage writes its result as it completes: the atlas, the candidate table,
then one file per block of source features (measured effects on their candidate targets and
the random-direction null), then the gating tests. A rerun with the same inputs and options
skips what is on disk (each file checked against the checksum recorded in build_state.json),
so an interrupted build resumes with no block lost or repeated, and the final graph equals an
uninterrupted run.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import numpy as np

from ..data import looks_like_tokens, tokens_from
from ..data.files import fingerprint
from ..errors import JfigError
from ..graph import InteractionGraph, NodeInfo, assemble_graph
from ..measure import AUTO_INPUTS, check_dictionaries
from ..stats import min_attainable_pvalue
from .options import BuildOptions, format_bytes
from .dense import build_sites, dense_significance
from .stages import (GATING_FLAG_CV, PAIR_KEYS, atlas_stage, candidates_stage, edge_records, first_order_edges,
                     gating_edges, gating_stage, measure_blocks, shared_prefix, smallest_pvalue, target_scales,
                     tau_summary, tested_by_site_pair, warn_unreachable)
from .state import RunState, process_folder, wait_for_peer, wait_for_peers

log = logging.getLogger(__name__)


def cannot_inhibit(rec: dict, opts: BuildOptions) -> int:
    """Tested pairs that could not show inhibition: the target was read after its activation function
    and was inactive on every input, so an effect could only be >= 0 (read="pre" avoids this)."""
    if opts.read == "pre":
        return 0
    active = np.asarray(rec.get("target_active", []), np.float64)
    return int(((active == 0) & np.isfinite(np.asarray(rec["p_value"], np.float64))).sum())


def sae_fingerprint(sae) -> str:
    """Short hash of an SAE's site and first decoder rows (identifies the SAE in a build's state)."""
    w = np.asarray(sae.W_dec, np.float32)
    return fingerprint(w[: min(64, w.shape[0])].tobytes() + sae.site.encode())


def build_graph(model, saes, tokens_or_corpus, *, out_dir=None, seed: int | None = None, progress: bool = True,
                on_block=None, process: tuple[int, int] | None = None, **options) -> InteractionGraph | None:
    """Build the Feature Interaction Graph end to end; returns an InteractionGraph.

    model: a jfig Model; saes: SAEs at several sites; tokens_or_corpus: int tokens [n, seq] (used as
    given: every row, at its length; `seq_len` and `max_sequences` apply to corpora) or a corpus/spec
    (packed with the model's tokenizer into `max_sequences` rows of `seq_len`). Options are
    BuildOptions flat names (top_k=, alpha=, gating=, ...) or per-stage tables (candidates={"top_k":
    ...} or a CandidateOptions); they are checked before any work (OptionError names a bad or unknown
    option). With
    `out_dir`, results are written as they complete and a rerun resumes (see module docstring);
    the graph is saved to `out_dir/graph`. `on_block(i)` is called after each measured block
    (tests use it to interrupt a build).

    Several processes (one per host; `process` = (index, count), by default JAX's
    `jax.process_index()` and `jax.process_count()` after `jax.distributed.initialize()`): every
    process gets the same inputs and options and a shared `out_dir`; working in `out_dir/process_<index>`,
    each counts the atlas over its contiguous share of the rows and merges all processes' parts (the
    atlas of all rows), builds the candidate list (deterministic, so identical), measures every
    count-th block of sources, and records that it is done; process 0 waits for the others' blocks,
    runs significance and gating, and returns the graph (saved to `out_dir/graph`), the same graph
    one process builds. The other processes return None.
    """
    if seed is not None:
        options["seed"] = seed
    opts = BuildOptions.from_dict(options)
    index, count = process if process is not None else (jax.process_index(), jax.process_count())
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise JfigError(f"process must be (index, count) with 0 <= index < count, got {process!r}")
    if count > 1 and out_dir is None:
        raise JfigError(f"a build over {count} processes needs out_dir: a folder every process can read and write")
    saes = check_dictionaries(model, saes)       # SAEs and transcoders (input norms attached)
    t0 = stage_t = time.time()
    if looks_like_tokens(tokens_or_corpus):      # a token array is used as given: its rows and its length
        tokens = tokens_from(tokens_or_corpus, model)
    else:
        tokens = tokens_from(tokens_or_corpus, model, opts.seq_len, seed=opts.seed,
                             max_tokens=opts.max_sequences * opts.seq_len)[: opts.max_sequences]
    if opts.inputs_per_source is None:
        opts = opts.with_inputs_resolved(model.config, [x.d_sae for x in saes.values()], tokens.shape[1])
        log.info("inputs_per_source: %d (what memory_budget %s allows per source, up to %d)",
                 opts.inputs_per_source, format_bytes(opts.memory_budget), AUTO_INPUTS)
    fp = {"options": opts.to_dict(), "tokens": fingerprint(tokens.tobytes()),
          "saes": {s: sae_fingerprint(x) for s, x in sorted(saes.items())},
          "model": repr(model.config) if model.config is not None else str(model.sites)}
    state = RunState(out_dir if count == 1 else process_folder(out_dir, index), fp)
    sae_list = list(saes.values())

    def stage(name: str) -> None:
        nonlocal stage_t
        log.info("%s in %.0f s", name, time.time() - stage_t)
        stage_t = time.time()

    def peer_atlas(j):               # process j's atlas of its share of the rows
        peer, _ = wait_for_peer(out_dir, fp, j, count, "atlas_done.json")
        part = peer.load_atlas("atlas_part")
        if part is None:
            raise JfigError(f"process {j} reported its atlas done, but {peer.dir / 'atlas_part'} is missing or "
                            f"does not match its checksum")
        return part

    atlas = atlas_stage(model, sae_list, tokens, opts, state, progress, fp["tokens"], (index, count), peer_atlas)
    pairs, report = candidates_stage(model, sae_list, atlas, tokens, opts, state, progress)
    stage(f"atlas and {report.rows[-1]['after'] if report.rows else 0} candidate pairs")
    shared: dict = {}

    def clean():                     # the clean prefix, run once and only if something is measured
        if "prefix" not in shared:
            shared["prefix"] = shared_prefix(model, saes, tokens, opts)
        return shared["prefix"]

    def peers():                     # the other processes' blocks (process 0 of several)
        return wait_for_peers(out_dir, fp, count, lambda done: [f"blocks/block_{b:05d}.npz" for b in done["blocks"]])

    rec = measure_blocks(model, saes, tokens, atlas, pairs, opts, state, progress, on_block, clean, (index, count),
                         peers)
    if rec is None:
        log.info("process %d of %d: its blocks are measured; process 0 builds the graph", index, count)
        return None
    dense = dense_significance(rec, build_sites(saes), opts) if callable(rec) else None
    if dense is not None:            # significance streamed over the block files; only the edges are kept
        rec = dense.kept
        log.info("dense significance: %d of %d pairs are edges", len(rec["mean"]), dense.n_tested)
        warn_unreachable(dense.n_max, opts, dense.n_tested)
    if len(rec["target"]):
        rec["target_sd"] = target_scales(model, saes, tokens, rec, opts, clean())
    stage("measurement")
    if dense is not None:
        first = edge_records(rec, dense.decision, opts)
        stats = dict(taus=dense.taus, n_null=dense.n_null, n_tested=dense.n_tested, by_pair=dense.n_tested_by_pair,
                     n_cannot_inhibit=dense.n_cannot_inhibit, min_p=min_attainable_pvalue(dense.n_max))
    else:
        first, taus, n_null = first_order_edges(rec, opts)
        stats = dict(taus=taus, n_null=n_null, n_tested=first.decision.n_tested, by_pair=tested_by_site_pair(rec),
                     n_cannot_inhibit=cannot_inhibit(rec, opts), min_p=smallest_pvalue(rec))
    gating, tau_gate, n_gating_null = None, 0.0, 0
    if opts.gating.enabled:
        sig = {k: rec[k][first.decision.keep] for k in PAIR_KEYS}
        gate = gating_stage(model, saes, tokens, atlas, sig, opts, state, clean)
        gating, tau_gate, n_gating_null = gating_edges(gate, opts)
    tau_by_target, tau_by_pair = tau_summary(stats["taus"])
    manifest = {
        "model": {"name": getattr(model.config, "name", "") if model.config is not None else "function",
                  "family": getattr(model.config, "family", None), "n_layers": getattr(model.config, "n_layers", None),
                  "d_model": getattr(model.config, "d_model", None)},
        "saes": [{"site": s, "d_sae": int(x.d_sae), "architecture": x.architecture, "k": x.k,
                  "fingerprint": fp["saes"][s]} for s, x in sorted(saes.items())],
        "corpus_hash": fp["tokens"],
        "options": opts.to_dict(),
        "statistics": {"tau": tau_by_target, "tau_by_site_pair": tau_by_pair,
                       "n_tested": stats["n_tested"], "n_null": stats["n_null"],
                       "n_tested_by_site_pair": {f"{a} -> {b}": n for (a, b), n in sorted(stats["by_pair"].items())},
                       "n_cannot_inhibit": stats["n_cannot_inhibit"],
                       "min_attainable_p": stats["min_p"],
                       "n_gating_tested": 0 if gating is None else len(gating),
                       "tau_gate": tau_gate, "n_gating_null": n_gating_null, "gating_flag_cv": GATING_FLAG_CV,
                       "n_sequences": int(tokens.shape[0]), "seq_len": int(tokens.shape[1])},
        "pruning_report": [dict(r) for r in report.rows],
    }
    decode = model.tokenizer.decode if model.tokenizer is not None else None
    graph = assemble_graph(first, gating, node_info=NodeInfo(atlas, decode), sites=model.sites,
                           positions=opts.positions, manifest=manifest,
                           sources=dense.sources if dense is not None else None)
    stage("significance, gating and graph")
    gpath = state.path("graph") if count == 1 else Path(out_dir) / "graph"
    if gpath is not None:
        graph.save(gpath)
    log.info("graph built in %.0f s", time.time() - t0)
    return graph
