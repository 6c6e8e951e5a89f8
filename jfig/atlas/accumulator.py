"""The atlas's streaming accumulator: co-activation statistics on device, in bounded memory.

`AtlasAccumulator` holds a fixed-size state (a pytree of device arrays) and folds batches of SAE
feature activations into it with one jitted update (no retrace across batches of one shape):

- per feature (all ``d_sae`` of each site): firing count, sum, min/max of non-zero activations,
  a log-spaced histogram of non-zero values, the first ``exact_values`` values (exact quantiles
  for rare features), and the ``top_contexts`` strongest activations with their token windows;
- per tracked feature pair of each site pair in the layer window: the co-activation count
  ``C[i, j]`` and the sum of the windowed target activation over tokens where the source fires.

Active sets come from ``lax.top_k`` over each token's activations (``max_active`` per token,
zeros masked). Pair counts use one-hot matmuls (``method="dense"``, fast on accelerators, exact
whatever ``max_active``) or a scatter of active index pairs (``method="sparse"``, fast on CPU,
exact while no token has more than ``max_active`` active features; ``dropped`` counts the
excess). The accumulator can be fed activations directly (``update``) or run a model and its
SAEs (``update_from_model``); both share the pure function :func:`update_state`.

Token-aligned windows: with ``position_window = w`` the target of a pair is the windowed
activation ``g_j(p) = max_{q in [p, p + w]} f_j(q)`` (same sequence), so ``C[i, j]`` counts the
source tokens ``p`` where ``i`` fires at ``p`` and ``j`` fires at some ``q`` in ``p..p+w``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ShapeError
from ..sites import parse_site, sort_sites

DEFAULT_MAX_ACTIVE = 128


@dataclass(frozen=True)
class AtlasSpec:
    """Static shape of the accumulation (a jit cache key). Sites are in forward order; pairs index them."""

    sites: tuple[str, ...]
    d_sae: tuple[int, ...]
    n_tracked: tuple[int, ...]
    max_active: tuple[int, ...]
    pairs: tuple[tuple[int, int], ...]        # (source, target) site indices, source <= target in forward order
    position_window: int = 0
    top_contexts: int = 8
    context: tuple[int, int] = (12, 4)        # tokens kept before and after a top activation
    hist_bins: int = 256
    hist_range: tuple[float, float] = (1e-4, 1e4)
    exact_values: int = 64
    method: str = "sparse"                    # "sparse" | "dense"

    @property
    def targets(self) -> tuple[int, ...]:
        return tuple(sorted({b for _, b in self.pairs}))


def site_pairs(sites, window: int) -> tuple[tuple[int, int], ...]:
    """Index pairs (a, b), a <= b in forward order, whose layers differ by at most `window`."""
    layers = [parse_site(s).layer for s in sites]
    return tuple((a, b) for a in range(len(sites)) for b in range(a, len(sites)) if layers[b] - layers[a] <= window)


def init_state(spec: AtlasSpec) -> dict:
    """Zeroed state: {"sites": [per-site arrays], "pairs": [per-pair arrays]}; its size is fixed by `spec`."""
    K, Lw = spec.top_contexts, spec.context[0] + 1 + spec.context[1]
    sites = []
    for d, n in zip(spec.d_sae, spec.n_tracked):
        sites.append(dict(
            count=jnp.zeros((d,), jnp.int32), sum=jnp.zeros((d,), jnp.float32),
            vmin=jnp.full((d,), jnp.inf, jnp.float32), vmax=jnp.zeros((d,), jnp.float32),
            hist=jnp.zeros((d, spec.hist_bins + 2), jnp.int32), nrec=jnp.zeros((d,), jnp.int32),
            exact=jnp.full((d, spec.exact_values), jnp.nan, jnp.float32), dropped=jnp.zeros((), jnp.int32),
            ctx_val=jnp.zeros((d, K), jnp.float32), ctx_seq=jnp.full((d, K), -1, jnp.int32),
            ctx_pos=jnp.full((d, K), -1, jnp.int32), ctx_tok=jnp.full((d, K, Lw), -1, jnp.int32),
            wcount=jnp.zeros((n,), jnp.int32), wsum=jnp.zeros((n,), jnp.float32)))
    pairs = [dict(co=jnp.zeros((spec.n_tracked[a], spec.n_tracked[b]), jnp.int32),
                  fsum=jnp.zeros((spec.n_tracked[a], spec.n_tracked[b]), jnp.float32)) for a, b in spec.pairs]
    return {"sites": sites, "pairs": pairs}


def make_index(spec: AtlasSpec, features) -> list[dict]:
    """Per site: tracked feature ids `feats [n]` and `posmap [d_sae]` (position among tracked, or -1)."""
    out = []
    for d, feats in zip(spec.d_sae, features):
        feats = np.asarray(feats, np.int32)
        posmap = np.full((d,), -1, np.int32)
        posmap[feats] = np.arange(len(feats), dtype=np.int32)
        out.append(dict(feats=jnp.asarray(feats), posmap=jnp.asarray(posmap)))
    return out


# ---------------------------------------------------------------------------------- the update

def _shift(x, o: int, fill):
    """x[:, p + o] at position p (fill past the end); x [b, s, ...]."""
    if o == 0:
        return x
    pad = jnp.full((x.shape[0], o) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([x[:, o:], pad], axis=1)


def _site_update(spec: AtlasSpec, st: dict, f, k: int, tokens, seq_offset):
    """Per-feature statistics of one site. f [T, d] (zero where inactive or invalid); returns new st
    and the top-k active entries (val, idx) [T, K]."""
    T, d = f.shape
    K, N = spec.max_active[k], spec.exact_values
    active = f > 0
    st = dict(st)
    st["count"] = st["count"] + active.sum(0, dtype=jnp.int32)
    st["sum"] = st["sum"] + f.sum(0)
    st["vmax"] = jnp.maximum(st["vmax"], f.max(0))
    st["vmin"] = jnp.minimum(st["vmin"], jnp.where(active, f, jnp.inf).min(0))
    st["dropped"] = st["dropped"] + jnp.maximum(active.sum(1, dtype=jnp.int32) - K, 0).sum()
    val, idx = jax.lax.top_k(f, K)                                      # [T, K]
    ok = val > 0
    # entries sorted by (feature, value descending, token): ranks within each feature
    feat = jnp.where(ok, idx, d).reshape(-1)
    tok = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, K)).reshape(-1)
    feat_s, negv_s, tok_s = jax.lax.sort((feat, -val.reshape(-1), tok), num_keys=2, is_stable=True)
    v_s = -negv_s
    first = jnp.searchsorted(feat_s, feat_s, side="left").astype(jnp.int32)
    rank = jnp.arange(feat_s.shape[0], dtype=jnp.int32) - first                 # position within its feature
    lo, hi = spec.hist_range
    step = (math.log(hi) - math.log(lo)) / spec.hist_bins
    b = jnp.floor((jnp.log(jnp.maximum(v_s, 1e-30)) - math.log(lo)) / step).astype(jnp.int32) + 1
    b = jnp.clip(b, 0, spec.hist_bins + 1)
    st["hist"] = st["hist"].at[feat_s, b].add(1, mode="drop")
    dest = st["nrec"][jnp.minimum(feat_s, d - 1)] + rank
    st["exact"] = st["exact"].at[feat_s, jnp.where(dest < N, dest, N)].set(v_s, mode="drop")
    st["nrec"] = st["nrec"].at[feat_s].add(1, mode="drop")
    if spec.top_contexts:
        st.update(_contexts(spec, st, feat_s, v_s, tok_s, rank, tokens, seq_offset))
    return st, (val, idx, ok)


def _contexts(spec: AtlasSpec, st, feat_s, v_s, tok_s, rank, tokens, seq_offset):
    """Merge this batch's strongest activations per feature into the kept top contexts."""
    Kc, (left, right) = spec.top_contexts, spec.context
    d = st["ctx_val"].shape[0]
    b, s = tokens.shape
    rows = jnp.where(rank < Kc, feat_s, d)
    cand_val = jnp.zeros((d, Kc), jnp.float32).at[rows, rank].set(v_s, mode="drop")
    cand_tok = jnp.zeros((d, Kc), jnp.int32).at[rows, rank].set(tok_s, mode="drop")
    top_v, top_i = jax.lax.top_k(jnp.concatenate([st["ctx_val"], cand_val], axis=1), Kc)  # state first wins ties
    new = top_i >= Kc
    t = jnp.take_along_axis(cand_tok, jnp.maximum(top_i - Kc, 0), axis=1)
    row, pos = t // s, t % s
    win = pos[..., None] + jnp.arange(-left, right + 1)                  # [d, Kc, Lw]
    toks = jnp.where((win >= 0) & (win < s), tokens[row[..., None], jnp.clip(win, 0, s - 1)], -1)
    old = jnp.minimum(top_i, Kc - 1)

    def keep(name):
        return jnp.take_along_axis(st[name], old if st[name].ndim == 2 else old[..., None], axis=1)
    return dict(ctx_val=top_v,
                ctx_seq=jnp.where(new, seq_offset + row, keep("ctx_seq")),
                ctx_pos=jnp.where(new, pos, keep("ctx_pos")),
                ctx_tok=jnp.where(new[..., None], toks, keep("ctx_tok")))


