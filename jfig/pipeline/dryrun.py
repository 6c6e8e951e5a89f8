"""`jfig build CONFIG.toml --dry-run`: check every input of a build and estimate its size, doing no work.

The model's config is read (config.json, or a GGUF file's metadata; no weights are loaded), each
SAE's cfg.json gives its site and width (other SAE formats are loaded), corpus paths are checked to
exist and be readable, and the output folder is only looked at. Nothing is written anywhere.

The estimate is an upper bound from the options and shapes alone: candidate pairs before the
importance, co-activation and alignment filters, every candidate source measured, a gating test for
every allowed target. Compute time is a FLOP count divided by an assumed sustained throughput
(ASSUMED_FLOPS); peak memory is memory_budget plus model weights, SAE weights and the atlas.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atlas import MAX_TRACKED
from ..data import Corpus
from ..data.corpus import JSONL_SUFFIXES, PARQUET_SUFFIXES, TEXT_SUFFIXES
from ..errors import JfigError, SiteError
from ..models.config import ModelConfig
from ..models.gguf_loader import config_from_gguf
from ..models.gguf_reader import read_gguf
from ..models.hf_loader import config_from_hf
from ..models.registry import model_path
from ..saes import DefaultSAESettings, load_sae
from ..sites import parse_site, site_key
from .config import load_config
from .options import BuildOptions, format_bytes, option_field
from .state import STATE_FILE

# Sustained FLOP/s assumed for the time estimate: what jfig's clamp sweep reached on a 2-core CPU
# (116 GFLOP/s, docs/benchmarks.md). An accelerator is typically 10-100 times faster.
ASSUMED_FLOPS = 1e11
# Edited runs per (source, input): low and high clamp levels; one tangent for the Jacobian methods.
LEVELS = {"clamp": 2, "ablate": 2, "mean_ablate": 2, "jacobian": 1, "jacobian_direct": 1}
GATING_RUNS = 4                        # the 2 × 2 factorial contrast per (pair, input)
ATLAS_FEATURE_BYTES = 4 * (258 + 64 + 2 * 8 + 8)   # histogram, exact values, top contexts, counters


@dataclass(frozen=True)
class SaeSpec:
    """An SAE of the build as its files describe it."""

    source: str
    site: str
    d_in: int
    d_sae: int


@dataclass
class BuildPlan:
    """What a build would read and write, and every problem found (empty: the build can start)."""

    config_file: Path
    model: str
    model_config: ModelConfig | None
    saes: list[SaeSpec]
    corpus: list[str]
    out: Path
    options: BuildOptions
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Estimate:
    """Upper bounds on a build's work and memory."""

    site_pairs: int
    candidate_pairs: int
    sources: int
    blocks: int
    null_blocks: int
    interventions: int
    null_interventions: int
    gating_interventions: int
    atlas_sequences: int
    importance_passes: int
    flops: float
    stage_flops: dict[str, float]
    seconds: float
    weights_bytes: float
    sae_bytes: float
    atlas_bytes: float
    peak_bytes: float


def count_params(cfg: ModelConfig) -> int:
    """Parameters of a model from its config (embeddings, attention, MLP, norms, unembedding)."""
    d, f, hd = cfg.d_model, cfg.d_mlp, cfg.d_head
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if cfg.qkv_bias else 0) + (d if cfg.o_bias else 0)
    mlp = (3 if cfg.mlp == "gated" else 2) * d * f + ((f + d) if cfg.mlp_bias else 0)
    norms = (4 if cfg.post_norms else 2) * d * (2 if cfg.norm == "layer" else 1)
    embed = cfg.vocab_size * d * (1 if cfg.tied_embeddings else 2)
    pos = cfg.max_seq_len * d if cfg.positional == "learned" else 0
    return cfg.n_layers * (attn + mlp + norms) + embed + pos + d


