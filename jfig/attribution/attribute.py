"""attribution_graph: one prompt's attribution graph from transcoders, as circuit-tracer's `attribute`.

1. Tokens (`prompt_ids`), one clean run capturing every MLP's input and output; each transcoder's
   activations (position 0 zeroed), the error nodes (MLP output minus reconstruction) and the logits.
2. Logit targets: the likeliest next tokens, up to `max_n_logits`, until their probability reaches
   `desired_logit_prob`; each a demeaned unembedding column (W_U[:, v] minus the mean column).
3. Rows: for each logit target, then each active feature (in circuit-tracer's order; with
   `max_feature_nodes`, the most influential first, re-ranked every few batches as it does), one
   backward pass of the linear replacement (`replacement.gradients`, `batch_size` at a time, vmapped).
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
from .influence import partial_influence
from .prompt import prompt_ids
from .replacement import Layout, contract, gradients, mlp_sites, setup

CHUNK = 256          # decoder writes per contraction call


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

    # active features: (layer, position, feature), layer by layer, then position, then feature
    s, L, R, d = len(ids), cfg.n_layers, len(tcs), cfg.d_model
    per = [np.nonzero(np.asarray(a)) for a in acts]
    reader = np.concatenate([np.full(len(p), r, np.int64) for r, (p, _) in enumerate(per)])
    pos = np.concatenate([p for p, _ in per]).astype(np.int64)
    feat = np.concatenate([f for _, f in per]).astype(np.int64)
    values = np.concatenate([np.asarray(a)[p, f] for a, (p, f) in zip(acts, per)]).astype(np.float32)
    layer = np.asarray(layout.readers, np.int64)[reader] if len(reader) else np.zeros(0, np.int64)
    M = len(feat)

    # every decoder write of every active feature: row (layer written * s + position), activation x row
    dec = {(r, k): np.asarray(tcs[r].decoder_rows(k), np.float32) for r, k, _ in layout.writes}
    w_feat, w_row, w_vec = [], [], []
    for r, k, lw in layout.writes:
        on = np.flatnonzero(reader == r)
        w_feat.append(on)
        w_row.append(lw * s + pos[on])
        w_vec.append(values[on, None] * dec[r, k][feat[on]])
    w_feat = np.concatenate(w_feat)
    order = np.argsort(w_feat, kind="stable")
    w_feat, w_row, w_vec = w_feat[order], np.concatenate(w_row)[order], np.concatenate(w_vec)[order]
    starts = np.searchsorted(w_feat, np.arange(M))
    chunks = []
    for a in range(0, len(w_feat), CHUNK):
        rows = np.zeros(CHUNK, np.int32)
        vecs = np.zeros((CHUNK, d), np.float32)
        n = min(CHUNK, len(w_feat) - a)
        rows[:n], vecs[:n] = w_row[a:a + n], w_vec[a:a + n]
        chunks.append((jnp.asarray(rows), jnp.asarray(vecs)))
    enc = [np.asarray(tc.W_enc, np.float32) for tc in tcs]

    def batch_rows(readers, positions, vecs, finals):
        """Adjacency rows [k, M + L*s + s] of k <= batch_size targets."""
        k = len(readers)
        pad = batch_size - k
        args = (np.concatenate([readers, np.full(pad, R)]).astype(np.int32),
                np.concatenate([positions, np.zeros(pad)]).astype(np.int32),
                np.concatenate([vecs, np.zeros((pad, d))]).astype(np.float32),
                np.concatenate([finals, np.zeros((pad, d))]).astype(np.float32))
        g_flat, other = gradients(model.params, tcs, tokens, errors, embeds, *args, cfg=cfg, layout=layout)
        writes = [np.asarray(contract(g_flat, rows, vecs_)) for rows, vecs_ in chunks]
        feature_part = np.zeros((batch_size, M), np.float32)
        if M:
            per_write = np.concatenate(writes, axis=1)[:, :len(w_feat)]
            feature_part = np.add.reduceat(per_write, starts, axis=1)
        return np.concatenate([feature_part, np.asarray(other)], axis=1)[:k]

    n_logits = len(logit_ids)
    logit_offset = M + (L + 1) * s
    n_total = logit_offset + n_logits
    keep = M if max_feature_nodes is None else min(max_feature_nodes, M)
    edges = np.zeros((keep + n_logits, n_total), np.float32)
    row_node = np.zeros(keep + n_logits, np.int64)
    for a in range(0, n_logits, batch_size):
        b = min(a + batch_size, n_logits)
        edges[a:b, :logit_offset] = batch_rows(np.full(b - a, R), np.zeros(b - a), np.zeros((b - a, d)),
                                               logit_vecs[a:b])
        row_node[a:b] = logit_offset + np.arange(a, b)
    st, visited, n_visited = n_logits, np.zeros(M, bool), 0
    while n_visited < keep:
        if keep == M:
            pending = np.arange(M)
        else:
            infl = partial_influence(edges[:st], logit_p, row_node[:st])
            rank = np.argsort(-infl[:M], kind="stable")
            pending = rank[~visited[rank]][:min(update_interval * batch_size, keep - n_visited)]
        for a in range(0, len(pending), batch_size):
            idx = pending[a:a + batch_size]
            vecs = np.stack([enc[reader[i]][:, feat[i]] for i in idx])
            edges[st:st + len(idx), :logit_offset] = batch_rows(reader[idx], pos[idx], vecs, np.zeros((len(idx), d)))
            row_node[st:st + len(idx)] = idx
            visited[idx] = True
            st += len(idx)
            n_visited += len(idx)
    selected = np.flatnonzero(visited)
    if keep < M:
        edges = edges[:, np.concatenate([selected, np.arange(M, n_total)])]
    edges = edges[np.argsort(row_node, kind="stable")]
    n_nodes = edges.shape[1]
    adjacency = np.zeros((n_nodes, n_nodes), np.float32)
    adjacency[:keep] = edges[:keep]
    adjacency[n_nodes - n_logits:] = edges[keep:]

    tok = model.tokenizer
    text = (lambda t: tok.decode([int(t)])) if tok is not None else str
    sites = {l: tc.site for l, tc in zip(layout.readers, tcs)}
    scan = next((tc.meta.get("scan") for tc in tcs if tc.meta.get("scan")), None) or \
        f"{cfg.name or cfg.family}-transcoders"
    return AttributionGraph(
        tokens=ids.astype(np.int64), prompt=tok.decode([int(t) for t in ids]) if tok is not None else
        " ".join(map(str, ids.tolist())), token_strings=tuple(text(t) for t in ids),
        active_features=np.stack([layer, pos, feat], axis=1), activation_values=values,
        selected_features=selected.astype(np.int64), adjacency_matrix=adjacency,
        logit_tokens=logit_ids.astype(np.int64), logit_probabilities=logit_p.astype(np.float32),
        logit_strings=tuple(text(t) for t in logit_ids), n_layers=L, sites=sites, scan=scan, corpus=graph)
