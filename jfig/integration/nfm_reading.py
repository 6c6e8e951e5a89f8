"""Reading a neural factorization machine (:class:`jfig.saes.NFM`): its embedding dimensions from the
weights, the contexts where its interaction term is largest, and what ablating the interaction does to
the model's output.

- :func:`gini` and :func:`dimension_strength`: how concentrated a dimension's embedding column is, and
  how much it can write (scale-free: ``||V[:, k]||^2 * ||W[k]||``, ``W`` the first layer after pooling).
- :func:`read_dimensions`: per dimension, the Gini coefficient of ``|V[:, k]|``, its top features and,
  for each, its partner features (largest ``|V[i, k] V[j, k]|``, the weight of the pair ``f_i f_j`` in
  ``z_k``), strongest dimensions first.
- :func:`interaction_contexts`: token windows of a corpus where the interaction output (or one
  dimension's share of it) is largest.
- :func:`ablate_interaction`: the model with the site replaced by the NFM-corrected reconstruction,
  against the same with the interaction part (or some dimensions of it) zeroed: cross-entropies and the
  KL divergence between the next-token distributions.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jfig.edits import Patch
from jfig.errors import JfigError
from jfig.saes import NFM, SAE
from jfig.saes.nfm_metrics import check_nfm, metric_tokens, next_token_nll, site_parts


def gini(values: Any) -> float:
    """The Gini coefficient of the absolute values of a vector ``[n]``: 0 when all are equal, ``1 - 1/n``
    when one holds everything; NaN for an all-zero vector."""
    v = np.sort(np.abs(np.asarray(values, np.float64)).ravel())
    n, total = v.size, v.sum()
    if n == 0 or total == 0:
        return float("nan")
    return float((2.0 * np.sum(np.arange(1, n + 1) * v) / (n * total)) - (n + 1.0) / n)


def dimension_strength(nfm: NFM) -> np.ndarray:
    """``[K]``: ``||V[:, k]||^2 * ||W[k]||`` with ``W`` the hidden layer (or the output layer without one),
    the size of what dimension k passes on for features of unit size; invariant to rescaling ``V[:, k]``
    by c and ``W[k]`` by 1/c^2, as the NFM's output is."""
    V = np.asarray(nfm.V, np.float64)
    W = np.asarray(nfm.W_hidden if nfm.W_hidden is not None else nfm.W_out, np.float64)
    if nfm.W_hidden is not None:
        W = W.T  # [K, H]: row k is what z_k feeds
    return np.sum(V * V, axis=0) * np.linalg.norm(W, axis=1)


@dataclasses.dataclass(frozen=True)
class DimensionReading:
    """One embedding dimension of an NFM: ``k``, ``strength`` (:func:`dimension_strength`), ``gini`` of
    ``|V[:, k]|``, ``top`` features as ``(feature, V[feature, k])`` by ``|V|``, and ``partners``:
    for each top feature, ``(partner, V[i, k] * V[j, k])`` by absolute product, largest first."""

    k: int
    strength: float
    gini: float
    top: list[tuple[int, float]]
    partners: dict[int, list[tuple[int, float]]]

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, "strength": self.strength, "gini": self.gini,
                "top": [[int(i), float(v)] for i, v in self.top],
                "partners": {str(i): [[int(j), float(w)] for j, w in p] for i, p in self.partners.items()}}


def read_dimensions(nfm: NFM, *, dims: Any = None, top: int = 5, partners: int = 5) -> list[DimensionReading]:
    """A :class:`DimensionReading` per dimension in ``dims`` (default: all, strongest first), each with
    ``top`` features and ``partners`` partners per top feature."""
    V = np.asarray(nfm.V, np.float64)
    strength = dimension_strength(nfm)
    if dims is None:
        dims = np.argsort(-strength, kind="stable")
    dims = [int(k) for k in np.atleast_1d(dims)]
    bad = [k for k in dims if not 0 <= k < nfm.k]
    if bad:
        raise JfigError(f"dimensions {bad} are out of range; the NFM has K={nfm.k} (0..{nfm.k - 1})")
    if top < 1 or partners < 1:
        raise JfigError(f"top and partners must be >= 1, got {top} and {partners}")
    out = []
    for k in dims:
        column = V[:, k]
        order = np.argsort(-np.abs(column), kind="stable")[:top]
        pairs = {}
        for i in order:
            weight = column[i] * column
            weight[i] = 0.0
            best = np.argsort(-np.abs(weight), kind="stable")[:partners]
            pairs[int(i)] = [(int(j), float(weight[j])) for j in best]
        out.append(DimensionReading(k=k, strength=float(strength[k]), gini=gini(column),
                                    top=[(int(i), float(column[i])) for i in order], partners=pairs))
    return out


