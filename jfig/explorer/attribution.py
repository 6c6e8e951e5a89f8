"""One prompt's slice of an interaction graph in the attribution-graph JSON format that circuit-tracer's
local viewer and Neuronpedia's graph viewer read ({metadata, qParams, nodes, links}).

The slice: run the model on the prompt; a graph feature active at a position becomes a feature node
there; a same-position graph edge i -> j whose ends are both active at position p becomes a link of
weight w_ij x f_i(p) (the edge's slope times the source's activation: the change of j the source
accounts for, to first order). Token nodes stand for the prompt's tokens; logit nodes for the top
next-token predictions at the last position, linked from the features active there by their direct
path (activation x decoder direction through the final norm, at that token's norm scale, into the
logit). What the format cannot hold is left out and listed in metadata.info: edges measured at later
positions, gating hyperedges, and feature files (the viewer's feature panels stay empty).
"""
from __future__ import annotations

import numpy as np

from ..attribution import feature_node, graph_file, logit_id, logit_node, token_node
from ..errors import JfigError
from ..graph import NodeIndex
from ..sites import block_site, parse_site
from .cards import unembedding
from .simulate import prompt_tokens


def site_layers(sites) -> tuple[dict[str, int], str | None]:
    """{site: the viewer's layer} and a note: a site's block when every site has its own block, else
    its rank in forward order (the viewer has one feature set per layer)."""
    blocks = [parse_site(s).layer for s in sites]
    if len(set(blocks)) == len(blocks) and min(blocks, default=0) >= 0:
        return dict(zip(sites, blocks)), None
    return ({s: r for r, s in enumerate(sites)},
            "several SAE sites share a block, so layers are the sites' ranks in forward order: "
            + ", ".join(f"{r} = {s}" for r, s in enumerate(sites)))


def final_norm_scale(model, x_last: np.ndarray) -> float:
    """1 / the final norm's scale at one token's final residual x_last [d] (RMS or LayerNorm)."""
    x = np.asarray(x_last, np.float64)
    if model.config.norm == "rms":
        return float(1.0 / np.sqrt(np.mean(x * x) + model.config.norm_eps))
    return float(1.0 / np.sqrt(np.var(x) + model.config.norm_eps))


def attribution_json(model, saes, graph, prompt: str, *, slug: str = "jfig-slice", n_logits: int = 5,
                     min_activation: float = 0.0) -> dict:
    """The attribution-graph JSON of `graph`'s slice on `prompt` (see the module docstring).

    model: a built-in jfig Model with a tokenizer; saes: the graph's SAEs (list or {site: SAE});
    n_logits: logit nodes (the likeliest next tokens); min_activation: feature instances at or below it
    are left out. Raises before running anything for a model without built-in weights or a tokenizer,
    SAEs that are not the graph's, or an empty prompt.
    """
    by_site = model.check_saes(saes)
    index = NodeIndex.from_graph(graph)
    missing = sorted(set(index.sites) - set(by_site))
    if missing:
        raise JfigError(f"the graph has nodes at {missing} but no SAE was given there; pass the graph's SAEs")
    w_u = unembedding(model)
    if w_u is None:
        raise JfigError("the attribution-graph export needs a built-in model (its unembedding), not one wrapped "
                        "with Model.from_function")
    if isinstance(n_logits, bool) or not isinstance(n_logits, int) or n_logits < 1:
        raise JfigError(f"n_logits must be >= 1, got {n_logits}")
    tokens = prompt_tokens(model, prompt)
    last_site = block_site(model.config.n_layers - 1, "hook_resid_post")
    out = model.run(tokens, capture=tuple(by_site) + (last_site,))
    acts = {s: np.asarray(by_site[s].encode(out.cache[s]))[0] for s in index.sites}       # [seq, d_sae]
    seq = tokens.shape[1]
    tok = model.tokenizer
    words = [tok.decode([int(t)]) for t in tokens[0]]
    layers, layer_note = site_layers(index.sites)
    n_layers = len(index.sites) if layer_note else model.config.n_layers

    def fid(site, feature, pos):
        return f"{layers[site]}_{feature}_{pos}"

    nodes, links, used = [], [], set()
    e = graph.edges
    same = np.asarray([p in ("same", "all") for p in e["positions"].to_pylist()]) & \
        np.asarray([k != "gating" for k in e["kind"].to_pylist()])
    src_site, tgt_site = e["source_site"].to_pylist(), e["target_site"].to_pylist()
    src, tgt, weight = (e[c].to_numpy(zero_copy_only=False) for c in ("source", "target", "weight"))
    for r in np.flatnonzero(same):
        a = acts[src_site[r]][:, src[r]]
        b = acts[tgt_site[r]][:, tgt[r]]
        for p in np.flatnonzero((a > min_activation) & (b > min_activation)).tolist():
            s_id, t_id = fid(src_site[r], int(src[r]), p), fid(tgt_site[r], int(tgt[r]), p)
            links.append({"source": s_id, "target": t_id, "weight": float(weight[r] * a[p])})
            used.update([(src_site[r], int(src[r]), p), (tgt_site[r], int(tgt[r]), p)])
    # logits at the last position and the direct path into them
    logits = np.asarray(out.logits[0, -1], np.float64)
    prob = np.exp(logits - logits.max())
    prob /= prob.sum()
    top = np.argsort(-prob)[:n_logits]
    scale = final_norm_scale(model, np.asarray(out.cache[last_site])[0, -1])
    logit_ids = {int(v): logit_id(seq - 1, int(v), n_layers) for v in top}
    last = seq - 1
    for site in index.sites:
        feats = index.node_feature[np.asarray(index.sites, object)[index.node_site] == site]
        on = feats[acts[site][last, feats] > min_activation]
        if not len(on):
            continue
        direct = (np.asarray(by_site[site].W_dec, np.float32)[on] @ w_u[:, top]) * scale     # [k, n_logits]
        for f, row in zip(on.tolist(), direct):
            a = float(acts[site][last, f])
            for v, w in zip(top.tolist(), row.tolist()):
                links.append({"source": fid(site, f, last), "target": logit_ids[int(v)], "weight": a * w})
            used.add((site, f, last))
    labels = {(s, f): lab for s, f, lab in zip(*(graph.nodes[c].to_pylist() for c in ("site", "feature", "label")))
              if lab}
    for site, f, p in sorted(used, key=lambda u: (layers[u[0]], u[2], u[1])):
        nodes.append(feature_node(layers[site], f, p, activation=float(acts[site][p, f]),
                                  clerp=labels.get((site, f)) or f"{site}#{f}"))
    nodes += [token_node(p, int(tokens[0, p])) for p in range(seq)]
    nodes += [logit_node(last, v, tok.decode([v]), n_layers, prob=float(prob[v]), target=rank == 0)
              for rank, v in enumerate(top.tolist())]
    left_out = [f"{int((~same).sum())} graph edges measured at later positions or gating hyperedges "
                f"(the format links one position to one position)"] if (~same).any() else []
    info = {"creator": "jfig", "source": "a corpus-wide interaction graph sliced to one prompt",
            "link weights": "edge slope x source activation; into logits: activation x direct path",
            "sites": {str(layers[s]): s for s in index.sites}, "left out": left_out + ([layer_note] if layer_note else [])}
    model_name = (graph.manifest.get("model") or {}).get("name") or "model"
    return graph_file(slug=slug, scan=f"jfig-{model_name}", prompt_tokens=words, prompt=prompt, nodes=nodes,
                      links=links, info=info)
