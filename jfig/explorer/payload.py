"""The explorer's data: a graph (and optionally its atlas, model, SAEs, labels, behaviour circuits and a
second graph to compare with) as one JSON-able dict in the format of docs/explorer_payload.md."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv

from ..errors import JfigError, OptionError
from ..graph import InteractionGraph, NodeIndex, diff_graphs
from ..graph.diff import KEY_COLUMNS
from ..graph.labels import load_labels
from ..sites import site_layer
from .cards import atlas_cards, logit_lens, text_contexts, token_strings, unembedding
from .layout import barycentre_order
from .page import PAYLOAD_FORMAT, PAYLOAD_VERSION

log = logging.getLogger(__name__)
KIND_CODES = {"excitatory": 0, "inhibitory": 1, "gating": 2}
STATUS_CODES = {"same": 0, "gained": 1, "lost": 2, "flipped": 3}
MODES = ("static", "live")


def finite_or_none(v):
    """A float, or None for a missing, NaN or infinite value (JSON has neither)."""
    return None if v is None or not math.isfinite(v) else float(v)


def finite(values) -> list:
    """Floats with None, NaN and infinities as None."""
    return [finite_or_none(v) for v in values]


def check_inputs(graph, atlas, model, saes, mode) -> dict:
    """SAEs by site, after checking every input against the graph (before any work)."""
    if not isinstance(graph, InteractionGraph):
        raise JfigError(f"explorer_payload needs an InteractionGraph (jfig.load_graph(DIR)), got {type(graph).__name__}")
    if mode not in MODES:
        raise OptionError(f"unknown mode {mode!r}; expected one of {MODES}")
    graph_sites = set(graph.nodes["site"].to_pylist())
    widths = {s["site"]: s.get("d_sae") for s in graph.manifest.get("saes", [])}
    by_site = {}
    for sae in ([] if saes is None else list(saes.values()) if isinstance(saes, dict) else list(saes)):
        if widths.get(sae.site) not in (None, sae.d_sae):
            raise JfigError(f"the SAE at {sae.site} has {sae.d_sae} features but the graph was built with "
                            f"{widths[sae.site]} there: pass the SAEs the graph was built with")
        by_site[sae.site] = sae
    cfg = getattr(model, "config", None)
    for sae in by_site.values():
        if cfg is not None and sae.d_in != cfg.d_model:
            raise JfigError(f"the SAE at {sae.site} reads {sae.d_in}-dimensional activations but the model's "
                            f"d_model is {cfg.d_model}: this model does not match the graph's SAEs")
    want = (graph.manifest.get("model") or {})
    if cfg is not None and want.get("d_model") not in (None, cfg.d_model):
        raise JfigError(f"the graph was built on a model with d_model {want['d_model']} ({want.get('name')}), "
                        f"not this one (d_model {cfg.d_model})")
    if atlas is not None and not graph_sites & set(atlas.sites):
        raise JfigError(f"the atlas covers sites {list(atlas.sites)}, none of the graph's {sorted(graph_sites)}")
    return by_site


def node_table(graph, index: NodeIndex, labels) -> dict:
    """The payload's columnar nodes (without y and degree)."""
    keys = index.keys
    rows = {(s, f): r for r, (s, f) in enumerate(zip(graph.nodes["site"].to_pylist(), graph.nodes["feature"].to_pylist()))}
    order = [rows[k] for k in keys]
    rate = np.asarray(finite(graph.nodes["firing_rate"].to_pylist()), object)[order] if keys else []
    label = np.asarray(graph.nodes["label"].to_pylist(), object)[order] if keys else []
    label = [labels.get(k, lab) for k, lab in zip(keys, label)]
    return {"site": index.node_site.tolist(), "feature": index.node_feature.tolist(),
            "firing_rate": list(rate), "label": label}


