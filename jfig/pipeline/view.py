"""`jfig view GRAPH_DIR`, `jfig serve GRAPH_DIR` and `jfig diff A B`: a saved graph, the atlas beside
it, the model and the graph's SAEs (found in jfig's cache by fingerprint) made into the explorer page,
written to one file or served with the steering simulator; and two graphs compared edge by edge."""
from __future__ import annotations

import json
import logging
import os
import sys
import webbrowser
from dataclasses import dataclass
from pathlib import Path

import pyarrow.csv as pacsv

from ..atlas import Atlas
from ..errors import JfigError
from ..data import tokens_from
from ..data.files import atomic_write_json, atomic_write_text
from ..explorer import attribution_json, explorer_payload, render_page
from ..explorer.server import ExplorerServer, make_server
from ..graph import GraphDiff, diff_graphs, load_graph, load_labels
from ..models.registry import load_model
from ..saes import load_sae_ref, match_sae_sets
from ..saes.matching import METHODS
from .analysis import find_atlas
from .behavior import cached_saes_for, check_graph_dir
from .dense import plan_dense
from .stages import plan_sources

log = logging.getLogger(__name__)


@dataclass
class ViewSources:
    """Where the page's parts come from (paths as given on the command line)."""

    graph: str
    model: str | None = "smollm2-135m"          # None: no model (no token strings, no logit lens)
    saes: tuple = ()                            # SAE folders; empty: the graph's SAEs from the cache
    atlas: str | None = None                    # None: the atlas beside the graph, if any
    use_atlas: bool = True
    labels: str | None = None
    behaviors: tuple = ()                       # folders written by `jfig behavior`
    compare: str | None = None
    title: str | None = None


def check_sources(src: ViewSources) -> Path:
    """Every path named is checked before anything loads; the graph folder as a Path."""
    graph_dir = check_graph_dir(src.graph)
    if src.compare is not None:
        check_graph_dir(src.compare)
    if src.labels is not None and not Path(src.labels).is_file():
        raise JfigError(f"labels file {src.labels} does not exist; expected a CSV with columns site,feature,label")
    for b in src.behaviors:
        if not (Path(b) / "circuit.json").is_file() and not (Path(b).is_file() and Path(b).suffix == ".json"):
            raise JfigError(f"{b} holds no circuit.json; expected a folder written by `jfig behavior`")
    if src.atlas is not None and not (Path(src.atlas) / "manifest.json").is_file():
        raise JfigError(f"{src.atlas} is not an atlas folder (no manifest.json)")
    for p in src.saes:
        if not Path(p).exists() and ":" not in str(p):
            raise JfigError(f"SAE {p} is neither an existing path nor RELEASE:SAE_ID")
    return graph_dir


def check_model(model, manifest: dict) -> None:
    """JfigError when `model` is not the model the graph was built on (layers, width)."""
    want, cfg = manifest.get("model") or {}, model.config
    if cfg is None:
        return
    for key, have in (("n_layers", cfg.n_layers), ("d_model", cfg.d_model)):
        if want.get(key) not in (None, have):
            raise JfigError(f"the graph was built on {want.get('name') or 'another model'} ({want.get('n_layers')} "
                            f"layers, d_model {want.get('d_model')}), but the model given has {cfg.n_layers} layers "
                            f"and d_model {cfg.d_model}: pass the graph's model with --model")


def load_parts(src: ViewSources, *, need_saes: bool):
    """(graph, payload keyword arguments, model, saes) for `src`."""
    graph_dir = check_sources(src)
    graph = load_graph(graph_dir)
    compare = load_graph(check_graph_dir(src.compare)) if src.compare is not None else None
    labels = src.labels                 # a Neuronpedia export (.json) needs the SAEs' ids: read with them
    if labels is not None and Path(labels).suffix.lower() != ".json":
        labels = load_labels(labels)    # a CSV is read (and any bad line reported) before the model loads
    atlas_path = Path(src.atlas) if src.atlas else (find_atlas(graph_dir) if src.use_atlas else None)
    atlas = Atlas.load(atlas_path) if atlas_path is not None else None
    if atlas is not None:
        log.info("contexts and histograms from the atlas at %s", atlas_path)
    model = saes = None
    if src.model is not None:
        model = load_model(src.model)
        check_model(model, graph.manifest)
        if src.saes:
            saes = [load_sae_ref(p) for p in src.saes]
        else:
            try:
                saes = cached_saes_for(model, graph.manifest)
            except JfigError as e:
                if need_saes:
                    raise
                log.warning("no logit lens: %s", e)
    elif need_saes:
        raise JfigError("jfig serve needs the graph's model for the steering simulator; pass --model")
    names = (str(graph_dir), str(src.compare)) if compare is not None else None
    kwargs = dict(atlas=atlas, model=model, saes=saes, labels=labels, circuits=list(src.behaviors),
                  compare=compare, compare_names=names, title=src.title)
    return graph, kwargs, model, saes