@eqx.filter_jit
def _interaction_scores(model, sae: SAE, nfm: NFM, tokens: jax.Array, dims: jax.Array | None) -> jax.Array:
    """``[batch, seq, n]``: the interaction output's norm (``dims`` None) or ``|z_k| ||W[k]||`` for each
    of ``dims [n]``."""
    x = model.run(tokens, capture=(sae.site,), stop_at=sae.site, logits=False).cache[sae.site]
    f = sae.encode(x.astype(jnp.float32))
    if dims is None:
        return jnp.linalg.norm(nfm.interaction(f), axis=-1)[..., None]
    W = nfm.W_hidden.T if nfm.W_hidden is not None else nfm.W_out
    return jnp.abs(nfm.pooled(f)[..., dims]) * jnp.linalg.norm(W[dims], axis=-1)


@dataclasses.dataclass(frozen=True)
class Context:
    """A token position where an interaction score is large: ``sequence``, ``position``, ``score`` and
    the token window ``tokens`` (ending at the position, inclusive) with ``text`` when a tokenizer is
    at hand."""

    sequence: int
    position: int
    score: float
    tokens: list[int]
    text: str | None = None


def interaction_contexts(model: Any, sae: SAE, nfm: NFM, tokens: Any, *, dims: Any = None, top: int = 10,
                         window: int = 8, batch_size: int = 16) -> dict[Any, list[Context]]:
    """The ``top`` contexts of int ``tokens [n_seq, seq]`` where the interaction term is largest (position
    0 left out): by the norm of the interaction output (``dims`` None: key ``"interaction"``), or for each
    dimension k of ``dims`` by ``|z_k| ||W[k]||`` (key k). Each context holds the ``window`` tokens up to
    and including the position, decoded with the model's tokenizer when it has one."""
    check_nfm(model, sae, nfm)
    tokens = metric_tokens(model, tokens)
    dim_list = None if dims is None else [int(k) for k in np.atleast_1d(dims)]
    if dim_list is not None and any(not 0 <= k < nfm.k for k in dim_list):
        raise JfigError(f"dimensions {dim_list} must lie in 0..{nfm.k - 1} (the NFM has K={nfm.k})")
    keys = ["interaction"] if dim_list is None else dim_list
    heaps: dict[Any, list] = {key: [] for key in keys}
    n_seq = tokens.shape[0]
    bs = max(1, min(batch_size, n_seq))
    dims_arr = None if dim_list is None else jnp.asarray(dim_list, jnp.int32)
    for start in range(0, n_seq, bs):
        batch = tokens[start:start + bs]
        n = batch.shape[0]
        if n < bs:
            batch = np.concatenate([batch, np.repeat(batch[:1], bs - n, axis=0)])
        scores = np.asarray(_interaction_scores(model, sae, nfm, jnp.asarray(batch, jnp.int32), dims_arr))[:n, 1:]
        for c, key in enumerate(keys):
            s = scores[..., c]
            flat = np.argsort(-s, axis=None, kind="stable")[:top]
            for index in flat:
                row, pos = np.unravel_index(index, s.shape)
                item = (float(s[row, pos]), -(start + int(row)), -(int(pos) + 1))
                if len(heaps[key]) < top:
                    heapq.heappush(heaps[key], item)
                else:
                    heapq.heappushpop(heaps[key], item)
    tokenizer = getattr(model, "tokenizer", None)
    out = {}
    for key, heap in heaps.items():
        contexts = []
        for score, neg_row, neg_pos in sorted(heap, reverse=True):
            row, pos = -neg_row, -neg_pos
            ids = [int(t) for t in tokens[row, max(0, pos - window + 1):pos + 1]]
            text = tokenizer.decode(ids) if tokenizer is not None else None
            contexts.append(Context(sequence=row, position=pos, score=score, tokens=ids, text=text))
        out[key] = contexts
    return out