def _window_entries(w: int, ent, posmap, b, s):
    """Tracked active entries of the windowed target g_j(p) = max f_j(p..p+w), deduplicated.
    ent = (val, idx, ok) [T, K]; returns (val, pos, ok) [T, K']."""
    val, idx, ok = ent
    pos = posmap[idx]
    ok = ok & (pos >= 0)
    n_fill = posmap.shape[0]
    pos = jnp.where(ok, pos, n_fill).reshape(b, s, -1)
    val = jnp.where(ok, val, 0.0).reshape(b, s, -1)
    if w == 0:
        return val.reshape(b * s, -1), pos.reshape(b * s, -1), ok.reshape(b * s, -1)
    pos = jnp.concatenate([_shift(pos, o, n_fill) for o in range(w + 1)], axis=-1)
    val = jnp.concatenate([_shift(val, o, 0.0) for o in range(w + 1)], axis=-1)
    pos, negv = jax.lax.sort((pos, -val), dimension=-1, num_keys=2)
    first = jnp.concatenate([jnp.ones_like(pos[..., :1], bool), pos[..., 1:] != pos[..., :-1]], axis=-1)
    ok = first & (pos < n_fill)
    return (-negv).reshape(b * s, -1), jnp.where(ok, pos, n_fill).reshape(b * s, -1), ok.reshape(b * s, -1)


