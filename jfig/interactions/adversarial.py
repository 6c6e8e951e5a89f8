"""Adversarial pairs: feature pairs that rarely fire together on text but interact strongly when they do,
inputs found by search that make them fire together, and what their co-occurrence does to the output.

1. Ranking (`adversarial_pairs`). For each first-order edge (source i -> target j, causal weight w) of a
   graph's edge table, with the atlas's co-activation count C (tokens where both fire at one position),
   its N counted tokens and firing counts n_i, n_j:

       P̂(co) = (C + 1/2) / (N + 1)                 (add-half smoothing: finite when C = 0)
       score = |w| · (−log P̂(co))
       expected = n_i · n_j / N                    (the count independence predicts)
       ratio = (C + 1/2) / (expected + 1/2)        (< 1: rarer together than independence predicts)

   Rows sorted by score, largest first; `max_ratio` keeps only rows with ratio <= max_ratio.

2. Search (`search_pair`). Greedy token substitution guided by gradients (HotFlip / GCG): maximise the
   soft minimum of the two features' margins at one position p of each sequence,

       m_f = (pre_f − θ_f) / s_f,     objective = −τ · log(exp(−m_a/τ) + exp(−m_b/τ))  (<= min(m_a, m_b))

   with pre_f the SAE pre-activation at p, θ_f what it must exceed to be active (0 for ReLU, the
   threshold for JumpReLU / BatchTopK, for TopK the k-th largest of the other pre-activations, floored at
   0) and s_f a scale (the feature's typical activation). m_a > 0 and m_b > 0 <=> both fire. Each step:
   the gradient g [S, d] of the objective w.r.t. the embedding residual (a `Steer` at `hook_embed`, at
   zero), the linear score of putting token v at position t, (E[v] − E[x_t]) · g_t (E the embedding
   rows times the model's embedding scale), its top_k tokens per editable position, n_candidates
   single-token swaps drawn from them (the best-scoring swap always, the rest uniformly), the exact
   objective of the current sequence and every swap in one batched forward, and the best kept (the
   current one on ties), so the objective never decreases. One compiled step serves every iteration.

3. Output effect (`output_effects`). Log-probabilities of the next token at p under four runs: clean,
   feature a ablated at p, b ablated at p, both ablated at p (`Ablate` edits at the SAE sites, so the
   SAE error stays). KL(clean || ablated) for each, and the non-additivity ||Δ_ab − Δ_a − Δ_b|| of the
   log-probability changes Δ = logp_ablated − logp_clean (0 when the two features' effects add).
"""
from __future__ import annotations

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from ..edits import Ablate, Steer
from ..errors import JfigError, ShapeError
from ..sites import site_key
from .rank import pair_frequency

FIRST_ORDER = ("excitatory", "inhibitory")
EDGE_COLUMNS = ("source_site", "source", "target_site", "target", "weight", "kind")
ADVERSARIAL_SCHEMA = pa.schema([
    ("source_site", pa.string()), ("source", pa.int64()), ("target_site", pa.string()), ("target", pa.int64()),
    ("kind", pa.string()), ("weight", pa.float64()),
    ("count", pa.int64()),            # C: tokens where both fire (the atlas's co-activation count)
    ("expected", pa.float64()),       # n_i n_j / N under independence
    ("n_tokens", pa.int64()),         # N
    ("rate_source", pa.float64()), ("rate_target", pa.float64()),   # n_i / N, n_j / N
    ("p_co", pa.float64()),           # (C + 1/2) / (N + 1)
    ("ratio", pa.float64()),          # (C + 1/2) / (expected + 1/2)
    ("score", pa.float64()),          # |weight| · −log p_co
    ("rank", pa.int64()),             # 1 = highest score
])


def _column(table, name) -> np.ndarray:
    col = table[name]
    return np.asarray(col.to_numpy(zero_copy_only=False) if hasattr(col, "to_numpy") else col)


