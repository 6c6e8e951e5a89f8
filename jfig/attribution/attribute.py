"""attribution_graph: one prompt's attribution graph from transcoders, as circuit-tracer's `attribute`.

1. Tokens (`prompt_ids`), one clean run capturing every MLP's input and output; each transcoder's
   activations (position 0 zeroed), the error nodes (MLP output minus reconstruction) and the logits.
2. Logit targets: the likeliest next tokens, up to `max_n_logits`, until their probability reaches
   `desired_logit_prob`; each a demeaned unembedding column (W_U[:, v] minus the mean column).
3. Rows (`rows.adjacency`): for each logit target, then each active feature (in circuit-tracer's
   order; with `max_feature_nodes`, the most influential first, re-ranked every few batches as it
   does), one backward pass of the linear replacement (`replacement.gradients`, `batch_size` at a
   time, vmapped).
4. The adjacency in circuit-tracer's layout (`AttributionGraph`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import JfigError, OptionError
from ..graph import InteractionGraph, NodeIndex
from ..saes import SAE, Transcoder
from ..sites import parse_site
from .graph import AttributionGraph
from .prompt import prompt_ids
from .replacement import Layout, mlp_sites, setup
from .rows import RowMaker, active_features, adjacency


def check_dictionaries(model, dictionaries) -> tuple[tuple, Layout]:
    """The transcoders in reader order (input norms attached) and their Layout; JfigError for a model
    without built-in weights, or dictionaries that do not replace this model's MLPs."""
    if getattr(model, "config", None) is None:
        raise JfigError("attribution graphs need a built-in model (its MLPs, norms and unembedding), not one wrapped "
                        "with Model.from_function")
    cfg = model.config
    items = [dictionaries] if isinstance(dictionaries, (Transcoder, SAE)) else (
        list(dictionaries.values()) if isinstance(dictionaries, dict) else list(dictionaries or ()))
    if not items:
        raise JfigError("no transcoders given: pass the transcoders replacing the model's MLPs "
                        "(jfig.load_transcoders)")
    by_layer = {}
    for tc in items:
        if isinstance(tc, SAE):
            raise JfigError(f"an SAE at {tc.site} was given; attribution graphs replace each MLP with a transcoder "
                            f"(reading the MLP's input, writing hook_mlp_out): load them with jfig.load_transcoders")
        if not isinstance(tc, Transcoder):
            raise JfigError(f"expected jfig Transcoders, got {type(tc).__name__}")
        read = parse_site(tc.site)
        layer = read.layer
        if read.local != "hook_resid_mid" or not 0 <= layer < cfg.n_layers:
            raise JfigError(f"transcoder {tc.read_site} -> {tc.write_site}: attribution graphs need transcoders that "
                            f"read an MLP's input (hook_resid_mid, ln2.hook_normalized or mlp.hook_in) of one of the "
                            f"model's {cfg.n_layers} layers")
        want = tuple(f"blocks.{j}.hook_mlp_out" for j in range(layer, layer + len(tc.out_sites)))
        if tc.out_sites != want or layer + len(want) > cfg.n_layers:
            raise JfigError(f"transcoder reading {tc.read_site} writes {list(tc.out_sites)}; attribution graphs need "
                            f"it to write its own layer's MLP output (hook_mlp_out or mlp.hook_out), and a "
                            f"cross-layer transcoder each later layer's, within the model's {cfg.n_layers} layers")
        if tc.d_in != cfg.d_model or tc.d_out != cfg.d_model:
            raise JfigError(f"transcoder reading {tc.read_site} maps {tc.d_in} -> {tc.d_out}; this model's residual "
                            f"stream is {cfg.d_model} wide")
        if layer in by_layer:
            raise JfigError(f"two transcoders read layer {layer}'s MLP input; give one per layer")
        by_layer[layer] = tc.with_input_norm(model) if tc.input_norm == "unset" else tc
    readers = tuple(sorted(by_layer))
    tcs = tuple(by_layer[l] for l in readers)
    skips = tuple(r for r, tc in enumerate(tcs) if tc.W_skip is not None)
    writes = tuple((r, k, readers[r] + k) for r, tc in enumerate(tcs) for k in range(len(tc.out_sites)))
    return tcs, Layout(cfg.n_layers, readers, skips, writes)