def update_state(spec: AtlasSpec, state: dict, index, acts, tokens, valid, seq_offset) -> dict:
    """Fold one batch into `state` (pure). acts: per site [b, s, d_sae]; tokens [b, s] int32;
    valid [b, s] bool (tokens that count); seq_offset: corpus index of the batch's first sequence."""
    b, s = valid.shape
    T = b * s
    vflat = valid.reshape(T)
    new_sites, dense_t, sparse_t, src = [], {}, {}, {}
    for k, a in enumerate(acts):
        f = jnp.asarray(a, jnp.float32).reshape(T, -1)
        f = jnp.where((f > 0) & vflat[:, None], f, 0.0)
        st, ent = _site_update(spec, state["sites"][k], f, k, tokens, seq_offset)
        ix = index[k]
        if spec.method == "dense":
            ft = f[:, ix["feats"]]                                          # [T, n]
            src[k] = ft > 0
            if k in spec.targets:
                g = ft.reshape(b, s, -1)
                g = jnp.max(jnp.stack([_shift(g, o, 0.0) for o in range(spec.position_window + 1)]), 0)
                g = jnp.where(vflat[:, None], g.reshape(T, -1), 0.0)
                dense_t[k] = g
                st["wcount"] = st["wcount"] + (g > 0).sum(0, dtype=jnp.int32)
                st["wsum"] = st["wsum"] + g.sum(0)
        else:
            sv, sp, so = _window_entries(0, ent, ix["posmap"], b, s)
            src[k] = (sp, so)
            if k in spec.targets:
                tv, tp, to = _window_entries(spec.position_window, ent, ix["posmap"], b, s)
                to = to & vflat[:, None]
                sparse_t[k] = (tv, tp, to)
                st["wcount"] = st["wcount"].at[tp].add(to.astype(jnp.int32), mode="drop")
                st["wsum"] = st["wsum"].at[tp].add(jnp.where(to, tv, 0.0), mode="drop")
        new_sites.append(st)
    new_pairs = []
    for (a, bb), pst in zip(spec.pairs, state["pairs"]):
        if spec.method == "dense":
            A = src[a]
            cdt = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
            co = jnp.matmul(A.T.astype(cdt), (dense_t[bb] > 0).astype(cdt), preferred_element_type=jnp.float32)
            fs = jnp.matmul(A.T.astype(jnp.float32), dense_t[bb], precision=jax.lax.Precision.HIGHEST)
            new_pairs.append(dict(co=pst["co"] + co.astype(jnp.int32), fsum=pst["fsum"] + fs))
        else:
            (sp, so), (tv, tp, to) = src[a], sparse_t[bb]
            n_a, n_b = pst["co"].shape
            both = so[:, :, None] & to[:, None, :]
            lin = jnp.where(both, sp[:, :, None] * n_b + tp[:, None, :], n_a * n_b).reshape(-1)
            co = pst["co"].reshape(-1).at[lin].add(1, mode="drop").reshape(n_a, n_b)
            upd = jnp.broadcast_to(tv[:, None, :], both.shape).reshape(-1)
            fs = pst["fsum"].reshape(-1).at[lin].add(upd, mode="drop").reshape(n_a, n_b)
            new_pairs.append(dict(co=co, fsum=fs))
    return {"sites": new_sites, "pairs": new_pairs}