def adversarial_pairs(atlas, edges, *, kinds=FIRST_ORDER, max_ratio: float | None = None, min_firing: int = 1,
                      top: int | None = None) -> pa.Table:
    """ADVERSARIAL_SCHEMA rows: the edges of `edges` (a pyarrow table with columns source_site, source,
    target_site, target, weight, kind, e.g. `InteractionGraph.edges`; or an object with `.edges`) of the
    given `kinds` whose two features the atlas tracks at a site pair it counts, scored by |weight| ×
    −log P̂(co-occurrence) (module docstring), highest first. Edges the atlas holds no count for are left
    out. max_ratio: keep rows with (C + ½) / (expected + ½) <= max_ratio; min_firing: both features fire
    on at least this many atlas tokens; top: keep the first `top` rows."""
    edges = getattr(edges, "edges", edges)
    names = list(edges.column_names if hasattr(edges, "column_names") else edges)
    missing = [c for c in EDGE_COLUMNS if c not in names]
    if missing:
        raise JfigError(f"the edge table lacks column(s) {missing}; expected {list(EDGE_COLUMNS)} (a graph's edges)")
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not kinds:
        raise JfigError("kinds is empty; expected edge kinds such as ('excitatory', 'inhibitory')")
    if max_ratio is not None and not max_ratio > 0:
        raise JfigError(f"max_ratio must be > 0 (or None for no filter), got {max_ratio}")
    if top is not None and top < 1:
        raise JfigError(f"top must be >= 1 (or None for every row), got {top}")
    if atlas.n_tokens < 1:
        raise JfigError("the atlas counted no tokens; build it on a corpus first")
    kind = _column(edges, "kind").astype(str)
    keep = np.isin(kind, kinds)
    w = _column(edges, "weight").astype(np.float64)
    keep &= np.isfinite(w)
    ss, sf = _column(edges, "source_site").astype(object)[keep], _column(edges, "source").astype(np.int64)[keep]
    ts, tf = _column(edges, "target_site").astype(object)[keep], _column(edges, "target").astype(np.int64)[keep]
    kind, w = kind[keep], w[keep]
    N = int(atlas.n_tokens)
    count = np.rint(pair_frequency(atlas, ss, sf, ts, tf) * N)           # NaN where the atlas has no count
    n_i, n_j = (_firing(atlas, s, f) for s, f in ((ss, sf), (ts, tf)))
    ok = np.isfinite(count) & (n_i >= min_firing) & (n_j >= min_firing)
    expected = n_i * n_j / N
    p_co = (count + 0.5) / (N + 1.0)
    ratio = (count + 0.5) / (expected + 0.5)
    if max_ratio is not None:
        ok &= ratio <= max_ratio
    score = np.abs(w) * -np.log(p_co)
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((tf[idx], ts[idx].astype(str), sf[idx], ss[idx].astype(str), -np.abs(w[idx]),
                            -score[idx]))]
    if top is not None:
        order = order[:top]
    cols = dict(source_site=ss[order].astype(str), source=sf[order], target_site=ts[order].astype(str),
                target=tf[order], kind=kind[order], weight=w[order], count=count[order].astype(np.int64),
                expected=expected[order], n_tokens=np.full(len(order), N, np.int64), rate_source=n_i[order] / N,
                rate_target=n_j[order] / N, p_co=p_co[order], ratio=ratio[order], score=score[order],
                rank=np.arange(1, len(order) + 1))
    return pa.Table.from_pydict(cols, schema=ADVERSARIAL_SCHEMA)


def _firing(atlas, sites, features) -> np.ndarray:
    """[n] firing counts of (site, feature); NaN where the atlas lacks the site or the feature."""
    out = np.full(len(features), np.nan)
    for s in set(map(str, sites)):
        if s not in atlas.sites:
            continue
        rows = np.flatnonzero(sites == s)
        f = features[rows]
        good = (f >= 0) & (f < atlas.d_sae[s])
        out[rows[good]] = np.asarray(atlas.firing_count(s), np.float64)[f[good]]
    return out


# ---------------------------------------------------------------------------------------------- search


def special_token_ids(tokenizer) -> np.ndarray:
    """int64 ids a substitution must never write: BOS / EOS / PAD / UNK and the tokenizer's special added
    tokens (read from its `tokenizers` backend when it has one)."""
    ids = {getattr(tokenizer, a, None) for a in ("bos_id", "eos_id", "pad_id", "unk_id")}
    backend = getattr(tokenizer, "backend", None)
    added = getattr(backend, "get_added_tokens_decoder", None)
    if added is not None:
        ids |= {int(i) for i, t in added().items() if getattr(t, "special", False)}
    return np.asarray(sorted(i for i in ids if i is not None), np.int64)