def can_open_browser() -> bool:
    """Whether a browser window can open here (a desktop session, or macOS / Windows)."""
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def run_view(src: ViewSources, out=None, *, open_page: bool = True) -> Path:
    """Write the explorer page of a graph to `out` (default: explorer.html beside the graph folder)."""
    graph_dir = check_sources(src)
    out = Path(out) if out is not None else graph_dir.resolve().parent / "explorer.html"
    if out.is_dir():
        raise JfigError(f"--out {out} is a folder; give the path of the HTML file to write")
    if not out.parent.exists():
        raise JfigError(f"the folder of --out ({out.parent}) does not exist")
    graph, kwargs, _, _ = load_parts(src, need_saes=False)
    payload = explorer_payload(graph, **kwargs)
    for note in payload["notes"]:
        log.info("note: %s", note)
    atomic_write_text(out, render_page(payload))
    log.info("wrote %s (%.1f MB)", out, out.stat().st_size / 1e6)
    if open_page and can_open_browser():
        webbrowser.open(out.resolve().as_uri())
    return out


def prepare_server(src: ViewSources, *, host: str = "127.0.0.1", port: int = 8050) -> ExplorerServer:
    """The `jfig serve` server for a graph (not yet serving)."""
    if not 0 <= int(port) <= 65535:
        raise JfigError(f"--port must be 0..65535 (0: any free port), got {port}")
    graph, kwargs, model, saes = load_parts(src, need_saes=True)
    payload = explorer_payload(graph, mode="live", **kwargs)
    return make_server(payload, model, saes, graph, host=host, port=port)


@dataclass
class DiffMatch:
    """How `jfig diff --match` matches the two graphs' features (paths as given on the command line)."""

    method: str                                 # "decoder", "activation" or "both"
    saes_a: tuple = ()                          # SAE folders or RELEASE:SAE_ID; empty: graph A's SAEs from the cache
    saes_b: tuple = ()
    model: str = "smollm2-135m"                 # graph A's model (the cache lookup, the activations)
    model_b: str | None = None                  # graph B's model; None: the same
    corpus: str = "default"                     # text the activations are taken on
    n_tokens: int = 8192
    seq_len: int = 64
    min_similarity: float = 0.5


def diff_matching(match: DiffMatch, a, b) -> dict:
    """{site: FeatureMatching} between the SAEs of graphs `a` and `b` (loaded InteractionGraphs)."""
    if match.method not in METHODS:
        raise JfigError(f"--match must be one of {', '.join(METHODS)}, got {match.method!r}")
    if match.n_tokens < 2 or match.seq_len < 2:
        raise JfigError(f"--match-tokens and --seq-len must be >= 2, got {match.n_tokens} and {match.seq_len}")
    models: dict = {}

    def model_of(name):
        if name not in models:
            models[name] = load_model(name)
        return models[name]

    name_b = match.model_b or match.model
    sets = []
    for refs, graph, name, which in ((match.saes_a, a, match.model, "A"), (match.saes_b, b, name_b, "B")):
        if refs:
            sets.append([load_sae_ref(p) for p in refs])
            continue
        model = model_of(name)
        check_model(model, graph.manifest)
        try:
            sets.append(cached_saes_for(model, graph.manifest))
        except JfigError as e:
            raise JfigError(f"graph {which}: {e} (here: --sae-{which.lower()})") from None
    data = {}
    if match.method != "decoder":
        model_a, model_b = model_of(match.model), model_of(name_b)
        tokens = tokens_from(match.corpus, model_a, match.seq_len, max_tokens=match.n_tokens)
        data = dict(model=model_a, model_b=model_b, tokens=tokens)
    matching = match_sae_sets(sets[0], sets[1], method=match.method, min_similarity=match.min_similarity, **data)
    for m in matching.values():
        log.info("%s", m.summary())
    return matching