@eqx.filter_jit
def _ablation_batch(model, sae: SAE, nfm: NFM, mask: jax.Array, tokens: jax.Array, rows: jax.Array):
    site = sae.site
    seq = tokens.shape[1]
    positions = jnp.arange(1, seq)
    clean = model.run(tokens, capture=(site,))
    p = site_parts(sae, nfm, clean.cache[site])
    full = p["base"] + p["lin"] + p["inter"]
    ablated = p["base"] + p["lin"] + nfm.interaction(p["f"], mask)
    logp = {"clean": jax.nn.log_softmax(clean.logits.astype(jnp.float32), axis=-1)}
    nll = {"ce_clean": next_token_nll(clean.logits, tokens, rows)}
    for name, value in (("nfm", full), ("ablated", ablated)):
        logits = model.run(tokens, edits=(Patch(site, value, positions),)).logits
        logp[name] = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll[f"ce_{name}"] = next_token_nll(logits, tokens, rows)
    w = (rows[:, None] & (jnp.arange(seq) >= 1)[None, :]).astype(jnp.float32)

    def kl(p_log, q_log):  # sum over kept positions of KL(p || q)
        return jnp.sum(w * jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1))

    sums = {"kl_nfm_ablated": kl(logp["nfm"], logp["ablated"]), "kl_clean_nfm": kl(logp["clean"], logp["nfm"]),
            "kl_clean_ablated": kl(logp["clean"], logp["ablated"]), "positions": jnp.sum(w)}
    return nll, sums


def ablate_interaction(model: Any, sae: SAE, nfm: NFM, tokens: Any, *, dims: Any = None,
                       batch_size: int = 16) -> dict[str, float]:
    """The effect on the model's output of zeroing the NFM's interaction part at its site (every position
    but 0), on int ``tokens [n_seq, seq]``: ``dims`` None zeroes all of ``z``, else only those dimensions.

    The site is replaced by the NFM-corrected reconstruction (``x_hat + y_hat``; ``y_hat`` for target
    "next") and by the same with the interaction ablated. Returns ``ce_clean``, ``ce_nfm``, ``ce_ablated``
    (mean next-token cross-entropy), ``ce_increase = ce_ablated - ce_nfm``, and mean KL divergences per
    position (nats): ``kl_nfm_ablated`` = KL(p_nfm || p_ablated), ``kl_clean_nfm``, ``kl_clean_ablated``."""
    check_nfm(model, sae, nfm)
    tokens = metric_tokens(model, tokens)
    mask = np.ones((nfm.k,), np.float32)
    if dims is None:
        mask[:] = 0.0
    else:
        dim_list = [int(k) for k in np.atleast_1d(dims)]
        if not dim_list or any(not 0 <= k < nfm.k for k in dim_list):
            raise JfigError(f"dims must be a non-empty list of dimensions in 0..{nfm.k - 1}; got {dims!r}")
        mask[dim_list] = 0.0
    n_seq, seq = tokens.shape
    bs = max(1, min(batch_size, n_seq))
    totals: dict[str, float] = {}
    for start in range(0, n_seq, bs):
        batch = tokens[start:start + bs]
        rows = np.arange(bs) < batch.shape[0]
        if batch.shape[0] < bs:
            batch = np.concatenate([batch, np.repeat(batch[:1], bs - batch.shape[0], axis=0)])
        nll, sums = jax.device_get(_ablation_batch(model, sae, nfm, jnp.asarray(mask), jnp.asarray(batch, jnp.int32),
                                                   jnp.asarray(rows)))
        for key, value in {**nll, **sums}.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    n_pred = n_seq * (seq - 1)
    out = {key: totals[key] / n_pred for key in ("ce_clean", "ce_nfm", "ce_ablated")}
    out["ce_increase"] = out["ce_ablated"] - out["ce_nfm"]
    for key in ("kl_nfm_ablated", "kl_clean_nfm", "kl_clean_ablated"):
        out[key] = totals[key] / max(totals["positions"], 1.0)
    return out
