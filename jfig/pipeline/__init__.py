"""The graph build: options, the on-disk run state, the stages, `build_graph`, the TOML config and
the demo (`jfig demo`, `jfig build CONFIG.toml`)."""
from .build import build_graph, sae_fingerprint
from .config import CONFIG_KEYS, load_config
from .demo import DEMO_OPTIONS, run_build, run_demo, summarize
from .options import BuildOptions
from .state import STATE_FILE, RunState

__all__ = ["BuildOptions", "CONFIG_KEYS", "DEMO_OPTIONS", "RunState", "STATE_FILE", "build_graph", "load_config",
           "run_build", "run_demo", "sae_fingerprint", "summarize"]
