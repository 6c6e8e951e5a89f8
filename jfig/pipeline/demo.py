"""`jfig demo` and `jfig build`: the end-to-end job on a model, its SAEs and a corpus, and its summary."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax

from ..data import Corpus, default_corpus
from ..graph import InteractionGraph
from ..models.registry import load_model
from ..saes import default_saes, load_sae
from ..saes.defaults import metrics_table
from .build import build_graph
from .config import load_config

log = logging.getLogger(__name__)

# Sized to finish in well under 15 minutes on a 2-core CPU (SAE training included on a first run):
# the 86 most important features at each of the three earlier sites (258 sources) against every
# feature of the next site in the window (targets="all": 528,384 pairs, tested block by block).
# Targets are read before their activation function (read="pre"), so a source can be seen to push an
# inactive target further down: inhibition is observable, and TopK competition inside the target SAE
# does not masquerade as an interaction. Importance uses the first-order (attribution) estimate of the
# ablation effect on a few sequences (reverse mode, all sites at once): exact ablation of every
# candidate costs minutes on a CPU. Gating
# is searched over up to 96 (source, modulator, target) triples: the random-modulator null sets the bar,
# and fewer triples found none on SmolLM2.
DEMO_OPTIONS = dict(seq_len=64, max_sequences=128, top_k=86, targets="all", inputs_per_source=32, block_size=8,
                    null_every=2, read="pre", importance="attribution", importance_sequences=4,
                    gating_max_targets=12, gating_max_pairs=8, batch_size=16)
# On a GPU or TPU the same job affords what a CPU cannot: exact ablation importance over more
# features and sequences, a larger corpus, three times the sources and more inputs per source.
ACCELERATOR_DEMO_OPTIONS = {**DEMO_OPTIONS, "max_sequences": 1024, "top_k": 256, "inputs_per_source": 100,
                            "importance": "loss", "importance_sequences": 32, "importance_pool": 512,
                            "gating_max_targets": 32, "batch_size": 64}


def demo_options(backend: str | None = None) -> dict:
    """The demo's build options for a JAX backend ("cpu", "gpu", "tpu"; default: the current one)."""
    backend = backend or jax.default_backend()
    return dict(DEMO_OPTIONS if backend == "cpu" else ACCELERATOR_DEMO_OPTIONS)


def summarize(graph: InteractionGraph, k: int = 8) -> str:
    """Nodes, edges by kind, the strongest edges with their features' top contexts, the pruning report."""
    lines = [graph.summary(), ""]
    ctx = {(s, f): c for s, f, c in zip(graph.nodes.column("site").to_pylist(),
                                         graph.nodes.column("feature").to_pylist(),
                                         graph.nodes.column("top_contexts").to_pylist())}

    def label(site, f):
        c = json.loads(ctx.get((site, f)) or "[]")
        text = c[0]["text"].replace("\n", "⏎")[-40:] if c else ""
        return f"{site.replace('.hook_resid_post', '')}#{f} «{text}»"

    top = graph.strongest(k)
    if top.num_rows:
        lines.append(f"strongest {top.num_rows} edges (weight = mean effect per unit of source activation):")
        for r in top.to_pylist():
            mod = f" with modulator #{r['modulator']}" if r["kind"] == "gating" else ""
            lines.append(f"  {r['weight']:+.3f} {r['kind']:11s} {label(r['source_site'], r['source'])}{mod}")
            lines.append(f"         -> {label(r['target_site'], r['target'])}  (p={r['p_value']:.1e}, n={r['n']})")
    rep = graph.manifest.get("pruning_report", [])
    if rep:
        lines.append("\npruning (pairs before and after each filter, real counts):")
        for r in rep:
            kept = f"{100 * r['after'] / r['before']:.3g}%" if r["before"] else "-"
            lines.append(f"  {r['step']:62s} {r['before']:>12,d} -> {r['after']:>10,d} ({kept})")
    st = graph.manifest.get("statistics", {})
    if st:
        taus = st.get("tau_by_site_pair") or (st.get("tau", {}) if isinstance(st.get("tau"), dict)
                                               else {"all sites": st.get("tau", 0.0)})
        tau_text = ", ".join(f"{s.replace('.hook_resid_post', '')} {t:.3g}" for s, t in taus.items()) or "none"
        lines.append(f"\n{st.get('n_tested', 0):,} pairs tested; null threshold tau per site pair: {tau_text} "
                     f"(99th percentile of random-direction effects); {st.get('n_gating_tested', 0)} gating triples tested")
        if st.get("n_cannot_inhibit"):
            lines.append(f"{st['n_cannot_inhibit']} tested pairs could not show inhibition (target inactive on every "
                         f"input and read after its activation; read = 'pre' reads its pre-activation)")
    return "\n".join(lines)


def run_demo(out: str = "jfig-demo", *, model_name: str = "smollm2-135m", dtype: str = "float32",
             progress: bool = True, **overrides) -> InteractionGraph:
    """The main job on the offline default model: default SAEs, default corpus, a graph in OUT/graph.
    dtype: the model's parameter dtype ("bfloat16" on an accelerator halves its memory)."""
    t0 = time.time()
    model = load_model(model_name, dtype=dtype)
    log.info("%s (%d layers) loaded in %.0f s", model.config.name or model_name, model.config.n_layers,
             time.time() - t0)
    saes, manifest = default_saes(model, progress=progress)
    log.info("default SAEs:\n%s", metrics_table(manifest))
    opts = {**demo_options(), **overrides}
    log.info("demo options for the %s backend: %s", jax.default_backend(), opts)
    graph = build_graph(model, saes, default_corpus(model), out_dir=Path(out) / "build", progress=progress, **opts)
    graph.save(Path(out) / "graph")
    log.info("demo finished in %.0f s", time.time() - t0)
    return graph


def run_build(config_path, *, progress: bool = True) -> InteractionGraph | None:
    """`jfig build CONFIG.toml`: the graph of the config's model, SAEs and corpus, saved to OUT/graph.
    In a run over several processes (after `jax.distributed.initialize()`) every process measures its
    share and process 0 returns and saves the graph; the others return None."""
    cfg = load_config(config_path)
    model = load_model(cfg["model"], dtype=cfg.get("dtype", "float32"))
    if cfg["saes"] == "default":
        saes, _ = default_saes(model, progress=progress, **cfg.get("default_saes", {}))
    else:
        saes = [load_sae(p) for p in cfg["saes"]]
    corpus = default_corpus(model) if cfg["corpus"] == "default" else Corpus.from_spec(cfg["corpus"])
    out = Path(cfg["out"])
    graph = build_graph(model, saes, corpus, out_dir=out / "build", progress=progress, **cfg.get("options", {}))
    if graph is not None:
        graph.save(out / "graph")
    return graph
