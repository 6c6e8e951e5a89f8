"""The adjacency rows of one prompt: active features, batches of backward passes, and the order in which
circuit-tracer visits features.

Shapes: M active features, s positions, L layers, d d_model; a row has M + L*s + s source columns
(features, error nodes, token nodes) before the logit columns.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from .influence import partial_influence
from .replacement import Layout, contract, gradients

CHUNK = 256          # decoder writes per contraction call (a fixed shape: no retracing between prompts)


class Active(NamedTuple):
    """The M active features in circuit-tracer's order (layer, then position, then feature)."""

    reader: np.ndarray     # [M] index of the feature's transcoder in the layout's readers
    layer: np.ndarray      # [M]
    pos: np.ndarray        # [M]
    feature: np.ndarray    # [M]
    value: np.ndarray      # [M] float32 activation


def active_features(acts, layout: Layout) -> Active:
    """The nonzero entries of each reader's activations [s, d_tc], layer by layer."""
    per = [np.nonzero(np.asarray(a)) for a in acts]
    reader = np.concatenate([np.full(len(p), r, np.int64) for r, (p, _) in enumerate(per)])
    return Active(reader, np.asarray(layout.readers, np.int64)[reader],
                  np.concatenate([p for p, _ in per]).astype(np.int64),
                  np.concatenate([f for _, f in per]).astype(np.int64),
                  np.concatenate([np.asarray(a)[p, f] for a, (p, f) in zip(acts, per)]).astype(np.float32))


class RowMaker:
    """Adjacency rows of up to `batch_size` targets at a time, for one prompt (`tokens` [1, s]) whose
    clean run gave the error and token vectors `errors` [L, s, d] and `embeds` [s, d]."""

    def __init__(self, model, tcs, layout: Layout, tokens, errors, embeds, active: Active, batch_size: int):
        self.model, self.tcs, self.layout, self.tokens = model, tcs, layout, tokens
        self.errors, self.embeds, self.active, self.batch_size = errors, embeds, active, batch_size
        s, d = tokens.shape[1], model.config.d_model
        self.n_features, self.d = len(active.feature), d
        # every decoder write of every active feature: row (layer written * s + position), activation x row
        w_feat, w_row, w_vec = [], [], []
        for r, k, written in layout.writes:
            on = np.flatnonzero(active.reader == r)
            rows = np.asarray(tcs[r].decoder_rows(k), np.float32)
            w_feat.append(on)
            w_row.append(written * s + active.pos[on])
            w_vec.append(active.value[on, None] * rows[active.feature[on]])
        w_feat = np.concatenate(w_feat)
        order = np.argsort(w_feat, kind="stable")
        w_row, w_vec = np.concatenate(w_row)[order], np.concatenate(w_vec)[order]
        self.n_writes = len(w_feat)
        self.starts = np.searchsorted(w_feat[order], np.arange(self.n_features))
        self.chunks = []
        for a in range(0, self.n_writes, CHUNK):
            n = min(CHUNK, self.n_writes - a)
            rows, vecs = np.zeros(CHUNK, np.int32), np.zeros((CHUNK, d), np.float32)
            rows[:n], vecs[:n] = w_row[a:a + n], w_vec[a:a + n]
            self.chunks.append((jnp.asarray(rows), jnp.asarray(vecs)))
        self.encoders = [np.asarray(tc.W_enc, np.float32) for tc in tcs]

    def __call__(self, readers, positions, vecs, finals) -> np.ndarray:
        """Rows [k, M + L*s + s] of k <= batch_size targets: reader index (len(readers) for none),
        position and encoder vector [k, d], and a final-norm direction [k, d]."""
        k, pad, d = len(readers), self.batch_size - len(readers), self.d
        none = len(self.layout.readers)
        args = (np.concatenate([readers, np.full(pad, none)]).astype(np.int32),
                np.concatenate([positions, np.zeros(pad)]).astype(np.int32),
                np.concatenate([vecs, np.zeros((pad, d))]).astype(np.float32),
                np.concatenate([finals, np.zeros((pad, d))]).astype(np.float32))
        g_flat, other = gradients(self.model.params, self.tcs, self.tokens, self.errors, self.embeds, *args,
                                  cfg=self.model.config, layout=self.layout)
        features = np.zeros((self.batch_size, self.n_features), np.float32)
        if self.n_features:
            per_write = np.concatenate([np.asarray(contract(g_flat, r, v)) for r, v in self.chunks], axis=1)
            features = np.add.reduceat(per_write[:, :self.n_writes], self.starts, axis=1)
        return np.concatenate([features, np.asarray(other)], axis=1)[:k]

    def logit_rows(self, vecs) -> np.ndarray:
        k = len(vecs)
        return self(np.full(k, len(self.layout.readers)), np.zeros(k), np.zeros((k, self.d)), vecs)

    def feature_rows(self, idx) -> np.ndarray:
        a = self.active
        vecs = np.stack([self.encoders[a.reader[i]][:, a.feature[i]] for i in idx])
        return self(a.reader[idx], a.pos[idx], vecs, np.zeros((len(idx), self.d)))


def adjacency(rows: RowMaker, logit_vecs, logit_p, keep: int, update_interval: int) -> tuple[np.ndarray, np.ndarray]:
    """(adjacency [n, n] float32, selected feature indices) as circuit-tracer's `attribute` builds them:
    logit rows, then feature rows (all, or the `keep` most influential, re-ranked by partial influence
    every `update_interval` batches), then the square matrix in node order."""
    M, B = rows.n_features, rows.batch_size
    n_logits = len(logit_vecs)
    offset = M + rows.errors.shape[0] * rows.errors.shape[1] + rows.embeds.shape[0]
    edges = np.zeros((keep + n_logits, offset + n_logits), np.float32)
    row_node = np.zeros(keep + n_logits, np.int64)
    for a in range(0, n_logits, B):
        b = min(a + B, n_logits)
        edges[a:b, :offset] = rows.logit_rows(logit_vecs[a:b])
        row_node[a:b] = offset + np.arange(a, b)
    st, visited = n_logits, np.zeros(M, bool)
    while st - n_logits < keep:
        if keep == M:
            pending = np.arange(M)
        else:
            infl = partial_influence(edges[:st], logit_p, row_node[:st])
            rank = np.argsort(-infl[:M], kind="stable")
            pending = rank[~visited[rank]][:min(update_interval * B, keep - (st - n_logits))]
        for a in range(0, len(pending), B):
            idx = pending[a:a + B]
            edges[st:st + len(idx), :offset] = rows.feature_rows(idx)
            row_node[st:st + len(idx)] = idx
            visited[idx] = True
            st += len(idx)
    selected = np.flatnonzero(visited)
    if keep < M:
        edges = edges[:, np.concatenate([selected, np.arange(M, edges.shape[1])])]
    order = np.argsort(row_node, kind="stable")
    n = edges.shape[1]
    out = np.zeros((n, n), np.float32)
    np.take(edges, order[:keep], axis=0, out=out[:keep])
    np.take(edges, order[keep:], axis=0, out=out[n - n_logits:])
    return out, selected