def site_width(cfg: ModelConfig, site: str) -> int | None:
    """How wide an SAE at `site` must be (heads flattened); None for attention patterns."""
    local = parse_site(site).local
    if local == "mlp.hook_post":
        return cfg.d_mlp
    if local in ("attn.hook_q", "attn.hook_z"):
        return cfg.n_heads * cfg.d_head
    if local in ("attn.hook_k", "attn.hook_v"):
        return cfg.n_kv_heads * cfg.d_head
    return None if local == "attn.hook_pattern" else cfg.d_model


def read_model_config(model: str) -> tuple[ModelConfig, bool, str]:
    """(config, has a tokenizer, description) of a model name, .gguf file or HF folder, reading only
    its config or metadata; JfigError if it cannot be found or read."""
    path = model_path(model)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise JfigError(f"model {path}: the folder has no config.json (expected an HF model folder)")
        try:
            raw = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise JfigError(f"model {cfg_file}: cannot read it as JSON ({e})") from None
        if not any(path.glob("*.safetensors")):
            raise JfigError(f"model {path}: the folder has no *.safetensors weights")
        return config_from_hf(raw, cfg_file), (path / "tokenizer.json").is_file(), f"HF folder {path}"
    g = read_gguf(path)
    return config_from_gguf(g), "tokenizer.ggml.tokens" in g.metadata, f"GGUF file {path}"


def read_sae_spec(path: str) -> SaeSpec:
    """Site and widths of an SAE: from a SAELens cfg.json (weights checked to exist, not read), else by
    loading it (Gemma Scope params.npz). JfigError if missing or unreadable."""
    p = Path(path)
    if not p.exists():
        raise JfigError(f"SAE {path}: no such file or folder")
    folder = p if p.is_dir() else p.parent
    cfg_file = folder / "cfg.json"
    if cfg_file.is_file() and p.suffix != ".npz":
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise JfigError(f"SAE {cfg_file}: cannot read it as JSON ({e})") from None
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
        site = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
        missing = [k for k, v in (("d_in", cfg.get("d_in")), ("d_sae", cfg.get("d_sae")), ("hook_name", site)) if v is None]
        if missing:
            raise JfigError(f"SAE {cfg_file}: cfg.json lacks {', '.join(missing)}")
        weights = p if p.suffix == ".safetensors" else folder / "sae_weights.safetensors"
        if not weights.is_file():
            raise JfigError(f"SAE {path}: no weights file {weights.name} beside its cfg.json")
        return SaeSpec(str(path), str(site), int(cfg["d_in"]), int(cfg["d_sae"]))
    sae = load_sae(p)
    return SaeSpec(str(path), sae.site, int(sae.d_in), int(sae.d_sae))


def site_problem(spec: SaeSpec, cfg: ModelConfig) -> str | None:
    """Why the SAE cannot read the model's site, or None."""
    try:
        site = parse_site(spec.site)
    except SiteError as e:
        return f"SAE {spec.source}: {e}"
    if site.layer >= cfg.n_layers or (spec.site == "hook_pos_embed" and cfg.positional != "learned"):
        return f"SAE {spec.source}: site {spec.site} is not in the model ({cfg.n_layers} layers)"
    width = site_width(cfg, spec.site)
    if width is None:
        return f"SAE {spec.source}: SAEs cannot read {spec.site} (attention patterns are not a token-aligned vector)"
    if spec.d_in != width:
        return f"SAE {spec.source}: d_in {spec.d_in} does not match site {spec.site} width {width}"
    return None


