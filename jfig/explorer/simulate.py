"""The steering simulator behind `jfig serve`: clamp one feature on a prompt, and set the cascade the
graph predicts (`predict_cascade`) beside the one the model shows (`observe_cascade`), with the clean
and steered continuations of the prompt."""
from __future__ import annotations

import math

import numpy as np

from ..edits import Clamp
from ..errors import JfigError
from ..graph import NodeIndex
from ..sites import site_key
from ..steering import cascade_nodes, compare_cascade, observe_cascade, predict_cascade

MAX_PROMPT_TOKENS = 256
MAX_NEW_TOKENS = 128


def prompt_tokens(model, prompt: str) -> np.ndarray:
    """int32 [1, s]: BOS (when the tokenizer has one) and the prompt's tokens."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise JfigError("the steering simulator needs a model with a tokenizer")
    if not isinstance(prompt, str) or not prompt.strip():
        raise JfigError("the prompt is empty: give a prompt of at least one token")
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt, add_bos=False)
    if len(ids) < 2:
        raise JfigError(f"the prompt {prompt!r} is one token long: the clamp acts after the first token, so give "
                        f"at least two")
    if len(ids) > MAX_PROMPT_TOKENS:
        raise JfigError(f"the prompt is {len(ids)} tokens long; the simulator takes at most {MAX_PROMPT_TOKENS}")
    return np.asarray([ids], np.int32)


def check_request(graph, saes: dict, site, feature, value, max_new_tokens) -> tuple[str, int, float, int]:
    """The request's (site, feature, value, max_new_tokens), checked against the graph and the SAEs."""
    if not isinstance(site, str) or site not in saes:
        raise JfigError(f"site {site!r} has no SAE here; the graph's SAE sites are {sorted(saes)}")
    if isinstance(feature, bool) or not isinstance(feature, (int, np.integer)):
        raise JfigError(f"feature must be an integer id, got {feature!r}")
    if not 0 <= feature < saes[site].d_sae:
        raise JfigError(f"feature {feature} is out of range for the SAE at {site} with d_sae {saes[site].d_sae}")
    if NodeIndex.from_graph(graph).lookup([site], [feature])[0] < 0:
        raise JfigError(f"{site}#{feature} is not a node of the graph, so the graph predicts nothing for it; "
                        f"pick a feature of the graph")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise JfigError(f"value must be a finite number, got {value!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise JfigError(f"max_new_tokens must be an integer from 0 to {MAX_NEW_TOKENS}, got {max_new_tokens!r}")
    return site, int(feature), float(value), max_new_tokens


def simulate_steering(model, saes, graph, site: str, feature: int, value: float, prompt: str, *,
                      max_new_tokens: int = 16, top: int = 50, unlisted: int = 10) -> dict:
    """Clamp `site#feature` to `value` on every token of `prompt` after the first, and compare.

    observed: mean change over those tokens of every later SAE feature (`observe_cascade`); predicted:
    `predict_cascade` from the same per-token clamp deltas (value − clean activation), through each
    feature's activation (graphs read before it, `read="pre"`) or bounded below by the clean activation.
    Returns the api/steer answer (docs/explorer_payload.md): `rows` are the `top` later graph nodes with
    the largest |predicted| or |observed| change, then up to `unlisted` features outside the graph with
    the largest observed change (node -1); `fit` scores predicted against observed over every later
    graph node; clean and steered greedy continuations (the clamp also acts on the new tokens).
    """
    saes = model.check_saes(saes)
    site, feature, value, max_new_tokens = check_request(graph, saes, site, feature, value, max_new_tokens)
    tokens = prompt_tokens(model, prompt)
    mask = np.ones(tokens.shape, bool)
    mask[:, 0] = False
    clean = observe_cascade(model, saes, (), tokens, positions=mask)
    f_clean = clean.clean[site][..., feature][mask].astype(np.float64)
    observed = observe_cascade(model, saes, Clamp(saes[site], feature, value, positions=mask), tokens, positions=mask)
    nodes = cascade_nodes(graph)
    base, pre, thr = clean.clean_columns(nodes, mask)
    read = (graph.manifest.get("options") or {}).get("read", "post")
    model_kw = dict(pre=pre, threshold=thr) if read == "pre" else dict(baseline=base)
    predicted = predict_cascade(graph, {(site, feature): value - f_clean}, **model_kw)
    start = site_key(site)
    later = [k for k in nodes if site_key(k[0]) > start]
    p = {k: float(np.mean(predicted[k])) if k in predicted else 0.0 for k in later}
    o_all = observed.mean_changes(mask)
    o = {k: o_all.get(k, 0.0) for k in later}
    fit = compare_cascade(p, o)
    index = {k: i for i, k in enumerate(nodes)}
    ranked = sorted(later, key=lambda k: -max(abs(p[k]), abs(o[k])))
    rows = [{"node": index[k], "site": k[0], "feature": k[1], "predicted": p[k], "observed": o[k]}
            for k in ranked[:top] if p[k] or o[k]]
    outside = sorted((k for k in o_all if k not in index and site_key(k[0]) > start), key=lambda k: -abs(o_all[k]))
    rows += [{"node": -1, "site": k[0], "feature": k[1], "predicted": 0.0, "observed": o_all[k]}
             for k in outside[:unlisted]]
    clean_text, steered_text = continuations(model, saes[site], feature, value, tokens, max_new_tokens)
    score = lambda v: None if v is None or not math.isfinite(v) else float(v)  # noqa: E731
    return {"site": site, "feature": feature, "node": index[(site, feature)], "value": value, "prompt": prompt,
            "tokens": int(mask.sum()), "rows": rows,
            "fit": {"r2": score(fit.r2), "r2_linear": score(fit.r2_linear), "spearman": score(fit.spearman),
                    "n": int(fit.n)},
            "clean_text": clean_text, "steered_text": steered_text}


def continuations(model, sae, feature: int, value: float, tokens: np.ndarray, max_new_tokens: int) -> tuple[str, str]:
    """Greedy clean and steered continuations of one prompt [1, s]; the clamp acts on every position but
    the first, new tokens included."""
    if max_new_tokens == 0:
        return "", ""
    width = tokens.shape[1]
    mask = np.ones(width + max_new_tokens, bool)
    mask[0] = False
    clean = model.generate(tokens, max_new_tokens)
    steered = model.generate(tokens, max_new_tokens, edits=(Clamp(sae, feature, value, positions=mask),))
    decode = model.tokenizer.decode
    return decode([int(t) for t in clean[0, width:]]), decode([int(t) for t in steered[0, width:]])