def feature_margins(sae, pre, feature):
    """pre [n, d_sae] pre-activations, feature [] int -> [n] margin pre_f − θ_f, > 0 exactly where the
    feature fires (θ: module docstring; ties at the TopK boundary aside)."""
    p = jnp.take(pre, feature, axis=-1)
    if sae.architecture == "relu":
        return p
    if sae.architecture in ("jumprelu", "batchtopk"):
        return p - jnp.maximum(jnp.take(sae.threshold, feature), 0.0)
    top = jax.lax.top_k(pre, sae.k + 1)[0]                          # [n, k + 1]
    inside = p >= top[..., sae.k - 1]
    kth_other = jnp.where(inside, top[..., sae.k], top[..., sae.k - 1])
    return p - jnp.maximum(kth_other, 0.0)


def pair_margins(model, sae_a, feature_a, sae_b, feature_b, tokens, positions, delta=None):
    """(margins [n, 2], activations [n, 2]) of features a and b at position positions[r] of each row of
    tokens [n, S]; delta [n, S, d] is added to the embedding residual (`Steer` at hook_embed) when given.
    The run stops at the later SAE site (no logits)."""
    sites = tuple(dict.fromkeys(sorted((sae_a.site, sae_b.site), key=site_key)))
    edits = () if delta is None else (Steer("hook_embed", delta),)
    cache = model.run(tokens, edits=edits, capture=sites, stop_at=sites[-1], logits=False).cache
    rows = jnp.arange(tokens.shape[0])
    out_m, out_f = [], []
    for sae, f in ((sae_a, feature_a), (sae_b, feature_b)):
        x = cache[sae.site][rows, positions]                         # [n, d_in] (or [n, heads, d_head])
        pre = sae.pre_activations(x).reshape(tokens.shape[0], -1)
        out_m.append(feature_margins(sae, pre, f))
        out_f.append(jnp.take(sae.activation(pre), f, axis=-1))
    return jnp.stack(out_m, -1), jnp.stack(out_f, -1)


def pair_objective(margins, scales, temperature):
    """margins [n, 2], scales [2], temperature [] -> [n]: −τ log Σ exp(−m/(s τ)), a soft minimum of
    m_a/s_a and m_b/s_b (never above the smaller)."""
    m = margins / scales
    return -temperature * jax.nn.logsumexp(-m / temperature, axis=-1)


def embedding_matrix(model):
    """[V, d] the rows `hook_embed` sees for each token: the embedding times the model's embedding scale."""
    return model.params["embed"] * model.config.embed_scale


def linear_scores(model, tokens, grad):
    """tokens [n, S], grad [n, S, d] of an objective w.r.t. the embedding residual -> [n, S, V]: the
    first-order change of the objective when token v replaces tokens[r, t], (E[v] − E[tokens[r, t]]) · g."""
    E = embedding_matrix(model)
    full = jnp.einsum("nsd,vd->nsv", grad, E.astype(grad.dtype))
    return full - jnp.take_along_axis(full, tokens[..., None].astype(jnp.int32), axis=-1)


def _objective_and_grad(model, sae_a, fa, sae_b, fb, tokens, positions, scales, temperature):
    d = model.config.d_model
    delta0 = jnp.zeros(tokens.shape + (d,), model.params["embed"].dtype)

    def total(delta):
        m, f = pair_margins(model, sae_a, fa, sae_b, fb, tokens, positions, delta)
        obj = pair_objective(m, scales, temperature)
        return obj.sum(), (obj, m, f)

    (_, aux), g = jax.value_and_grad(total, has_aux=True)(delta0)
    return aux, g