def check_corpus_path(path: str) -> str:
    """A description of a corpus path ('folder x: 4 text files'); JfigError if missing, unreadable or
    of an unknown format."""
    p = Path(path)
    if not p.exists():
        raise JfigError(f"corpus {path}: no such file or folder")
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise JfigError(f"corpus {path}: not readable")
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES]
        if not files:
            raise JfigError(f"corpus {path}: the folder holds no {'/'.join(TEXT_SUFFIXES)} files")
        unreadable = [str(f) for f in files if not os.access(f, os.R_OK)]
        if unreadable:
            raise JfigError(f"corpus {path}: {len(unreadable)} file(s) not readable, e.g. {unreadable[0]}")
        Corpus.from_spec(p)
        return f"folder {path}: {len(files)} text files, {sum(f.stat().st_size for f in files):,} bytes"
    if p.suffix.lower() not in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES:
        raise JfigError(f"corpus {path}: unknown format {p.suffix!r}; expected a folder or one of "
                        f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)}")
    Corpus.from_spec(p)
    return f"file {path}: {p.stat().st_size:,} bytes"


def check_out(out: Path) -> str:
    """What a build would do with its output folder; JfigError if it cannot be written."""
    if out.exists() and not out.is_dir():
        raise JfigError(f"out {out}: exists and is not a folder")
    if (out / "build" / STATE_FILE).exists():
        return f"{out}: holds a build; it resumes if its inputs and options match, else the build refuses it"
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise JfigError(f"out {out}: cannot be written ({parent} is not writable)")
    return f"{out}: {'exists' if out.exists() else 'will be created'}; graph in {out / 'graph'}"


def plan_build(config_path: str | Path) -> BuildPlan:
    """Read the config and check every input (reading configs and metadata only, writing nothing);
    problems are collected in `plan.problems`. A bad config raises at once (load_config)."""
    cfg = load_config(config_path)
    opts = BuildOptions.from_dict(cfg["options"])
    plan = BuildPlan(Path(config_path), cfg["model"], None, [], [], Path(cfg["out"]), opts)
    has_tokenizer = True
    try:
        plan.model_config, has_tokenizer, desc = read_model_config(cfg["model"])
        plan.notes.append(f"model: {desc}")
    except JfigError as e:
        plan.problems.append(str(e))
    if cfg["saes"] == "default":
        try:
            settings = DefaultSAESettings(**cfg["default_saes"])
        except TypeError as e:
            plan.problems.append(f"[default_saes]: {e}")
        else:
            d = plan.model_config.d_model if plan.model_config else 0
            plan.saes = [SaeSpec("default", s, d, settings.d_sae) for s in settings.sites]
            plan.notes.append("saes: default SAEs, read from the cache or trained on first use")
    else:
        for path in cfg["saes"]:
            try:
                plan.saes.append(read_sae_spec(path))
            except JfigError as e:
                plan.problems.append(str(e))
    seen: dict[str, str] = {}
    for spec in plan.saes:
        if spec.site in seen:
            plan.problems.append(f"SAE {spec.source}: a second SAE for site {spec.site} (also {seen[spec.site]})")
        seen[spec.site] = spec.source
        problem = site_problem(spec, plan.model_config) if plan.model_config and spec.source != "default" else None
        if problem:
            plan.problems.append(problem)
    if cfg["corpus"] == "default":
        plan.corpus.append("the offline default corpus (CPython docs and prompt suites)")
    else:
        for path in cfg["corpus"]:
            try:
                plan.corpus.append(check_corpus_path(path))
            except JfigError as e:
                plan.problems.append(str(e))
    if not has_tokenizer:
        plan.problems.append(f"model {cfg['model']}: has no tokenizer (tokenizer.json or GGUF vocabulary), so the "
                             f"corpus cannot be tokenized")
    try:
        plan.notes.append(f"out: {check_out(plan.out)}")
    except JfigError as e:
        plan.problems.append(str(e))
    plan.options = opts.with_inputs_resolved(plan.model_config, [s.d_sae for s in plan.saes], opts.seq_len)
    return plan