def measured_sources(graph_dir, graph=None) -> dict[str, list[int]]:
    """{site: source features} the build of a saved graph measured: read from the candidates.json its
    build left beside it (GRAPH_DIR/.. as build_graph's out_dir, or GRAPH_DIR/../build as `jfig build`
    and `jfig demo`), with the graph's max_sources applied as the build applied it."""
    graph_dir = Path(graph_dir)
    found = [p / "candidates.json" for p in (graph_dir.parent, graph_dir.parent / "build")
             if (p / "candidates.json").exists()]
    if not found:
        raise JfigError(f"no candidates.json beside {graph_dir} (looked in {graph_dir.parent} and "
                        f"{graph_dir.parent / 'build'}): the sources its build measured are not known")
    pairs = json.loads(found[0].read_text())["pairs"]
    graph = graph if graph is not None else load_graph(graph_dir)
    cap = graph.manifest.get("options", {}).get("max_sources")
    planned = plan_dense(pairs["dense"], cap) if "dense" in pairs else plan_sources(pairs, cap)
    out: dict[str, list[int]] = {}
    for site, feature, *_ in planned:
        out.setdefault(site, []).append(int(feature))
    return out


def run_diff(a, b, out=None, *, match: DiffMatch | None = None, ratio: float | None = None,
             untested: bool = False) -> GraphDiff:
    """Compare two saved graphs (through a matching of their SAEs' features when `match` is given);
    write the edge table as CSV to `out` when given. untested: count the edges whose source the other
    build never measured (its candidates.json, see measured_sources) as 'untested'."""
    a_dir, b_dir = check_graph_dir(a), check_graph_dir(b)
    if out is not None and not Path(out).resolve().parent.exists():
        raise JfigError(f"the folder of --out ({Path(out).parent}) does not exist")
    if match is not None:
        for p in (*match.saes_a, *match.saes_b):
            if not Path(p).exists() and ":" not in str(p):
                raise JfigError(f"SAE {p} is neither an existing path nor RELEASE:SAE_ID")
    ga, gb = load_graph(a_dir), load_graph(b_dir)
    matching = diff_matching(match, ga, gb) if match is not None else None
    measured = (measured_sources(a_dir, ga), measured_sources(b_dir, gb)) if untested else None
    diff = diff_graphs(ga, gb, matching=matching, ratio=ratio, measured=measured)
    if out is not None:
        tmp = Path(out).with_name(Path(out).name + ".tmp")
        pacsv.write_csv(diff.table, tmp)
        os.replace(tmp, out)
    return diff


def run_export_attribution(src: ViewSources, prompt: str, out, *, n_logits: int = 5) -> dict:
    """Write one prompt's slice of a graph as attribution-graph JSON (circuit-tracer's and Neuronpedia's
    graph viewers) to `out`; returns it."""
    graph_dir = check_sources(src)
    if src.model is None:
        raise JfigError("the attribution-graph export runs the model on the prompt; pass --model")
    if not Path(out).resolve().parent.exists():
        raise JfigError(f"the folder of --out ({Path(out).parent}) does not exist")
    graph = load_graph(graph_dir)
    model = load_model(src.model)
    check_model(model, graph.manifest)
    saes = [load_sae_ref(p) for p in src.saes] if src.saes else cached_saes_for(model, graph.manifest)
    data = attribution_json(model, saes, graph, prompt, slug=Path(out).stem, n_logits=n_logits)
    atomic_write_json(out, data)
    return data


def parse_sources(specs) -> dict[str, str]:
    """{Neuronpedia SAE id: site} from ["gpt2-small/6-res-jb=blocks.6.hook_resid_pre", ...]."""
    out = {}
    for spec in specs:
        np_id, sep, site = str(spec).partition("=")
        if not sep or "/" not in np_id or not site:
            raise JfigError(f"--source {spec!r}: expected NEURONPEDIA_ID=SITE, e.g. gpt2-small/6-res-jb=blocks.6.hook_resid_pre")
        out[np_id.strip()] = site.strip()
    return out


def run_label(graph_dir, labels, out=None, *, sources=()) -> tuple[Path, int]:
    """Write the graph with the labels of `labels` (a CSV, or a Neuronpedia export whose SAEs `sources`
    maps to sites) in its node table, to `out` (default: the graph folder itself, replaced whole);
    returns (folder, number of nodes labelled)."""
    graph_dir = check_graph_dir(graph_dir)
    mapping = parse_sources(sources)
    table = load_labels(labels, mapping)
    graph = load_graph(graph_dir).with_labels(table)
    target = Path(out) if out is not None else graph_dir
    graph.save(target)
    return target, sum(1 for k in zip(graph.nodes["site"].to_pylist(), graph.nodes["feature"].to_pylist()) if k in table)
