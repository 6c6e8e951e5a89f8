"""`jfig demo` and `jfig build`: the end-to-end job on a model, its SAEs and a corpus."""
from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

from .errors import FormatError, JfigError

# Sized to finish in well under 15 minutes on a 2-core CPU (SAE training included on a first run).
# Importance uses the first-order (attribution) estimate here: exact ablation of each candidate
# feature costs a forward pass to the logits per feature and batch, minutes on a CPU.
DEMO_OPTIONS = dict(seq_len=64, max_sequences=128, top_k=12, inputs_per_source=32, block_size=8, null_every=2,
                    importance="attribution", importance_sequences=32, gating_max_targets=3, gating_max_pairs=3,
                    batch_size=16)
CONFIG_KEYS = {"model", "saes", "corpus", "out", "options", "default_saes"}


def summarize(graph, model, k: int = 8) -> str:
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
        lines.append("\npruning (seed 000 §4.6, real counts):")
        for r in rep:
            kept = f"{100 * r['after'] / r['before']:.3g}%" if r["before"] else "-"
            lines.append(f"  {r['step']:62s} {r['before']:>12,d} -> {r['after']:>10,d} ({kept})")
    st = graph.manifest.get("statistics", {})
    if st:
        lines.append(f"\n{st.get('n_tested', 0)} pairs tested; null threshold tau = {st.get('tau', 0):.3g} "
                     f"(99th percentile of random-direction effects); {st.get('n_gating_tested', 0)} gating triples tested")
    return "\n".join(lines)


def run_demo(out: str = "jfig-demo", *, model_name: str = "smollm2-135m", progress: bool = True, **overrides) -> int:
    import jfig
    from .data import default_corpus
    from .saes.defaults import default_saes, metrics_table
    t0 = time.time()
    model = jfig.load_model(model_name)
    print(f"jfig demo: {model.config.name or model_name} ({model.config.n_layers} layers) loaded in "
          f"{time.time() - t0:.0f} s")
    saes, manifest = default_saes(model, progress=progress)
    print(metrics_table(manifest))
    opts = {**DEMO_OPTIONS, **overrides}
    graph = jfig.build_graph(model, saes, default_corpus(model), out_dir=Path(out) / "build", progress=progress,
                             **opts)
    graph.save(Path(out) / "graph")
    print()
    print(summarize(graph, model))
    print(f"\ngraph written to {Path(out) / 'graph'} (nodes.parquet, edges.parquet, manifest.json); "
          f"total {time.time() - t0:.0f} s")
    return 0


def load_config(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FormatError(f"config file {path} does not exist")
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise FormatError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(cfg) - CONFIG_KEYS)
    if unknown:
        raise JfigError(f"{path}: unknown key(s) {unknown}; expected {sorted(CONFIG_KEYS)}")
    if "model" not in cfg:
        raise JfigError(f"{path}: the config needs a 'model' (a name such as \"smollm2-135m\", a .gguf file or an HF folder)")
    base = path.parent

    def resolve(p):
        q = Path(p)
        return str(q if q.is_absolute() or not (base / q).exists() else base / q)

    cfg["model"] = cfg["model"] if not (base / cfg["model"]).exists() else str(base / cfg["model"])
    saes = cfg.get("saes", "default")
    cfg["saes"] = saes if saes == "default" else [resolve(s) for s in ([saes] if isinstance(saes, str) else saes)]
    corpus = cfg.get("corpus", "default")
    cfg["corpus"] = corpus if corpus == "default" else [resolve(c) for c in ([corpus] if isinstance(corpus, str) else corpus)]
    cfg["out"] = str(base / cfg.get("out", "jfig-graph"))
    if not isinstance(cfg.get("options", {}), dict) or not isinstance(cfg.get("default_saes", {}), dict):
        raise JfigError(f"{path}: [options] and [default_saes] must be tables")
    from .pipeline import BuildOptions
    BuildOptions.from_dict(cfg.get("options", {}))   # unknown options fail before any work
    return cfg


def run_build(config_path, *, progress: bool = True) -> int:
    import jfig
    from .data import Corpus, default_corpus
    from .saes.defaults import default_saes
    cfg = load_config(config_path)
    model = jfig.load_model(cfg["model"])
    if cfg["saes"] == "default":
        saes, _ = default_saes(model, progress=progress, **cfg.get("default_saes", {}))
    else:
        saes = [jfig.load_sae(p) for p in cfg["saes"]]
    corpus = default_corpus(model) if cfg["corpus"] == "default" else Corpus.from_spec(cfg["corpus"])
    out = Path(cfg["out"])
    graph = jfig.build_graph(model, saes, corpus, out_dir=out / "build", progress=progress, **cfg.get("options", {}))
    graph.save(out / "graph")
    print(summarize(graph, model))
    print(f"\ngraph written to {out / 'graph'}")
    return 0