def estimate(plan: BuildPlan) -> Estimate:
    """Upper bounds on the build's candidate pairs, edited runs, compute and peak memory."""
    o, cfg = plan.options, plan.model_config
    specs = sorted(plan.saes, key=lambda s: site_key(s.site))
    layer = {s.site: parse_site(s.site).layer for s in specs}
    k = {s.site: min(o.top_k, s.d_sae) for s in specs}
    within = [(a, b) for i, a in enumerate(specs) for b in specs[i:]
              if 0 <= layer[b.site] - layer[a.site] <= o.window]
    cross = [(a, b) for a, b in within if a.site != b.site]
    dense = o.targets == "all"                   # every feature of each later site in the window is a target
    n_pairs = sum(k[a.site] * (b.d_sae if dense else k[b.site]) for a, b in cross)
    sources = sum(k[a.site] for a in specs if any(x is a for x, _ in cross))
    sources = min(sources, o.max_sources) if o.max_sources else sources
    blocks = math.ceil(sources / o.block_size)
    null_blocks = len(range(0, blocks, o.null_every)) if o.null_every else 0
    levels = LEVELS.get(o.method, 2)
    runs = sources * o.inputs_per_source * levels
    null_runs = min(null_blocks * o.block_size, sources) * o.inputs_per_source * levels
    gating_runs = o.gating_max_targets * o.gating_max_pairs * o.inputs_per_source * GATING_RUNS if o.gating.enabled else 0
    n_imp = min(o.importance_sequences or o.max_sequences, o.max_sequences)
    pool = o.importance_pool or 4 * o.top_k
    imp_passes = {"loss": pool * len(specs) * n_imp, "kl": pool * len(specs) * n_imp,
                  "attribution": 3 * n_imp}.get(o.importance, 0)
    flops = weights = 0.0
    stage_flops: dict[str, float] = {}
    if cfg is not None:
        hd_q = cfg.n_heads * cfg.d_head
        per_layer = 2 * (count_params(cfg) - cfg.vocab_size * cfg.d_model * (1 if cfg.tied_embeddings else 2)) \
            / cfg.n_layers + 4 * o.seq_len * hd_q          # per token: weights plus attention scores
        logits = 2 * cfg.d_model * cfg.vocab_size
        last = max(layer.values(), default=cfg.n_layers - 1) + 1
        encode = sum(2 * s.d_in * s.d_sae for s in specs)
        suffix = min(o.window, cfg.n_layers) + 1
        tokens = o.seq_len
        if o.importance in ("loss", "kl"):             # one suffix run, site to logits, per feature and sequence
            imp_flops = sum(pool * n_imp * tokens * (per_layer * (cfg.n_layers - layer[s.site] - 1) + logits)
                            for s in specs)
        else:
            imp_flops = imp_passes * tokens * (per_layer * cfg.n_layers + logits)
        # one clamp read where it is clamped: only that token runs the suffix (after one clean run of
        # the corpus through every layer); otherwise every position does
        sparse = o.clamp_at == "single" and o.positions == "same"
        run_tokens = 1 if sparse else tokens
        clean = o.max_sequences * tokens * per_layer * cfg.n_layers if sparse else 0.0
        stage_flops = {"atlas": o.max_sequences * tokens * (per_layer * last + encode), "importance": imp_flops,
                       "measurement": (runs + null_runs) * run_tokens * (per_layer * suffix + encode) + clean,
                       "gating": gating_runs * run_tokens * (per_layer * suffix + encode)}
        flops = sum(stage_flops.values())
        weights = 4.0 * count_params(cfg)
    sae_bytes = sum(4.0 * (2 * s.d_in * s.d_sae + s.d_sae + s.d_in) for s in specs)
    tracked = {s.site: min(s.d_sae, MAX_TRACKED) for s in specs}
    atlas = sum(ATLAS_FEATURE_BYTES * s.d_sae for s in specs) + sum(8.0 * tracked[a.site] * tracked[b.site]
                                                                    for a, b in within)
    return Estimate(len(cross), n_pairs, sources, blocks, null_blocks, runs, null_runs, gating_runs, o.max_sequences,
                    imp_passes, flops, stage_flops, flops / ASSUMED_FLOPS, weights, sae_bytes, atlas,
                    o.memory_budget + weights + sae_bytes + atlas)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v) if isinstance(v, str) else repr(v)