def _search_step(model, sae_a, fa, sae_b, fb, tokens, positions, editable, vocab_ok, scales, temperature, key,
                 top_k, n_candidates):
    """One greedy step on tokens [n, S]: (new tokens, objective [n], margins [n, 2], activations [n, 2],
    objective of the input tokens [n])."""
    n, S = tokens.shape
    _, grad = _objective_and_grad(model, sae_a, fa, sae_b, fb, tokens, positions, scales, temperature)
    score = linear_scores(model, tokens, grad)                                        # [n, S, V]
    V = score.shape[-1]
    current = jax.nn.one_hot(tokens, V, dtype=bool)
    allowed = editable[..., None] & vocab_ok[None, None, :V] & ~current
    score = jnp.where(allowed, score, -jnp.inf)
    val, tok = jax.lax.top_k(score, top_k)                                            # [n, S, k]
    val, tok = val.reshape(n, S * top_k), tok.reshape(n, S * top_k)
    pos = jnp.broadcast_to(jnp.arange(S)[:, None], (S, top_k)).reshape(-1)
    valid = jnp.isfinite(val)
    best = jnp.argmax(val, axis=-1)
    pick = jnp.where(valid, jax.random.gumbel(key, val.shape), -jnp.inf)
    pick = pick.at[jnp.arange(n), best].set(jnp.inf)                                  # the best swap always
    _, chosen = jax.lax.top_k(pick, n_candidates)                                      # [n, C]
    c_pos = pos[chosen]
    c_tok = jnp.take_along_axis(tok, chosen, axis=-1)
    c_ok = jnp.take_along_axis(valid, chosen, axis=-1)
    old = jnp.take_along_axis(tokens, c_pos, axis=-1)
    c_tok = jnp.where(c_ok, c_tok, old)                                               # no valid swap: a no-op
    cand = jnp.broadcast_to(tokens[:, None, :], (n, n_candidates, S))
    cand = cand.at[jnp.arange(n)[:, None], jnp.arange(n_candidates)[None, :], c_pos].set(c_tok)
    cand = jnp.concatenate([tokens[:, None, :], cand], axis=1)                        # [n, C + 1, S]; 0: current
    flat = cand.reshape(n * (n_candidates + 1), S)
    m, f = pair_margins(model, sae_a, fa, sae_b, fb, flat, jnp.repeat(positions, n_candidates + 1))
    obj = pair_objective(m, scales, temperature).reshape(n, n_candidates + 1)
    win = jnp.argmax(obj, axis=-1)                                                    # the first best: 0 on ties
    rows = jnp.arange(n)
    m, f = m.reshape(n, n_candidates + 1, 2)[rows, win], f.reshape(n, n_candidates + 1, 2)[rows, win]
    return cand[rows, win], obj[rows, win], m, f, obj[:, 0]


search_step = eqx.filter_jit(_search_step)


@dataclass
class SearchResult:
    """What `search_pair` found, per starting sequence r (row).

    tokens_before / tokens_after: int32 [n, S]; positions: [n] the position p the pair is read at;
    objective: [steps + 1, n] (row 0: the start; never decreasing); margins_before / margins_after [n, 2]
    (pre_f − θ_f, module docstring); acts_before / acts_after [n, 2] the SAE activations at p; success [n]:
    both features fire at p after the search; swaps [n]: positions changed.
    """

    tokens_before: np.ndarray
    tokens_after: np.ndarray
    positions: np.ndarray
    objective: np.ndarray
    margins_before: np.ndarray
    margins_after: np.ndarray
    acts_before: np.ndarray
    acts_after: np.ndarray

    @property
    def success(self) -> np.ndarray:
        return (self.acts_after > 0).all(axis=1)

    @property
    def success_before(self) -> np.ndarray:
        return (self.acts_before > 0).all(axis=1)

    @property
    def swaps(self) -> np.ndarray:
        return (self.tokens_before != self.tokens_after).sum(axis=1)


def _check_search(model, sae_a, feature_a, sae_b, feature_b, tokens, positions, steps, top_k, n_candidates,
                  temperature, scales):
    if model.config is None or "hook_embed" not in model.sites:
        raise JfigError("search_pair differentiates through the token embedding: it needs a built-in model "
                        "(GPT-2, Llama, Gemma-2) with a hook_embed site, not a wrapped function")
    for sae, f, name in ((sae_a, feature_a, "feature_a"), (sae_b, feature_b, "feature_b")):
        model.check_site(sae.site)
        if not (isinstance(f, (int, np.integer)) and 0 <= int(f) < sae.d_sae):
            raise JfigError(f"{name} must be an int in [0, {sae.d_sae}) (the SAE at {sae.site}), got {f!r}")
    if sae_a.site == sae_b.site and int(feature_a) == int(feature_b):
        raise JfigError(f"feature_a and feature_b are the same feature ({sae_a.site}#{feature_a}); a pair needs two")
    tokens = np.asarray(model.check_tokens(tokens))
    n, S = tokens.shape
    pos = np.broadcast_to(np.asarray(positions), (n,)).astype(np.int64)
    pos = np.where(pos < 0, pos + S, pos)
    if (pos < 0).any() or (pos >= S).any():
        raise ShapeError(f"positions must lie in [-{S}, {S}) for sequences of length {S}, got {np.asarray(positions)}")
    for name, v, lo in (("steps", steps, 1), ("top_k", top_k, 1), ("n_candidates", n_candidates, 1)):
        if not isinstance(v, (int, np.integer)) or v < lo:
            raise JfigError(f"{name} must be an int >= {lo}, got {v!r}")
    if not temperature > 0:
        raise JfigError(f"temperature must be > 0, got {temperature}")
    sc = np.broadcast_to(np.asarray(scales, np.float64), (2,))
    if not (np.isfinite(sc).all() and (sc > 0).all()):
        raise JfigError(f"scales must be two finite numbers > 0, got {np.asarray(scales).tolist()}")
    return tokens, pos, sc