def edge_columns(edges, index: NodeIndex) -> tuple[dict, list[str], np.ndarray]:
    """(columnar edges sorted by |weight| descending, estimator names, the order applied)."""
    src = index.index_of(edges["source_site"].to_pylist(), edges["source"].to_numpy())
    tgt = index.index_of(edges["target_site"].to_pylist(), edges["target"].to_numpy())
    mod_feat = [-1 if m is None else m for m in edges["modulator"].to_pylist()]
    mod = index.lookup([m or "" for m in edges["modulator_site"].to_pylist()], mod_feat)
    weight = edges["weight"].to_numpy(zero_copy_only=False).astype(np.float64)
    order = np.argsort(-np.abs(weight), kind="stable")
    estimators = sorted(set(edges["estimator"].to_pylist()))
    codes = {"kind": [KIND_CODES[k] for k in edges["kind"].to_pylist()],
             "estimator": [estimators.index(e) for e in edges["estimator"].to_pylist()],
             "n": edges["n"].to_pylist(), "p_value": finite(edges["p_value"].to_pylist()),
             "q_value": finite(edges["q_value"].to_pylist())}
    cols = {"source": src[order].tolist(), "target": tgt[order].tolist(), "weight": finite(weight[order]),
            "modulator": np.asarray(mod, np.int64)[order].tolist(),
            **{name: [values[i] for i in order] for name, values in codes.items()}}
    return cols, estimators, order


def compare_edges(graph, other, names=None) -> tuple[InteractionGraph, dict, dict]:
    """(the union graph to lay out, per-edge extra columns status/weight_b in the union's edge order,
    the compare summary) for graph A = `graph` against B = `other`, named `names` (default: the
    manifests' model names)."""
    diff = diff_graphs(graph, other)
    t = diff.table
    nodes = {}
    for g in (graph, other):
        for row in g.nodes.to_pylist():
            nodes.setdefault((row["site"], row["feature"]), row)
    layer = {r["site"]: r["layer"] for r in nodes.values()}
    n = t.num_rows
    weight_a, weight_b = t["weight_a"].to_pylist(), t["weight_b"].to_pylist()
    kind_a, kind_b = t["kind_a"].to_pylist(), t["kind_b"].to_pylist()
    edges = {
        "source_site": t["source_site"].to_pylist(), "source": t["source"].to_pylist(),
        "target_site": t["target_site"].to_pylist(), "target": t["target"].to_pylist(),
        "kind": [ka if ka is not None else kb for ka, kb in zip(kind_a, kind_b)],
        "weight": [wa if wa is not None else wb for wa, wb in zip(weight_a, weight_b)],
        "p_value": [pa_ if pa_ is not None else pb for pa_, pb in zip(t["p_value_a"].to_pylist(), t["p_value_b"].to_pylist())],
        "p_bonferroni": [None] * n, "q_value": [None] * n, "variance": [None] * n,
        "n": [0] * n, "estimator": ["clamp"] * n, "positions": t["positions"].to_pylist(),
        "source_layer": [layer[s] for s in t["source_site"].to_pylist()],
        "target_layer": [layer[s] for s in t["target_site"].to_pylist()],
        "modulator_site": t["modulator_site"].to_pylist(), "modulator": t["modulator"].to_pylist()}
    # n and estimator of the union rows come from whichever graph holds them
    for g in (other, graph):
        key_rows = {k: r for r, k in enumerate(zip(*(g.edges[c].to_pylist() for c in KEY_COLUMNS)))}
        keys = zip(*(t[c].to_pylist() for c in KEY_COLUMNS))
        g_n, g_est = g.edges["n"].to_pylist(), g.edges["estimator"].to_pylist()
        for i, k in enumerate(keys):
            if k in key_rows:
                edges["n"][i], edges["estimator"][i] = g_n[key_rows[k]], g_est[key_rows[k]]
    saes = {s["site"]: s for g in (other, graph) for s in g.manifest.get("saes", [])}      # A's first
    union = InteractionGraph.from_tables({c: [r[c] for r in nodes.values()] for c in
                                          ("site", "feature", "layer", "firing_rate", "label", "top_contexts")},
                                         edges, {**graph.manifest, "saes": list(saes.values())})
    extra = {"status": [STATUS_CODES[s] for s in t["status"].to_pylist()], "weight_b": finite(weight_b)}
    a, b = names or ((graph.manifest.get("model") or {}).get("name") or "A",
                     (other.manifest.get("model") or {}).get("name") or "B")
    summary = {"a": str(a), "b": str(b), "counts": diff.counts, "notes": diff.notes}
    return union, extra, summary