def format_options(opts: BuildOptions) -> list[str]:
    """The resolved options as TOML tables: shared ones in [options], the rest per stage."""
    lines = []
    for stage, values in opts.by_stage().items():
        lines.append("[options]" if stage == "shared" else f"[options.{stage}]")
        for name, v in values.items():
            if v is None:
                meaning = option_field(None if stage == "shared" else stage, name).metadata["check"].none
                lines.append(f"# {name} not set: {meaning}")
            else:
                extra = f"   # {format_bytes(v)}" if name == "memory_budget" else ""
                lines.append(f"{name} = {toml_value(v)}{extra}")
    return lines


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2g} s"
    return f"{seconds / 60:.3g} min" if seconds < 7200 else f"{seconds / 3600:.3g} h"


def report(plan: BuildPlan, est: Estimate) -> str:
    """The dry run's printout: inputs, resolved options, estimate."""
    o, cfg = plan.options, plan.model_config
    lines = [f"dry run of {plan.config_file}: every check passed; nothing was computed or written", ""]
    if cfg is not None:
        lines.append(f"model   {plan.model}: {cfg.family}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
                     f"{count_params(cfg) / 1e6:.3g}M parameters")
    for s in sorted(plan.saes, key=lambda s: site_key(s.site)):
        lines.append(f"sae     {s.site}: d_in {s.d_in}, d_sae {s.d_sae}  ({s.source})")
    lines += [f"corpus  {c}" for c in plan.corpus]
    lines += [f"note    {n}" for n in plan.notes]
    lines += ["", "resolved options (TOML; flat names in [options] work too):"]
    lines += ["  " + x for x in format_options(o)]
    levels = LEVELS.get(o.method, 2)
    lines += ["", "estimate (upper bounds, before importance / co-activation / alignment pruning):",
              f"  candidate pairs     ≤ {est.candidate_pairs:,}  ({est.site_pairs} site pair(s) within window {o.window} "
              + (f"× top_k sources × every target feature; tested block by block, memory flat)" if o.targets == "all"
                 else f"× top_k² = {o.top_k}², fewer where d_sae < top_k)"),
              f"  sources measured    ≤ {est.sources:,} in {est.blocks} block(s) of {o.block_size}; "
              f"{est.null_blocks} with the random-direction control",
              f"  edited runs         ≤ {est.interventions:,} = sources × {o.inputs_per_source} inputs × {levels} "
              f"level(s) ({o.method}); + {est.null_interventions:,} control; + {est.gating_interventions:,} gating",
              f"  forward passes      atlas {est.atlas_sequences:,} sequences of {o.seq_len} tokens; importance "
              f"({o.importance}) ≤ {est.importance_passes:,} sequence passes",
              f"  compute             ≈ {est.flops:.2g} FLOP ≈ {format_duration(est.seconds)} at an assumed "
              f"{ASSUMED_FLOPS:.0e} FLOP/s (jfig's measured CPU rate on 2 cores; accelerators are 10-100× faster)",
              "                      " + ", ".join(f"{k} {format_duration(v / ASSUMED_FLOPS)}"
                                                    for k, v in est.stage_flops.items()),
              f"  peak memory         ≈ {format_bytes(est.peak_bytes)} = memory_budget {format_bytes(o.memory_budget)} "
              f"+ model weights {format_bytes(est.weights_bytes)} + SAEs {format_bytes(est.sae_bytes)} "
              f"+ atlas {format_bytes(est.atlas_bytes)}"]
    return "\n".join(lines)


def dry_run(config_path: str | Path) -> str:
    """Check a build config's inputs and return the dry-run report; JfigError listing every problem."""
    plan = plan_build(config_path)
    if plan.problems:
        listed = "\n".join(f"  - {p}" for p in plan.problems)
        raise JfigError(f"dry run of {config_path}: {len(plan.problems)} problem(s), the build would fail:\n{listed}")
    return report(plan, estimate(plan))