def check_options(max_n_logits, desired_logit_prob, max_feature_nodes, batch_size, update_interval) -> None:
    def positive_int(name, v, allow_zero=False):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if allow_zero else 1):
            raise OptionError(f"{name} must be an int >= {0 if allow_zero else 1}, got {v!r}", name)
    positive_int("max_n_logits", max_n_logits)
    positive_int("batch_size", batch_size)
    positive_int("update_interval", update_interval)
    if max_feature_nodes is not None:
        positive_int("max_feature_nodes", max_feature_nodes, allow_zero=True)
    if isinstance(desired_logit_prob, bool) or not isinstance(desired_logit_prob, (int, float)) or \
            not 0.0 < desired_logit_prob <= 1.0:
        raise OptionError(f"desired_logit_prob must be in (0, 1], got {desired_logit_prob!r}", "desired_logit_prob")


def logit_targets(logits, w_u, max_n_logits: int, desired_logit_prob: float):
    """(token ids [k], probabilities [k], demeaned unembedding columns [k, d]) of the likeliest tokens:
    the top `max_n_logits`, cut after the first whose cumulative probability reaches `desired_logit_prob`."""
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32)))
    top = np.argsort(-probs, kind="stable")[:max_n_logits]
    cut = int(np.searchsorted(np.cumsum(probs[top]), desired_logit_prob)) + 1
    top = top[:cut]
    w_u = np.asarray(w_u, np.float32)
    return top, probs[top], (w_u[:, top] - w_u.mean(axis=1, keepdims=True)).T


def attribution_graph(model, dictionaries, prompt, *, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
                      max_feature_nodes: int | None = None, batch_size: int = 512, update_interval: int = 4,
                      graph: InteractionGraph | None = None) -> AttributionGraph:
    """The attribution graph of `prompt` through `dictionaries`, as circuit-tracer's `attribute`.

    model: a built-in jfig Model; dictionaries: transcoders replacing its MLPs (per-layer, or a
    cross-layer transcoder's list; a layer without one is carried whole by its error nodes); prompt:
    text, or token ids [s] (a special token goes in front unless the first id is one, as
    circuit-tracer does). max_n_logits / desired_logit_prob: the logit targets; max_feature_nodes:
    keep only this many features (the most influential, found as circuit-tracer does, `batch_size`
    rows at a time, re-ranked every `update_interval` batches); graph: a corpus-wide InteractionGraph
    over the same transcoders' features (node site = `Transcoder.site`) to link to (`links()`).
    Inputs are checked before anything runs.
    """
    tcs, layout = check_dictionaries(model, dictionaries)
    check_options(max_n_logits, desired_logit_prob, max_feature_nodes, batch_size, update_interval)
    if graph is not None:
        if not isinstance(graph, InteractionGraph):
            raise JfigError(f"graph must be a jfig InteractionGraph, got {type(graph).__name__}")
        sites = {tc.site for tc in tcs}
        if graph.n_nodes and not sites & set(NodeIndex.from_graph(graph).sites):
            raise JfigError(f"the graph's nodes are at {list(NodeIndex.from_graph(graph).sites)}; the transcoders "
                            f"read {sorted(sites)}: link a graph built over the same transcoders")
    cfg = model.config
    ids = prompt_ids(model, prompt)
    tokens = model.check_tokens(ids[None])
    out = model.run(tokens, capture=mlp_sites(cfg.n_layers))
    acts, errors, embeds = setup(tcs, out.cache, layout=layout)
    w_u = model.params["unembed"] if "unembed" in model.params else model.params["embed"].T
    logit_ids, logit_p, logit_vecs = logit_targets(out.logits[0, -1], w_u, max_n_logits, desired_logit_prob)

    active = active_features(acts, layout)
    rows = RowMaker(model, tcs, layout, tokens, errors, embeds, active, batch_size)
    keep = len(active.feature) if max_feature_nodes is None else min(max_feature_nodes, len(active.feature))
    adj, selected = adjacency(rows, logit_vecs, logit_p, keep, update_interval)

    tok = model.tokenizer
    text = (lambda t: tok.decode([int(t)])) if tok is not None else str
    sites = {l: tc.site for l, tc in zip(layout.readers, tcs)}
    scan = next((tc.meta.get("scan") for tc in tcs if tc.meta.get("scan")), None) or \
        f"{cfg.name or cfg.family}-transcoders"
    return AttributionGraph(
        tokens=ids.astype(np.int64), prompt=tok.decode([int(t) for t in ids]) if tok is not None else
        " ".join(map(str, ids.tolist())), token_strings=tuple(text(t) for t in ids),
        active_features=np.stack([active.layer, active.pos, active.feature], axis=1),
        activation_values=active.value, selected_features=selected.astype(np.int64), adjacency_matrix=adj,
        logit_tokens=logit_ids.astype(np.int64), logit_probabilities=logit_p.astype(np.float32),
        logit_strings=tuple(text(t) for t in logit_ids), n_layers=cfg.n_layers, sites=sites, scan=scan, corpus=graph)
