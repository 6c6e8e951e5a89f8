"""build_graph: atlas → candidates → measure → significance → InteractionGraph, resumable.

With `out_dir`, every stage writes its result as it completes: the atlas, the candidate table,
then one file per block of source features (measured effects on their candidate targets and
the random-direction null). A rerun with the same inputs and options skips what is on disk,
so an interrupted build (Ctrl-C, a kill) resumes with no block lost or repeated, and the final
graph equals an uninterrupted run. Files are written to a temporary name and renamed, so a
block file either exists whole or not at all.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import JfigError
from .measure.types import saes_by_site
from .sites import parse_site

STATE_FILE = "build_state.json"


@dataclass(frozen=True)
class BuildOptions:
    """Every option of a graph build (all have defaults sized for a small CPU run)."""

    seq_len: int = 64
    max_sequences: int = 256            # corpus sequences used (atlas, candidates, measurement)
    window: int = 5                     # layer window for pairs
    position_window: int = 0
    top_k: int = 32                     # important features per site kept as candidates
    importance: str = "loss"            # "loss" (ablation), "kl", "attribution" (first-order, fast) or "rate"
    importance_pool: int | None = None
    importance_sequences: int | None = None   # sequences used for importance (None: all)
    min_coact: float = 0.01
    keep_low_coact: bool = True
    min_alignment: float | None = None
    max_sources: int | None = None      # cap on measured source features (most candidate pairs first)
    method: str = "clamp"
    positions: str = "same"
    inputs_per_source: int = 32
    block_size: int = 8                 # source features per resumable block
    null_every: int = 2                 # run the random-direction control on every n-th block
    alpha: float = 0.01
    correction: str = "bonferroni"
    tau_quantile: float = 0.99
    pvalue: str = "normal"              # "normal" (sign-flip, normal approx.) or "permutation" (Monte-Carlo)
    n_perm: int = 1000
    gating: bool = True
    gating_max_targets: int = 16        # targets with >= 2 significant inputs tested for gating
    gating_max_pairs: int = 15          # (i, k) pairs tested per gating target
    gating_method: str = "factorial"
    batch_size: int = 16
    memory_budget: float = 2e9
    seed: int = 0

    def __post_init__(self):
        from .measure.engine import METHODS, POSITION_MODES
        choices = {"method": METHODS, "positions": POSITION_MODES, "correction": ("bonferroni", "bh", "none"),
                   "pvalue": ("normal", "permutation"), "gating_method": ("mixed", "factorial"),
                   "importance": ("loss", "kl", "attribution", "rate")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise JfigError(f"build option {name}={getattr(self, name)!r}; expected one of {list(allowed)}")
        for name in ("max_sequences", "inputs_per_source", "block_size", "seq_len", "top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise JfigError(f"build option {name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict) -> "BuildOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise JfigError(f"unknown build option(s) {unknown}; known options: {sorted(names)}")
        return cls(**d)


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sae_fingerprint(sae) -> str:
    w = np.asarray(sae.W_dec, np.float32)
    return hashlib.sha256(w[: min(64, w.shape[0])].tobytes() + sae.site.encode()).hexdigest()[:16]


def _write_npz(path: Path, **arrays):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _write_json(path: Path, obj):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class _Run:
    """The on-disk state of one build: checks that a resumed run has the same inputs and options."""

    def __init__(self, out_dir, fingerprint: dict):
        self.dir = Path(out_dir) if out_dir is not None else None
        self.fp = fingerprint
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self.dir / STATE_FILE
        if state.exists():
            old = json.loads(state.read_text())
            if old.get("fingerprint") != fingerprint:
                diff = sorted(k for k in set(old.get("fingerprint", {})) | set(fingerprint)
                              if old.get("fingerprint", {}).get(k) != fingerprint.get(k))
                raise JfigError(f"{self.dir} holds a build with different inputs or options ({diff}); "
                                f"use another --out folder or delete it")
        else:
            _write_json(state, {"fingerprint": fingerprint, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        (self.dir / "blocks").mkdir(exist_ok=True)

    def path(self, name: str) -> Path | None:
        return None if self.dir is None else self.dir / name


def build_graph(model, saes, tokens_or_corpus, *, out_dir=None, seed: int | None = None, progress: bool = True,
                on_block=None, **options):
    """Build the Feature Interaction Graph end to end; returns an InteractionGraph.

    model: a jfig Model; saes: SAEs at several sites; tokens_or_corpus: int tokens [n, seq] or a
    corpus/spec (packed with the model's tokenizer). Options are BuildOptions fields. With
    `out_dir`, results are written as they complete and a rerun resumes (see module docstring);
    the graph is saved to `out_dir/graph`. `on_block(i)` is called after each measured block
    (tests use it to interrupt a build).
    """
    from .atlas import Atlas, build_atlas
    from .candidates import select_candidates
    from .data import tokens_from

    if seed is not None:
        options["seed"] = seed
    opts = BuildOptions.from_dict(options)
    saes = saes_by_site(saes)
    for site, sae in saes.items():
        model.check_site(site)
        w = model.site_width(site)
        if w is not None and w != sae.d_in:
            raise JfigError(f"SAE at {site} has d_in {sae.d_in} but the model's site is {w} wide: "
                            f"the SAEs do not belong to this model")
    t0 = time.time()
    tokens = tokens_from(tokens_or_corpus, model, opts.seq_len, seed=opts.seed,
                         max_tokens=opts.max_sequences * opts.seq_len)[: opts.max_sequences]
    fingerprint = {"options": dataclasses.asdict(opts), "tokens": hashlib.sha256(tokens.tobytes()).hexdigest()[:16],
                   "saes": {s: _sae_fingerprint(x) for s, x in sorted(saes.items())},
                   "model": repr(model.config) if model.config is not None else str(model.sites)}
    run = _Run(out_dir, fingerprint)
    say = print if progress else (lambda *a, **k: None)
    sae_list = [saes[s] for s in sorted(saes, key=lambda s: parse_site(s))]

    stage_t = time.time()

    def stage(name):
        nonlocal stage_t
        say(f"jfig: {name} in {time.time() - stage_t:.0f} s")
        stage_t = time.time()

    # 1. atlas
    apath = run.path("atlas")
    if apath is not None and (apath / "manifest.json").exists():
        atlas = Atlas.load(apath)
        say(f"jfig: atlas loaded from {apath}")
    else:
        atlas = build_atlas(model, sae_list, tokens, window=opts.window, position_window=opts.position_window,
                            batch_size=opts.batch_size, progress=progress, corpus_hash=fingerprint["tokens"])
        if apath is not None:
            atlas.save(apath)
    # 2. candidates
    cpath = run.path("candidates.json")
    imp_tokens = tokens[: opts.importance_sequences] if opts.importance_sequences else tokens
    cands = select_candidates(atlas, sae_list, model=model, tokens=imp_tokens, top_k=opts.top_k,
                              importance=opts.importance,
                              min_coact=opts.min_coact, keep_low_coact=opts.keep_low_coact,
                              min_alignment=opts.min_alignment, window=opts.window,
                              importance_pool=opts.importance_pool, batch_size=opts.batch_size, progress=progress) \
        if cpath is None or not cpath.exists() else None
    if cpath is not None:
        if cands is not None:
            _write_json(cpath, {"pairs": cands.pairs.select(["source_site", "source", "target_site", "target"])
                                .to_pydict(), "report": cands.report.rows})
        saved = json.loads(cpath.read_text())
        pairs, report_rows = saved["pairs"], saved["report"]
    else:
        pairs = cands.pairs.select(["source_site", "source", "target_site", "target"]).to_pydict()
        report_rows = cands.report.rows
    from .candidates import Report
    report = Report(rows=[dict(r) for r in report_rows])
    stage(f"atlas and {len(pairs['source'])} candidate pairs")
    # 3. measure in blocks
    from .measure_blocks import measure_blocks
    blocks = measure_blocks(model, saes, tokens, atlas, pairs, opts, run, progress, on_block)
    stage("measurement")
    # 4. significance + 5. graph
    from .graph.assemble import assemble_graph
    graph = assemble_graph(model, saes, atlas, blocks, opts, report, fingerprint, tokens, progress, run)
    stage("significance, gating and graph")
    gpath = run.path("graph")
    if gpath is not None:
        graph.save(gpath)
    say(f"jfig: graph built in {time.time() - t0:.0f} s")
    return graph
