"""The attribution-graph JSON that circuit-tracer's local viewer and Neuronpedia's graph viewer load:
{metadata, qParams, nodes, links}, with node ids and fields as circuit-tracer writes them.

Node ids: feature "{layer}_{feature}_{pos}", error "0_{layer}_{pos}", token "E_{token}_{pos}", logit
"{n_layers + 1}_{token}_{pos}". A link is {"source": id, "target": id, "weight": w}.
"""
from __future__ import annotations


def cantor(layer: int, feature: int) -> int:
    """The viewer's feature number for (layer, feature): (l+f)(l+f+1)/2 + f."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def node(node_id: str, feature: int, layer: str, pos: int, feature_type: str, js_id: str, *, clerp: str = "",
         influence=None, activation=None, token_prob: float = 0.0, target_logit: bool = False) -> dict:
    """One node with every field the viewers read, in their order."""
    return {"node_id": node_id, "feature": int(feature), "layer": layer, "ctx_idx": int(pos),
            "feature_type": feature_type, "token_prob": float(token_prob), "is_target_logit": bool(target_logit),
            "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js_id, "clerp": clerp,
            "influence": None if influence is None else float(influence),
            "activation": None if activation is None else float(activation)}


def feature_node(layer: int, feature: int, pos: int, *, activation=None, influence=None, clerp: str = "") -> dict:
    return node(f"{layer}_{feature}_{pos}", cantor(layer, feature), str(layer), pos, "cross layer transcoder",
                f"{layer}_{feature}-0", clerp=clerp, influence=influence, activation=activation)


def error_node(layer: int, pos: int, *, influence=None) -> dict:
    return node(f"0_{layer}_{pos}", -1, str(layer), pos, "mlp reconstruction error", f"{layer}_{pos}-0",
                influence=influence)


def token_node(pos: int, token: int, *, influence=None) -> dict:
    return node(f"E_{token}_{pos}", pos, "E", pos, "embedding", f"E_{token}-{pos}", influence=influence)


def logit_node(pos: int, token: int, text: str, n_layers: int, *, prob: float, target: bool) -> dict:
    return node(logit_id(pos, token, n_layers), token, str(n_layers + 1), pos, "logit", f"L_{token}-{pos}",
                clerp=f'Output "{text}" (p={prob:.3f})', token_prob=prob, target_logit=target)


def logit_id(pos: int, token: int, n_layers: int) -> str:
    return f"{n_layers + 1}_{token}_{pos}"


def graph_file(*, slug: str, scan: str, prompt_tokens, prompt: str, nodes, links, node_threshold=None,
               info: dict | None = None) -> dict:
    """The whole file: metadata, the viewer's default query parameters, nodes and links."""
    meta = {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": list(prompt_tokens),
            "prompt": prompt, "node_threshold": node_threshold, "schema_version": 1}
    if info is not None:
        meta["info"] = info
    return {"metadata": meta,
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": list(nodes), "links": list(links)}
