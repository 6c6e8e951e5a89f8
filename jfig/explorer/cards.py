"""What a feature card shows, for the nodes of a graph: top contexts and the activation histogram
(from the atlas), the logit lens of the decoder direction (from the model and the SAE), the token
strings both need.

Arrays are per node, in the order of the node keys given; None where a part is unknown.
"""
from __future__ import annotations

import json

import numpy as np


MAX_BINS = 32


def atlas_cards(atlas, keys, *, max_contexts: int = 8) -> tuple[list, list, list, list[str]]:
    """(contexts, histograms, levels, notes) of the nodes `keys` [(site, feature)] from an Atlas.

    contexts: per node a list of {"tokens": [int] (-1 past either end), "at": index of the activating
    token, "activation"}, strongest first; histograms: {"edges", "counts"} of the non-zero activations
    (the atlas's log-spaced bins, trimmed to the occupied range and merged to at most MAX_BINS);
    levels: the 10th, 50th and 90th percentiles of the non-zero activations (the clamp levels)."""
    contexts, hists, levels = [None] * len(keys), [None] * len(keys), [None] * len(keys)
    quantiles = {s: atlas.alpha_levels(s) for s in {s for s, _ in keys} if s in atlas.sites}
    at = int(atlas.settings["context"][0])
    lo, hi = atlas.settings["hist_range"]
    missing = sorted({s for s, _ in keys if s not in atlas.sites})
    for i, (site, feature) in enumerate(keys):
        if site in missing or not 0 <= feature < atlas.d_sae[site]:
            continue
        st = atlas.stats(site)
        vals, toks = st["ctx_val"][feature], st["ctx_tok"][feature]
        contexts[i] = [{"tokens": t.tolist(), "at": at, "activation": round(float(v), 5)}
                       for v, t in zip(vals[:max_contexts], toks[:max_contexts]) if v > 0]
        q = quantiles[site][feature]
        levels[i] = None if np.isnan(q).any() else [float(f"{v:.5g}") for v in q]
        hists[i] = histogram(st["hist"][feature], float(st["vmin"][feature]), float(st["vmax"][feature]), lo, hi)
    notes = [f"the atlas has no statistics for site(s) {missing}: no contexts or histograms there"] if missing else []
    return contexts, hists, levels, notes


def histogram(counts: np.ndarray, vmin: float, vmax: float, lo: float, hi: float) -> dict | None:
    """{"edges", "counts"} from one feature's atlas histogram [bins + 2] (under- and overflow bins at
    the ends), or None when it never fired."""
    counts = np.asarray(counts, np.int64)
    if counts.sum() == 0:
        return None
    inner = np.geomspace(lo, hi, len(counts) - 1)
    edges = np.concatenate([[min(vmin, lo)], inner, [max(vmax, hi)]])
    nz = np.flatnonzero(counts)
    first, last = int(nz[0]), int(nz[-1])
    c, e = counts[first:last + 1], edges[first:last + 2].copy()
    e[0], e[-1] = max(e[0], vmin), min(e[-1], vmax) if vmax > e[0] else e[-1]
    group = -(-len(c) // MAX_BINS)                      # merge neighbouring bins, `group` at a time
    if group > 1:
        pad = (-len(c)) % group
        c = np.concatenate([c, np.zeros(pad, np.int64)]).reshape(-1, group).sum(1)
        e = np.concatenate([e[:-1:group], [e[-1]]])
    return {"edges": [float(f"{x:.6g}") for x in e], "counts": c.tolist()}


def text_contexts(graph, keys) -> list:
    """Per node the graph's own top contexts ({"text", "activation"}: text only, no token marked)."""
    by_key = {}
    for site, feature, text in zip(graph.nodes["site"].to_pylist(), graph.nodes["feature"].to_pylist(),
                                   graph.nodes["top_contexts"].to_pylist()):
        if text:
            try:
                by_key[(site, feature)] = [{"text": str(c["text"]), "activation": float(c["activation"])}
                                           for c in json.loads(text)]
            except (ValueError, TypeError, KeyError):
                continue
    return [by_key.get(k) for k in keys]



def unembedding(model) -> np.ndarray | None:
    """[d_model, vocab] float32: the final norm's gain times the unembedding (what a direction in the
    final residual stream does to the logits, norm scale aside), or None for a model without
    built-in parameters (one wrapped with Model.from_function)."""
    cfg, params = getattr(model, "config", None), getattr(model, "params", None)
    if cfg is None or not isinstance(params, dict) or "ln_f_w" not in params:
        return None
    w_u = np.asarray(params["unembed"] if "unembed" in params else np.asarray(params["embed"]).T, np.float32)
    gain = np.asarray(params["ln_f_w"], np.float32) + np.float32(cfg.norm_offset)
    return gain[:, None] * w_u


def logit_lens(w_u: np.ndarray, sae, features, *, top: int = 10, chunk: int = 256) -> tuple[list, list]:
    """(promoted, suppressed): per feature the `top` (token id, value) pairs of W_dec[f] @ w_u,
    largest first and smallest first. w_u: [d_model, vocab] (see `unembedding`)."""
    w_dec = np.asarray(sae.W_dec, np.float32)
    features = np.asarray(features, np.int64)
    promoted, suppressed = [], []
    top = min(top, w_u.shape[1])
    for start in range(0, len(features), chunk):
        lens = w_dec[features[start:start + chunk]] @ w_u                       # [k, vocab]
        hi = np.argpartition(-lens, top - 1, axis=1)[:, :top]
        lo = np.argpartition(lens, top - 1, axis=1)[:, :top]
        for row, h, lw in zip(lens, hi, lo):
            h, lw = h[np.argsort(-row[h])], lw[np.argsort(row[lw])]
            promoted.append([[int(t), round(float(row[t]), 4)] for t in h])
            suppressed.append([[int(t), round(float(row[t]), 4)] for t in lw])
    return promoted, suppressed


def token_strings(tokenizer, ids) -> dict[str, str]:
    """{str(id): text} for every token id >= 0 in `ids` (one decode per distinct id)."""
    return {str(i): tokenizer.decode([int(i)]) for i in sorted({int(i) for i in ids if int(i) >= 0})}