def search_pair(model, sae_a, feature_a: int, sae_b, feature_b: int, tokens, positions=-1, *, steps: int = 20,
                top_k: int = 8, n_candidates: int = 16, temperature: float = 0.5, scales=(1.0, 1.0),
                exclude_tokens=(), frozen=None, seed: int = 0) -> SearchResult:
    """Greedy gradient-guided token substitution (module docstring) making feature_a (SAE sae_a) and
    feature_b (sae_b) fire together at position positions[r] of each row of tokens [n, S] (int or [n];
    negative counts from the end). Positions after p do not change the pair at p and are left alone, as are
    position 0 when it holds an excluded token (the sequence-start token), and `frozen` (bool [S] or [n, S]).
    exclude_tokens: ids never written (special tokens: `special_token_ids`); ids at or past the tokenizer's
    vocabulary are never written either. steps: iterations of one compiled step; top_k: tokens kept per
    position by linear score; n_candidates: swaps evaluated exactly per row and step; scales [2]: margin
    units (e.g. each feature's median activation); temperature: of the soft minimum; seed: the draws."""
    tokens, pos, sc = _check_search(model, sae_a, feature_a, sae_b, feature_b, tokens, positions, steps, top_k,
                                    n_candidates, temperature, scales)
    n, S = tokens.shape
    V = int(model.params["embed"].shape[0])
    vocab_ok = np.ones(V, bool)
    tok_vocab = getattr(model.tokenizer, "vocab_size", None)
    if tok_vocab is not None:
        vocab_ok[int(tok_vocab):] = False
    excl = np.asarray(exclude_tokens, np.int64).reshape(-1)
    vocab_ok[excl[(excl >= 0) & (excl < V)]] = False
    editable = np.arange(S)[None, :] <= pos[:, None]
    editable[:, 0] &= ~np.isin(tokens[:, 0], excl)
    if frozen is not None:
        fr = np.asarray(frozen, bool)
        if fr.shape not in ((S,), (n, S)):
            raise ShapeError(f"frozen must be bool [{S}] or [{n}, {S}], got shape {fr.shape}")
        editable &= ~np.broadcast_to(fr, (n, S))
    top_k = int(min(top_k, int(vocab_ok.sum())))
    n_candidates = int(min(n_candidates, S * top_k))
    dtype = model.params["embed"].dtype
    args = dict(sae_a=sae_a, fa=jnp.asarray(feature_a, jnp.int32), sae_b=sae_b, fb=jnp.asarray(feature_b, jnp.int32),
                positions=jnp.asarray(pos, jnp.int32), editable=jnp.asarray(editable), vocab_ok=jnp.asarray(vocab_ok),
                scales=jnp.asarray(sc, dtype), temperature=jnp.asarray(temperature, dtype))
    keys = jax.random.split(jax.random.PRNGKey(seed), steps)
    cur = jnp.asarray(tokens, jnp.int32)
    traj = []
    m_before = f_before = None
    for s in range(steps):
        cur, obj, m, f, obj_in = search_step(model, tokens=cur, key=keys[s], top_k=top_k, n_candidates=n_candidates,
                                             **args)
        if s == 0:
            traj.append(np.asarray(obj_in))
            m_before, f_before = _start_values(model, args, tokens)
        traj.append(np.asarray(obj))
    obj_all = np.stack(traj)
    if not np.isfinite(obj_all).all():
        raise JfigError(f"the pair objective of {sae_a.site}#{feature_a}, {sae_b.site}#{feature_b} is not finite "
                        f"(NaN or inf in the SAE pre-activations)")
    return SearchResult(tokens_before=tokens, tokens_after=np.asarray(cur), positions=pos, objective=obj_all,
                        margins_before=m_before, margins_after=np.asarray(m), acts_before=f_before,
                        acts_after=np.asarray(f))


