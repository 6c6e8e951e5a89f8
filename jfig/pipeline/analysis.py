"""`jfig analyze GRAPH_DIR --out DIR`: analyse a saved graph and write the report, with the atlas of
its build when it can be found and, given the build's model and SAEs, the hub-ablation test."""
from __future__ import annotations

import logging
from pathlib import Path

from ..analysis import Analysis, analyze, hub_ablation
from ..analysis.analyze import check_options
from ..atlas import Atlas
from ..data import Corpus, default_corpus, tokens_from
from ..errors import JfigError
from ..graph import load_graph
from ..models.registry import load_model
from ..saes import default_saes, load_sae
from .behavior import check_graph_dir
from .config import load_config

log = logging.getLogger(__name__)


def find_atlas(graph_dir: Path) -> Path | None:
    """The atlas a build left beside its graph: GRAPH_DIR/../atlas (build_graph's out_dir) or
    GRAPH_DIR/../build/atlas (`jfig build` and `jfig demo`); None if neither exists."""
    for p in (graph_dir.parent / "atlas", graph_dir.parent / "build" / "atlas"):
        if (p / "manifest.json").exists():
            return p
    return None


def model_and_saes(config: str | None, demo: bool):
    """(model, saes, corpus) from a build config, or the demo's defaults."""
    if config is not None:
        cfg = load_config(config)
        model = load_model(cfg["model"], dtype=cfg.get("dtype", "float32"))
        saes = (default_saes(model, progress=False, **cfg.get("default_saes", {}))[0] if cfg["saes"] == "default"
                else [load_sae(p) for p in cfg["saes"]])
        corpus = default_corpus(model) if cfg["corpus"] == "default" else Corpus.from_spec(cfg["corpus"])
        return model, saes, corpus
    if demo:
        model = load_model("smollm2-135m")
        return model, default_saes(model, progress=False)[0], default_corpus(model)
    return None


def run_analysis(graph_dir, out_dir, *, seed: int = 0, null_samples: int = 20, community_nulls: int | None = 5,
                 atlas: str | None = None, use_atlas: bool = True, config: str | None = None, demo: bool = False,
                 hub_sequences: int = 16, hubs_k: int = 10, matched: int = 5, figures: bool = True) -> Analysis:
    """Load the graph (and atlas), run `analyze`, add the hub-ablation test when `config` (a build
    TOML) or `demo` names the model and SAEs, and write report.md, analysis.json and figures/."""
    check_options(null_samples, community_nulls)      # every option is checked before any work
    if hub_sequences < 1 or hubs_k < 1 or matched < 1:
        raise JfigError(f"hub_sequences, hubs_k and matched must be >= 1, got {hub_sequences}, {hubs_k}, {matched}")
    graph_dir = check_graph_dir(graph_dir)
    if config is not None and demo:
        raise JfigError("give either a build config for the hub test or --hub-test-demo, not both")
    graph = load_graph(graph_dir)
    atlas_path = Path(atlas) if atlas else (find_atlas(graph_dir) if use_atlas else None)
    loaded = Atlas.load(atlas_path) if atlas_path is not None else None
    if loaded is not None:
        log.info("co-activation communities from the atlas at %s", atlas_path)
    hub_test = None
    parts = model_and_saes(config, demo)
    if parts is not None:
        model, saes, corpus = parts
        seq_len = int((graph.manifest.get("statistics") or {}).get("seq_len") or 64)
        tokens = tokens_from(corpus, model, seq_len, seed=seed + 1, max_tokens=hub_sequences * seq_len)
        log.info("hub ablation: %d hubs, %d matched features each, %d sequences of %d tokens", hubs_k, matched,
                 len(tokens), seq_len)
        hub_test = hub_ablation(model, saes, graph, tokens, k=hubs_k, matched=matched)
    result = analyze(graph, seed=seed, null_samples=null_samples, community_nulls=community_nulls, atlas=loaded,
                     hub_test=hub_test, hubs_k=hubs_k)
    result.write(out_dir, figures=figures)
    return result