@partial(jax.jit, static_argnums=0, donate_argnums=1)
def _update(spec, state, index, acts, tokens, valid, seq_offset):
    return update_state(spec, state, index, acts, tokens, valid, seq_offset)


@partial(jax.jit, static_argnums=0, donate_argnums=1)
def _model_step(spec, state, index, model, saes, tokens, valid, seq_offset):
    out = model.run(tokens, capture=spec.sites, stop_at=spec.sites[-1], logits=False)
    acts = tuple(sae.encode(out.cache[site]) for sae, site in zip(saes, spec.sites))
    return update_state(spec, state, index, acts, tokens, valid, seq_offset)


def resolve_method(method: str) -> str:
    if method == "auto":
        return "sparse" if jax.default_backend() == "cpu" else "dense"
    if method not in ("sparse", "dense"):
        raise ValueError(f"method must be 'auto', 'sparse' or 'dense', got {method!r}")
    return method


class AtlasAccumulator:
    """Streaming co-activation statistics for SAE features at several sites.

    ``sites`` maps site name -> d_sae. ``features`` maps a site to the feature ids whose pairs are
    counted (default: all). Feed batches with :meth:`update` (activations ``[b, s, d_sae]`` per
    site) or :meth:`update_from_model`; read numpy arrays with :meth:`result`. Memory is fixed at
    construction (:meth:`nbytes`), whatever the number of batches.

    >>> acc = AtlasAccumulator({"blocks.0.hook_resid_post": 16}, window=0)
    >>> acc.update({"blocks.0.hook_resid_post": np.eye(16, dtype=np.float32)[None]})
    >>> int(acc.result()["pairs"][0]["co"].trace()), acc.n_tokens
    (16, 16)
    """

    def __init__(self, sites: dict[str, int], *, features=None, window: int = 5, position_window: int = 0,
                 top_contexts: int = 8, context: tuple[int, int] = (12, 4), max_active=None, hist_bins: int = 256,
                 hist_range: tuple[float, float] = (1e-4, 1e4), exact_values: int = 64, skip_positions: int = 0,
                 method: str = "auto"):
        names = sort_sites(sites)
        if len(names) != len(sites):
            raise ShapeError(f"sites must be distinct, got {list(sites)}")
        features = dict(features or {})
        unknown = set(features) - set(names)
        if unknown:
            raise ShapeError(f"features given for site(s) {sorted(unknown)} that have no SAE; sites are {list(names)}")
        d_sae = tuple(int(sites[s]) for s in names)
        feats = []
        for site, d in zip(names, d_sae):
            f = features.get(site)
            f = np.arange(d) if f is None else np.unique(np.asarray(f, np.int64))
            if f.size == 0 or f.min() < 0 or f.max() >= d:
                raise ShapeError(f"features for {site} must be a non-empty set of ids in [0, {d}), got {f[:8]}...")
            feats.append(f.astype(np.int32))
        if not isinstance(max_active, dict):
            max_active = {s: max_active for s in names}
        k_max = tuple(min(d, int(max_active.get(s) or DEFAULT_MAX_ACTIVE)) for s, d in zip(names, d_sae))
        if min(position_window, window, skip_positions, top_contexts, exact_values) < 0 or hist_bins < 1:
            raise ValueError("window, position_window, skip_positions, top_contexts and exact_values must be >= 0")
        self.window, self.skip_positions = int(window), int(skip_positions)
        self.spec = AtlasSpec(
            sites=names, d_sae=d_sae, n_tracked=tuple(len(f) for f in feats), max_active=k_max,
            pairs=site_pairs(names, window), position_window=int(position_window), top_contexts=int(top_contexts),
            context=(int(context[0]), int(context[1])), hist_bins=int(hist_bins),
            hist_range=(float(hist_range[0]), float(hist_range[1])), exact_values=int(exact_values),
            method=resolve_method(method))
        self.features = tuple(feats)
        self.index = make_index(self.spec, feats)
        self.state = init_state(self.spec)
        self.n_tokens = 0
        self.n_sequences = 0

    @property
    def sites(self) -> tuple[str, ...]:
        return self.spec.sites

    def settings(self) -> dict:
        s = self.spec
        return dict(window=self.window, position_window=s.position_window, top_contexts=s.top_contexts,
                    context=list(s.context), hist_bins=s.hist_bins, hist_range=list(s.hist_range),
                    exact_values=s.exact_values, skip_positions=self.skip_positions, method=s.method,
                    max_active=dict(zip(s.sites, s.max_active)))

    def nbytes(self) -> int:
        """Bytes held by the accumulator's state (fixed at construction)."""
        return sum(x.nbytes for x in jax.tree.leaves(self.state))

    def _valid(self, b: int, s: int, n_valid_rows) -> tuple[np.ndarray, int]:
        rows = b if n_valid_rows is None else int(n_valid_rows)
        valid = np.zeros((b, s), bool)
        valid[:rows, self.skip_positions:] = True
        return valid, rows

    def _advance(self, valid, rows) -> jax.Array:
        offset = jnp.asarray(self.n_sequences, jnp.int32)
        self.n_tokens += int(valid.sum())
        self.n_sequences += rows
        return offset

    def update(self, acts, tokens=None, n_valid_rows: int | None = None) -> None:
        """Fold a batch of feature activations in: ``acts`` maps site -> ``[b, s, d_sae]`` (values <= 0
        are inactive); ``tokens [b, s]`` (for the top contexts; zeros if None); rows past
        ``n_valid_rows`` are padding and do not count."""
        if not isinstance(acts, dict):
            acts = dict(zip(self.sites, acts))
        arrs = []
        for site, d in zip(self.sites, self.spec.d_sae):
            if site not in acts:
                raise ShapeError(f"no activations given for site {site}; expected [batch, seq, {d}]")
            a = jnp.asarray(acts[site], jnp.float32)
            if a.ndim != 3 or a.shape[-1] != d:
                raise ShapeError(f"activations at {site} have shape {tuple(a.shape)}; expected [batch, seq, {d}]")
            arrs.append(a)
        b, s = arrs[0].shape[:2]
        if any(a.shape[:2] != (b, s) for a in arrs):
            raise ShapeError(f"activations disagree on [batch, seq]: {[tuple(a.shape[:2]) for a in arrs]}")
        tokens = jnp.zeros((b, s), jnp.int32) if tokens is None else jnp.asarray(tokens, jnp.int32)
        if tokens.shape != (b, s):
            raise ShapeError(f"tokens have shape {tuple(tokens.shape)}; expected [batch, seq] = {(b, s)}")
        valid, rows = self._valid(b, s, n_valid_rows)
        offset = self._advance(valid, rows)
        self.state = _update(self.spec, self.state, self.index, tuple(arrs), tokens, jnp.asarray(valid), offset)

    def update_from_model(self, model, saes, tokens, n_valid_rows: int | None = None) -> None:
        """Run `model` on ``tokens [b, s]`` (stopping at the last site), encode with `saes` (one per
        site, in :attr:`sites` order) and fold the activations in, all in one jitted step."""
        tokens = jnp.asarray(tokens, jnp.int32)
        valid, rows = self._valid(*tokens.shape, n_valid_rows)
        offset = self._advance(valid, rows)
        self.state = _model_step(self.spec, self.state, self.index, model, tuple(saes), tokens,
                                 jnp.asarray(valid), offset)

    def result(self) -> dict:
        """Host copies: {"sites": [dict of numpy arrays], "pairs": [dict]}. Exact values are kept
        (sorted) only for features with at most `exact_values` recorded activations; empty context
        slots have value 0 and ids -1."""
        out = jax.tree.map(np.asarray, jax.device_get(self.state))
        for st in out["sites"]:
            finalize_site(st, self.spec.exact_values)
        for p in out["pairs"]:
            p["co"] = p["co"].astype(np.int64)
        return out


def finalize_site(st: dict, n_exact: int) -> None:
    """Normalise a site's host arrays in place so that equal statistics compare equal."""
    full = st["nrec"] > n_exact
    ex = np.sort(st["exact"], axis=1)            # nan sort last
    ex[full] = np.nan
    st["exact"] = ex
    empty = st["ctx_val"] <= 0
    st["ctx_val"] = np.where(empty, 0.0, st["ctx_val"]).astype(np.float32)
    st["ctx_seq"] = np.where(empty, -1, st["ctx_seq"])
    st["ctx_pos"] = np.where(empty, -1, st["ctx_pos"])
    st["ctx_tok"] = np.where(empty[..., None], -1, st["ctx_tok"])
    for k in ("count", "nrec", "hist", "wcount", "dropped"):
        st[k] = np.asarray(st[k]).astype(np.int64)