def _evaluate(model, sae_a, fa, sae_b, fb, tokens, positions):
    return pair_margins(model, sae_a, fa, sae_b, fb, tokens, positions)


evaluate_pair = eqx.filter_jit(_evaluate)


def _start_values(model, args, tokens):
    m, f = evaluate_pair(model, args["sae_a"], args["fa"], args["sae_b"], args["fb"], jnp.asarray(tokens, jnp.int32),
                         args["positions"])
    return np.asarray(m), np.asarray(f)


# ---------------------------------------------------------------------------------------------- output


@dataclass
class OutputEffect:
    """The next-token effect of a pair at position p of each row (module docstring, 3).

    logprobs: [4, n, V] log-probabilities under clean, a ablated, b ablated, both ablated (CONDITIONS);
    kl: [3, n] KL(clean || ablated) in nats for a, b, both; interaction: [n] ||Δ_ab − Δ_a − Δ_b||₂;
    relative: [n] interaction / ||Δ_ab||₂ (NaN where Δ_ab = 0); top_down / top_up: [n, top] ids of the
    tokens whose log-probability ablating both lowers / raises most (what the pair promotes / suppresses);
    top_interaction: [n, top] ids with the largest |Δ_ab − Δ_a − Δ_b|.
    """

    logprobs: np.ndarray
    kl: np.ndarray
    interaction: np.ndarray
    relative: np.ndarray
    top_down: np.ndarray
    top_up: np.ndarray
    top_interaction: np.ndarray


CONDITIONS = ("clean", "ablate_a", "ablate_b", "ablate_both")


def _output_logprobs(model, sae_a, fa, sae_b, fb, tokens, positions):
    n, S = tokens.shape
    at_p = jax.nn.one_hot(positions, S, dtype=bool)                                    # [n, S]
    none = jnp.zeros_like(at_p)
    mask_a = jnp.concatenate([none, at_p, none, at_p])                                 # conditions x rows
    mask_b = jnp.concatenate([none, none, at_p, at_p])
    edits = (Ablate(sae_a, fa, positions=mask_a), Ablate(sae_b, fb, positions=mask_b))
    logits = model.run(jnp.tile(tokens, (4, 1)), edits=edits).logits                  # [4n, S, V]
    rows = jnp.arange(4 * n)
    out = jax.nn.log_softmax(logits[rows, jnp.tile(positions, 4)].astype(jnp.float32), axis=-1)
    return out.reshape(4, n, -1)


output_logprobs = eqx.filter_jit(_output_logprobs)


def output_effects(model, sae_a, feature_a: int, sae_b, feature_b: int, tokens, positions=-1, *,
                   top: int = 5) -> OutputEffect:
    """The next-token effect at position positions[r] of each row of tokens [n, S] of ablating feature_a,
    feature_b and both there (one batched run of the four conditions; module docstring, 3)."""
    tokens, pos, _ = _check_search(model, sae_a, feature_a, sae_b, feature_b, tokens, positions, 1, 1, 1, 1.0,
                                   (1.0, 1.0))
    if top < 1:
        raise JfigError(f"top must be >= 1, got {top}")
    lp = np.asarray(output_logprobs(model, sae_a, jnp.asarray(feature_a, jnp.int32), sae_b,
                                    jnp.asarray(feature_b, jnp.int32), jnp.asarray(tokens, jnp.int32),
                                    jnp.asarray(pos, jnp.int32)), np.float64)
    if not np.isfinite(lp).all():
        raise JfigError("the model's log-probabilities are not finite (NaN or inf in the logits)")
    p0 = np.exp(lp[0])
    kl = np.stack([(p0 * (lp[0] - lp[c])).sum(-1) for c in (1, 2, 3)])
    d_a, d_b, d_ab = lp[1] - lp[0], lp[2] - lp[0], lp[3] - lp[0]
    inter = d_ab - d_a - d_b
    norm = np.linalg.norm(inter, axis=-1)
    both = np.linalg.norm(d_ab, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = np.where(both > 0, norm / both, np.nan)
    top = min(top, lp.shape[-1])
    return OutputEffect(logprobs=lp, kl=np.maximum(kl, 0.0), interaction=norm, relative=relative,
                        top_down=np.argsort(d_ab, axis=-1, kind="stable")[:, :top],
                        top_up=np.argsort(-d_ab, axis=-1, kind="stable")[:, :top],
                        top_interaction=np.argsort(-np.abs(inter), axis=-1, kind="stable")[:, :top])