def circuit_entry(circuit, index: NodeIndex, src: np.ndarray, tgt: np.ndarray, kind: np.ndarray) -> tuple[dict, list[str]]:
    """One payload circuit from a BehaviorCircuit, its as_dict(), or a folder / circuit.json written by
    BehaviorCircuit.write; edges are the subgraph's own when known, else every graph edge inside it."""
    edge_keys, notes = None, []
    if isinstance(circuit, (str, Path)):
        path = Path(circuit)
        file = path / "circuit.json" if path.is_dir() else path
        if not file.is_file():
            raise JfigError(f"{path} holds no circuit.json; expected the folder `jfig behavior` wrote")
        try:
            data = json.loads(file.read_text())
        except ValueError as e:
            raise JfigError(f"{file} is not valid JSON ({e})") from None
        csv_file = file.parent / "subgraph_edges.csv"
        if csv_file.is_file():
            t = pacsv.read_csv(csv_file)
            edge_keys = list(zip(t["source_site"].to_pylist(), t["source"].to_pylist(),
                                 t["target_site"].to_pylist(), t["target"].to_pylist()))
    elif hasattr(circuit, "as_dict"):
        data = circuit.as_dict()
        t = circuit.subgraph.edges
        edge_keys = list(zip(t["source_site"].to_pylist(), t["source"].to_pylist(),
                             t["target_site"].to_pylist(), t["target"].to_pylist()))
    elif isinstance(circuit, dict):
        data = circuit
    else:
        raise JfigError(f"a circuit must be a BehaviorCircuit, its as_dict(), or a folder written by `jfig behavior`; "
                        f"got {type(circuit).__name__}")
    if "subgraph" not in data or "behavior" not in data:
        raise JfigError(f"not a behaviour circuit (no 'behavior' / 'subgraph' fields): {sorted(data)[:8]}")
    members = [(n["site"], int(n["feature"])) for n in data["subgraph"]["nodes"]]
    at = index.lookup([s for s, _ in members], [f for _, f in members]) if members else np.zeros(0, np.int64)
    if (at < 0).any():
        notes.append(f"circuit {data['behavior']}: {int((at < 0).sum())} of its {len(members)} features are not nodes "
                     f"of this graph")
    inside = np.zeros(len(index), bool)
    inside[at[at >= 0]] = True
    if edge_keys is not None:
        keys = index.keys
        wanted = {(a, b, c, d) for a, b, c, d in edge_keys}
        edges = [e for e in range(len(src)) if (*keys[src[e]], *keys[tgt[e]]) in wanted and kind[e] != 2]
    else:
        edges = np.flatnonzero(inside[src] & inside[tgt]).tolist()
    seeds = [(s["site"], int(s["feature"])) for s in data.get("seeds", [])]
    seed_at = index.lookup([s for s, _ in seeds], [f for _, f in seeds]) if seeds else np.zeros(0, np.int64)
    test, only = data.get("circuit_test") or {}, data.get("seeds_only_test") or {}
    numbers = {"size": test.get("size"), "sufficiency": test.get("sufficiency"), "necessity": test.get("necessity"),
               "p (sufficiency vs matched sets)": test.get("p_sufficiency"),
               "p (necessity vs matched sets)": test.get("p_necessity"),
               "matched sets: mean sufficiency": _mean(test.get("random_sufficiency")),
               "matched sets: mean necessity": _mean(test.get("random_necessity")),
               "seeds only: sufficiency": only.get("sufficiency"), "seeds only: necessity": only.get("necessity"),
               "clean logit difference": test.get("clean_metric"),
               "self-containment": (data.get("self_containment") or {}).get("internal_fraction"),
               "self-containment, null mean": (data.get("self_containment") or {}).get("null_mean")}
    base = data.get("baseline") or {}
    summary = (f"{data['behavior']}: {len(members)} features within {data.get('k')} hops of {len(seeds)} seeds. "
               f"The model gets {base.get('accuracy', float('nan')):.0%} of the prompts right "
               f"(logit difference {base.get('logit_diff', float('nan')):.3g}). Sufficiency: share of the "
               f"clean logit difference kept when only the circuit runs; necessity: share lost when it is ablated.")
    return ({"name": str(data["behavior"]), "nodes": np.flatnonzero(inside).tolist(),
             "seeds": seed_at[seed_at >= 0].tolist(), "edges": [int(e) for e in edges],
             "numbers": {k: finite_or_none(v) for k, v in numbers.items() if isinstance(v, (int, float))},
             "summary": summary}, notes)


