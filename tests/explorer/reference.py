"""The steering simulator's answer computed independently: direct clamped and clean runs of the model,
SAE encodings, predict_cascade from the per-token clamp deltas, and greedy generation."""
import numpy as np

import jfig
from jfig.steering import cascade_nodes

LATER = "blocks.2.hook_resid_post"


def reference_steering(tiny, site, feature, value, prompt, max_new_tokens) -> dict:
    """What api/steer should answer for the tiny project (clamp at `site`, read at LATER): per later
    feature observed and predicted mean changes, node indices, R² over the 16 later features, texts."""
    model, graph = tiny["model"], tiny["graph"]
    saes = {s.site: s for s in tiny["saes"]}
    tok = model.tokenizer
    tokens = np.asarray([[tok.bos_id] + tok.encode(prompt, add_bos=False)], np.int32)
    mask = np.ones(tokens.shape, bool)
    mask[:, 0] = False
    encode = lambda s, edits=(): np.asarray(saes[s].encode(model.run(tokens, edits=edits, capture=(s,)).cache[s]))  # noqa: E731
    clean = {s: encode(s) for s in saes}
    edit = jfig.Clamp(saes[site], feature, value, positions=mask)
    observed = (encode(LATER, (edit,)) - clean[LATER])[mask].mean(0)
    nodes = cascade_nodes(graph)
    base = np.stack([clean[s][..., f][mask] for s, f in nodes], axis=1)
    predicted = jfig.predict_cascade(graph, {(site, feature): value - clean[site][..., feature][mask]}, baseline=base)
    pred = {(LATER, f): float(np.mean(predicted[(LATER, f)])) if (LATER, f) in predicted else 0.0 for f in range(16)}
    p = np.asarray([pred[(LATER, f)] for f in range(16)])
    o = observed[:16]
    gen_mask = np.ones(tokens.shape[1] + max_new_tokens, bool)
    gen_mask[0] = False
    width = tokens.shape[1]
    steered = model.generate(tokens, max_new_tokens, edits=(jfig.Clamp(saes[site], feature, value, positions=gen_mask),))
    plain = model.generate(tokens, max_new_tokens)
    return {"tokens": int(mask.sum()), "observed": {(LATER, f): float(observed[f]) for f in range(16)},
            "predicted": pred, "node": {(LATER, f): nodes.index((LATER, f)) for f in range(16)},
            "r2": float(1 - np.sum((o - p) ** 2) / np.sum((o - o.mean()) ** 2)),
            "clean_text": tok.decode([int(t) for t in plain[0, width:]]),
            "steered_text": tok.decode([int(t) for t in steered[0, width:]])}
