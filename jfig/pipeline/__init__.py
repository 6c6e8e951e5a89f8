"""The graph build: options, the on-disk run state, the stages, `build_graph`, the TOML config, the
dry run, the demo and the analysis of a saved graph (`jfig demo`, `jfig build CONFIG.toml [--dry-run]`,
`jfig analyze GRAPH_DIR`)."""
from .analysis import find_atlas, run_analysis
from .build import build_graph, sae_fingerprint
from .config import CONFIG_KEYS, load_config
from .crosscoder import crosscoder_graph, crosscoder_matching, decoder_agreement
from .demo import ACCELERATOR_DEMO_OPTIONS, DEMO_OPTIONS, demo_options, run_build, run_demo, summarize
from .dryrun import BuildPlan, Estimate, dry_run, estimate, plan_build
from .options import (AtlasOptions, BuildOptions, CandidateOptions, GatingOptions, MeasureOptions, SignificanceOptions,
                      options_table)
from .state import STATE_FILE, RunState

__all__ = ["ACCELERATOR_DEMO_OPTIONS", "AtlasOptions", "BuildOptions", "BuildPlan", "CONFIG_KEYS", "CandidateOptions",
           "DEMO_OPTIONS", "Estimate", "GatingOptions", "MeasureOptions", "RunState", "STATE_FILE",
           "SignificanceOptions", "build_graph", "crosscoder_graph", "crosscoder_matching", "decoder_agreement", "demo_options", "dry_run", "estimate", "find_atlas", "load_config", "options_table",
           "plan_build", "run_analysis", "run_build", "run_demo", "sae_fingerprint", "summarize"]