def _mean(values):
    values = [v for v in values or [] if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def graph_meta(graph) -> dict:
    """Facts for the page's info panel."""
    m = graph.manifest
    model = m.get("model") or {}
    opts = m.get("options") or {}
    meta = {"model": model.get("name"), "nodes": graph.n_nodes, "edges": graph.n_edges,
            **{f"{k} edges": v for k, v in graph.edges_by_kind().items()},
            "SAE sites": ", ".join(s["site"] for s in m.get("saes", [])) or None,
            "method": opts.get("method"), "targets read": opts.get("read"), "positions": opts.get("positions"),
            "correction": opts.get("correction"), "alpha": opts.get("alpha"), "corpus hash": m.get("corpus_hash"),
            "built": m.get("created")}
    return {k: v for k, v in meta.items() if v is not None}


def explorer_payload(graph, *, atlas=None, model=None, saes=None, labels=None, circuits=(), compare=None,
                     compare_names: tuple[str, str] | None = None, title: str | None = None, mode: str = "static", top_logits: int = 10,
                     max_contexts: int = 8) -> dict:
    """The explorer page's data for `graph` (format: docs/explorer_payload.md).

    atlas: the build's Atlas (top contexts with the token marked, activation histograms); model: a
    jfig Model (token strings; with `saes`, the logit lens of each node's decoder direction); saes:
    the graph's SAEs (list or {site: SAE}; those with a Neuronpedia id link each card to its page);
    labels: {(site, feature): text}, a CSV path (columns site,feature,label or feature=SITE#ID,label)
    or a Neuronpedia explanation export (.json, for SAEs with Neuronpedia ids); circuits: BehaviorCircuits or folders written by
    `jfig behavior`; compare: a second InteractionGraph of the same SAEs (edges gained, lost, flipped),
    compare_names: what to call the two graphs (default: their models' names);
    mode: 'static' (a file) or 'live' (served by `jfig serve`, with the steering simulator).
    Every input is checked before any work; what cannot be shown is listed in the payload's notes.
    """
    by_site = check_inputs(graph, atlas, model, saes, mode)
    if top_logits < 1 or max_contexts < 1:
        raise OptionError(f"top_logits and max_contexts must be >= 1, got {top_logits} and {max_contexts}")
    neuronpedia = {sae.meta["neuronpedia_id"]: site for site, sae in by_site.items() if sae.meta.get("neuronpedia_id")}
    labels = load_labels(labels, neuronpedia) if isinstance(labels, (str, Path)) else dict(labels or {})
    notes, extra, summary = [], {}, None
    if compare is not None:
        if not isinstance(compare, InteractionGraph):
            raise JfigError(f"compare= needs an InteractionGraph, got {type(compare).__name__}")
        graph, extra, summary = compare_edges(graph, compare, compare_names)
    index = NodeIndex.from_graph(graph)
    keys = index.keys
    nodes = node_table(graph, index, labels)
    unknown = [k for k in labels if k not in set(keys)]
    if unknown:
        notes.append(f"{len(unknown)} label(s) name features that are not nodes of this graph, e.g. "
                     f"{unknown[0][0]}#{unknown[0][1]}")
    edges, estimators, order = edge_columns(graph.edges, index)
    edges.update({k: np.asarray(v, object)[order].tolist() for k, v in extra.items()})
    src, tgt, kind = (np.asarray(edges[c], np.int64) for c in ("source", "target", "kind"))
    first = kind != 2
    circuit_list = circuit_entries(circuits, index, src, tgt, kind, notes)    # bad circuit input fails here
    nodes["y"] = np.round(barycentre_order(index.node_site, src[first], tgt[first]), 6).tolist()
    mod = np.asarray(edges["modulator"], np.int64)
    nodes["degree"] = (np.bincount(src, minlength=len(index)) + np.bincount(tgt, minlength=len(index))
                       + np.bincount(mod[mod >= 0], minlength=len(index))).tolist()
    cards, vocab = {}, {}
    if atlas is not None:
        cards["contexts"], cards["histogram"], cards["levels"], more = atlas_cards(atlas, keys,
                                                                                  max_contexts=max_contexts)
        notes += more
        if model is None or getattr(model, "tokenizer", None) is None:
            notes.append("no tokenizer (no model given): contexts show token ids")
    elif "top_contexts" in graph.nodes.column_names and graph.nodes["top_contexts"].null_count < graph.n_nodes:
        cards["contexts"] = text_contexts(graph, keys)
        notes.append("no atlas: contexts are the graph's own text snippets (the activating token is not marked) "
                     "and there are no activation histograms")
    else:
        notes.append("no atlas: no contexts and no activation histograms")
    w_u = unembedding(model) if model is not None else None
    if by_site and w_u is not None:
        top, bottom = [None] * len(keys), [None] * len(keys)
        for site, sae in by_site.items():
            rows = np.flatnonzero(np.asarray(index.sites, object)[index.node_site] == site)
            if len(rows):
                p, s = logit_lens(w_u, sae, index.node_feature[rows], top=top_logits)
                for r, a, b in zip(rows.tolist(), p, s):
                    top[r], bottom[r] = a, b
        cards["logit_top"], cards["logit_bottom"] = top, bottom
        missing = sorted(set(index.sites) - set(by_site))
        if missing:
            notes.append(f"no SAE given for site(s) {missing}: no logit lens there")
    else:
        notes.append("no logit lens: it needs the model and the graph's SAEs" if model is None or not by_site
                     else "no logit lens: the model has no built-in unembedding")
    tokenizer = getattr(model, "tokenizer", None) if model is not None else None
    if tokenizer is not None:
        ids = [t for c in cards.get("contexts") or [] if c for x in c if "tokens" in x for t in x["tokens"]]
        ids += [t for col in ("logit_top", "logit_bottom") for c in cards.get(col) or [] if c for t, _ in c]
        vocab = token_strings(tokenizer, ids)
    layers = [site_layer(s, index.sites) for s in index.sites]
    neuronpedia_of = {site: np_id for np_id, site in neuronpedia.items()}
    return {"format": PAYLOAD_FORMAT, "version": PAYLOAD_VERSION,
            "title": title or f"jfig graph: {graph_meta(graph).get('model', 'model')}",
            "mode": mode, "meta": graph_meta(graph), "notes": notes,
            "sites": [{"name": s, "layer": int(layer), "neuronpedia": neuronpedia_of.get(s)}
                      for s, layer in zip(index.sites, layers)],
            "nodes": nodes, "estimators": estimators, "edges": edges, "cards": cards, "vocab": vocab,
            "circuits": circuit_list, "compare": summary}


def circuit_entries(circuits, index, src, tgt, kind, notes) -> list[dict]:
    out = []
    for c in circuits or ():
        entry, more = circuit_entry(c, index, src, tgt, kind)
        out.append(entry)
        notes += more
    return out
