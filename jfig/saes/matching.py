"""Features of two dictionaries at one site matched to each other: by decoder cosine, by the
correlation of their activations over tokens, or by both.

Two SAEs of one site (retrained with another seed or width, or trained before and after a
fine-tune) learn many of the same features under different ids. :func:`match_features` pairs
them one to one. The similarity of feature i of A and feature j of B is

- ``decoder``: the cosine of their decoder rows (weights only);
- ``activation``: the Pearson correlation of f_i and f_j over the same tokens (SAE A reading model
  A's activations and SAE B model B's: a fine-tuned model can be compared with its base);
- ``both``: the smaller of the two, so a pair is as similar as its weaker measure.

The assignment is mutual best: i and j are matched when j is i's most similar B feature, i is j's
most similar A feature, and their similarity reaches ``min_similarity``. It is one to one by
construction, costs one pass over the [d_a, d_b] similarities in row blocks (on device, never
held whole), and leaves a feature unmatched rather than pairing it with a feature that prefers
another: when A's feature splits into two in a wider B, one half is matched and the other is
honestly unmatched. An optimal assignment (the Hungarian algorithm on the full matrix) would
cost O(d^3) on the host and force pairs between features that are nobody's best match.

Correlations are streamed: each batch of tokens is encoded by both SAEs on device and folded into
running means, variances and the [d_a, d_b] co-moment (merged batch by batch with Chan's update,
so float32 accumulation does not cancel); no more than one batch of activations is held.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from itertools import zip_longest
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from ..errors import JfigError, OptionError, ShapeError, SiteError
from ..models.validation import check_saes, check_token_rows

METHODS = ("decoder", "activation", "both")
HIGHEST = jax.lax.Precision.HIGHEST    # float32 products in full (no TF32 on GPUs)
SCORE_BYTES = 1 << 28           # a block of similarities on device: at most this many bytes
ROWS_PER_SEQUENCE = 128         # activations given as rows are folded batch_size * this rows at a time


@dataclass(frozen=True, eq=False)
class FeatureMatching:
    """Features of SAE A (``d_sae_a`` of them) matched to features of SAE B at ``site``.

    Per feature of A, arrays ``[d_sae_a]``: ``best`` (its most similar B feature), ``similarity``
    (the method's similarity with it), ``decoder_cosine`` and ``correlation`` (with it; NaN when no
    activations were given), ``match`` (the one-to-one assignment: ``best`` where mutual and at
    least ``min_similarity``, else -1). ``best_a [d_sae_b]``: each B feature's most similar A
    feature. ``n_tokens``: tokens the correlations were taken over (0: none)."""

    site: str
    method: str
    min_similarity: float
    best: np.ndarray
    similarity: np.ndarray
    decoder_cosine: np.ndarray
    correlation: np.ndarray
    best_a: np.ndarray
    match: np.ndarray
    n_tokens: int = 0

    @property
    def d_sae_a(self) -> int:
        return len(self.best)

    @property
    def d_sae_b(self) -> int:
        return len(self.best_a)

    @property
    def n_matched(self) -> int:
        return int((self.match >= 0).sum())

    @property
    def unmatched_a(self) -> np.ndarray:
        """A's features with no match, ascending."""
        return np.flatnonzero(self.match < 0)

    @property
    def unmatched_b(self) -> np.ndarray:
        """B's features no A feature is matched to, ascending."""
        hit = np.zeros(self.d_sae_b, bool)
        hit[self.match[self.match >= 0]] = True
        return np.flatnonzero(~hit)

    def mapping(self) -> dict[int, int]:
        """{A feature: B feature} of the matched pairs."""
        a = np.flatnonzero(self.match >= 0)
        return dict(zip(a.tolist(), self.match[a].tolist()))

    def table(self) -> pa.Table:
        """One row per A feature: feature_a, best_b, similarity, decoder_cosine, correlation, match_b
        (null where unmatched)."""
        m = self.match
        return pa.table({"feature_a": np.arange(self.d_sae_a), "best_b": self.best, "similarity": self.similarity,
                         "decoder_cosine": self.decoder_cosine, "correlation": self.correlation,
                         "match_b": pa.array(m, pa.int64(), mask=m < 0)})

    def summary(self) -> str:
        return (f"{self.site}: {self.n_matched} of {self.d_sae_a} A features matched one to one to B's {self.d_sae_b} "
                f"by {self.method} (similarity >= {self.min_similarity:g}"
                + (f", correlations over {self.n_tokens} tokens)" if self.n_tokens else ")"))


def check_pair(sae_a, sae_b) -> None:
    """SiteError / ShapeError unless the two SAEs read the same site at the same width."""
    if sae_a.site != sae_b.site:
        raise SiteError(f"SAE A reads {sae_a.site} but SAE B reads {sae_b.site}: features are matched between two "
                        f"dictionaries of the same site")
    if sae_a.d_in != sae_b.d_in:
        raise ShapeError(f"SAE A has d_in {sae_a.d_in} but SAE B has d_in {sae_b.d_in} at {sae_a.site}: their "
                         f"decoder rows live in different spaces")


# ------------------------------------------------------------------------------ streamed correlation

def _empty_moments(d_a: int, d_b: int):
    z = partial(jnp.zeros, dtype=jnp.float32)
    return (z(()), z((d_a,)), z((d_b,)), z((d_a,)), z((d_b,)), z((d_a, d_b)))


@jax.jit
def _fold(moments, fa, fb, w):
    """Moments (count, means, sums of squared deviations, co-moment) merged with one batch of
    feature activations fa [rows, d_a], fb [rows, d_b] whose rows count with weight w [rows] (0 or 1)."""
    n, ma, mb, va, vb, c = moments
    fa, fb, w = fa.astype(jnp.float32), fb.astype(jnp.float32), w.astype(jnp.float32)
    nb = w.sum()
    safe = jnp.maximum(nb, 1.0)
    ba, bb = jnp.matmul(w, fa, precision=HIGHEST) / safe, jnp.matmul(w, fb, precision=HIGHEST) / safe  # [d_a], [d_b]
    da, db = (fa - ba) * w[:, None], fb - bb
    total = n + nb
    share = nb / jnp.maximum(total, 1.0)
    fac = n * share
    dma, dmb = ba - ma, bb - mb
    return (total, ma + dma * share, mb + dmb * share,
            va + (da * (fa - ba)).sum(0) + fac * dma ** 2,
            vb + (w[:, None] * db ** 2).sum(0) + fac * dmb ** 2,
            c + jnp.matmul(da.T, db, precision=HIGHEST) + fac * jnp.outer(dma, dmb))


@partial(jax.jit, static_argnames=("site",))
def _features_on(model, sae, tokens, *, site):
    out = model.run(tokens, capture=(site,), stop_at=site, logits=False)
    f = sae.encode(out.cache[site])
    return f.reshape(-1, f.shape[-1])


@jax.jit
def _encode_rows(sae, x):
    f = sae.encode(x)
    return f.reshape(-1, f.shape[-1])


def _token_batches(tokens, batch_size: int, skip_positions: int):
    """(tokens [batch_size, seq], row weights [batch_size * seq]): the last batch padded with zero
    rows of weight 0, positions < skip_positions weighted 0."""
    for start in range(0, len(tokens), batch_size):
        rows = tokens[start:start + batch_size]
        pad = np.zeros((batch_size - len(rows), tokens.shape[1]), tokens.dtype)
        w = np.zeros((batch_size, tokens.shape[1]), np.float32)
        w[:len(rows), skip_positions:] = 1.0
        yield np.concatenate([rows, pad]), w.reshape(-1)


def _row_batches(acts, d_in: int, batch_rows: int, what: str):
    """(rows [batch_rows, ...], weights [batch_rows]) from an array [..., d_in] (or [..., n_heads, d_head]
    for a hook_z SAE) or an iterable of such arrays; the last rows padded with weight 0."""
    src = [acts] if hasattr(acts, "shape") else acts
    for x in src:
        x = x if isinstance(x, jax.Array) else np.asarray(x)     # host arrays go to the device a batch at a time
        xp = jnp if isinstance(x, jax.Array) else np
        tail = 1 if x.ndim >= 1 and x.shape[-1] == d_in else 2
        if x.ndim < tail or int(np.prod(x.shape[-tail:])) != d_in:
            raise ShapeError(f"{what} have shape {tuple(x.shape)}, but the SAE reads {d_in} values per token")
        x = x.reshape(-1, *x.shape[-tail:])
        for start in range(0, len(x), batch_rows):
            rows = x[start:start + batch_rows]
            w = np.zeros(batch_rows, np.float32)
            w[:len(rows)] = 1.0
            yield jnp.asarray(xp.pad(rows, ((0, batch_rows - len(rows)),) + ((0, 0),) * tail)), w


def _moments(sae_a, sae_b, *, model, model_b, tokens, activations, activations_b, batch_size: int,
             skip_positions: int):
    """Device moments of A's and B's activations over the same tokens (see module docstring)."""
    moments = _empty_moments(sae_a.d_sae, sae_b.d_sae)
    if activations is not None:
        if model is not None or tokens is not None:
            raise OptionError("pass activations= or model= with tokens=, not both")
        rows = batch_size * ROWS_PER_SEQUENCE
        pairs = zip_longest(_row_batches(activations, sae_a.d_in, rows, "activations"),
                            _row_batches(activations if activations_b is None else activations_b, sae_b.d_in, rows,
                                         "activations_b"))
        for a, b in pairs:
            if a is None or b is None or not np.array_equal(a[1], b[1]):
                raise ShapeError("activations and activations_b hold different numbers of token rows; they must be "
                                 "the same tokens, row for row")
            moments = _fold(moments, _encode_rows(sae_a, a[0]), _encode_rows(sae_b, b[0]), a[1])
        return moments
    if model is None or tokens is None:
        raise OptionError("activation correlation needs activations=, or model= and tokens= to run the model on")
    model_b = model if model_b is None else model_b
    check_saes(model, [sae_a])
    check_saes(model_b, [sae_b])
    tokens = check_token_rows(tokens, min(model.vocab_size, model_b.vocab_size), what="tokens")
    if not 0 <= skip_positions < tokens.shape[1]:
        raise OptionError(f"skip_positions must be in 0..{tokens.shape[1] - 1} (sequences of {tokens.shape[1]} "
                          f"tokens), got {skip_positions}")
    for toks, w in _token_batches(tokens, batch_size, skip_positions):
        t = jnp.asarray(toks)
        moments = _fold(moments, _features_on(model, sae_a, t, site=sae_a.site),
                        _features_on(model_b, sae_b, t, site=sae_b.site), jnp.asarray(w))
    return moments


def _correlation(moments):
    """[d_a, d_b] Pearson correlations (0 where a feature never varies) and the token count."""
    n, _, _, va, vb, c = moments
    sa, sb = jnp.sqrt(va), jnp.sqrt(vb)
    denom = sa[:, None] * sb[None, :]
    ok = (sa[:, None] > 0) & (sb[None, :] > 0)
    return jnp.clip(jnp.where(ok, c / jnp.where(ok, denom, 1.0), 0.0), -1.0, 1.0), int(n)


def feature_correlation(sae_a, sae_b, *, model=None, model_b=None, tokens=None, activations=None,
                        activations_b=None, batch_size: int = 8, skip_positions: int = 0) -> np.ndarray:
    """float32 [d_a, d_b]: the Pearson correlation over tokens of each feature of SAE A with each of SAE B
    (0 where a feature is constant, e.g. dead), streamed as :func:`match_features` streams it.

    Either ``model`` (and ``model_b`` for SAE B, default the same) with ``tokens`` [n, seq] (run
    ``batch_size`` sequences at a time; positions < ``skip_positions`` left out, e.g. 1 for BOS),
    or ``activations`` (and ``activations_b``, default the same) [..., d_in] or an iterable of such
    arrays, the same tokens row for row (folded ``batch_size * ROWS_PER_SEQUENCE`` rows at a time)."""
    check_pair(sae_a, sae_b)
    m = _moments(sae_a, sae_b, model=model, model_b=model_b, tokens=tokens, activations=activations,
                 activations_b=activations_b, batch_size=batch_size, skip_positions=skip_positions)
    return np.asarray(_correlation(m)[0])


# ------------------------------------------------------------------------------ the assignment

@partial(jax.jit, static_argnames=("method",))
def _block_best(wa, wb, corr, *, method):
    """For a block of A's rows: each row's best B feature, its score, cosine and correlation; and for
    each B feature the block's best row and score. wa [k, d_in] and wb [d_b, d_in] unit rows; corr
    [k, d_b] or None."""
    cos = jnp.matmul(wa, wb.T, precision=HIGHEST)                     # [k, d_b]
    score = cos if method == "decoder" else corr if method == "activation" else jnp.minimum(cos, corr)
    best = jnp.argmax(score, axis=1)                                   # [k]
    pick = lambda m: jnp.take_along_axis(m, best[:, None], axis=1)[:, 0]  # noqa: E731
    row_corr = pick(corr) if corr is not None else jnp.full(best.shape, jnp.nan)
    return best, pick(score), pick(cos), row_corr, jnp.argmax(score, axis=0), jnp.max(score, axis=0)


def _unit_rows(w):
    w = jnp.asarray(w, jnp.float32).reshape(w.shape[0], -1)
    norm = jnp.linalg.norm(w, axis=1, keepdims=True)
    return w / jnp.where(norm > 0, norm, 1.0)


def _assign(sae_a, sae_b, corr, method: str, min_similarity: float, block: int | None):
    d_a, d_b = sae_a.d_sae, sae_b.d_sae
    wa, wb = _unit_rows(sae_a.W_dec), _unit_rows(sae_b.W_dec)
    k = min(d_a, block or max(1, SCORE_BYTES // (4 * 3 * d_b)))
    best, score, cos, cc = (np.zeros(d_a, np.int64), np.zeros(d_a, np.float32), np.zeros(d_a, np.float32),
                            np.zeros(d_a, np.float32))
    col_arg, col_max = np.zeros(d_b, np.int64), np.full(d_b, -np.inf, np.float32)
    for start in range(0, d_a, k):
        s = min(start, d_a - k)                     # the last block overlaps the one before: one shape
        c = None if corr is None else jax.lax.dynamic_slice_in_dim(corr, s, k, axis=0)
        out = [np.asarray(x) for x in _block_best(jax.lax.dynamic_slice_in_dim(wa, s, k, axis=0), wb, c,
                                                   method=method)]
        best[s:s + k], score[s:s + k], cos[s:s + k], cc[s:s + k] = out[:4]
        better = out[5] > col_max                    # strict: ties keep the lowest A id, as argmax does
        col_arg[better], col_max[better] = out[4][better] + s, out[5][better]
    mutual = (col_arg[best] == np.arange(d_a)) & (score >= min_similarity)
    return best, score, cos, cc, col_arg, np.where(mutual, best, -1)


def match_features(sae_a, sae_b, *, method: str = "decoder", min_similarity: float = 0.5, model=None,
                   model_b=None, tokens=None, activations=None, activations_b=None, batch_size: int = 8,
                   skip_positions: int = 0, block: int | None = None) -> FeatureMatching:
    """Match each feature of ``sae_a`` to a feature of ``sae_b`` (two SAEs of the same site and width
    of input), one to one by mutual best similarity (module docstring).

    method: "decoder" (decoder cosine; weights only), "activation" (Pearson correlation over
      tokens) or "both" (the smaller of the two); min_similarity: a mutual pair below it stays
      unmatched.
    Activations (needed by "activation" and "both"; with "decoder" they add the correlations to the
    result): ``model`` (``model_b`` for SAE B, default the same) with ``tokens`` [n, seq], or
    ``activations`` / ``activations_b`` as :func:`feature_correlation` takes them.
    block: A features scored at a time (default: as many as fit 256 MB of similarities).

    >>> m = match_features(sae, permuted)                         # doctest: +SKIP
    >>> m.match                                                   # [d_sae_a] B ids, -1 unmatched
    """
    if method not in METHODS:
        raise OptionError(f"method must be one of {METHODS}, got {method!r}")
    if not -1.0 <= float(min_similarity) <= 1.0:
        raise OptionError(f"min_similarity must be in [-1, 1] (a cosine or a correlation), got {min_similarity}")
    if block is not None and int(block) < 1:
        raise OptionError(f"block must be >= 1 features, got {block}")
    if batch_size < 1:
        raise OptionError(f"batch_size must be >= 1, got {batch_size}")
    check_pair(sae_a, sae_b)
    given = activations is not None or model is not None or tokens is not None
    if method != "decoder" and not given:
        raise OptionError(f"method={method!r} correlates activations: pass activations=, or model= and tokens=")
    corr, n_tokens = None, 0
    if given:
        corr, n_tokens = _correlation(_moments(sae_a, sae_b, model=model, model_b=model_b, tokens=tokens,
                                               activations=activations, activations_b=activations_b,
                                               batch_size=batch_size, skip_positions=skip_positions))
        if n_tokens < 2:
            raise JfigError(f"activation correlation needs at least 2 tokens, got {n_tokens}")
    best, score, cos, cc, best_a, match = _assign(sae_a, sae_b, corr, method, float(min_similarity), block)
    return FeatureMatching(site=sae_a.site, method=method, min_similarity=float(min_similarity), best=best,
                           similarity=score, decoder_cosine=cos,
                           correlation=cc if corr is not None else np.full(len(best), np.nan, np.float32),
                           best_a=best_a, match=match, n_tokens=n_tokens)


def match_sae_sets(saes_a: Iterable, saes_b: Iterable, **options) -> dict[str, FeatureMatching]:
    """{site: FeatureMatching} for the sites both SAE sets cover (one SAE per site each); options as
    :func:`match_features`. JfigError when they share no site."""
    by_a = {s.site: s for s in saes_a}
    by_b = {s.site: s for s in saes_b}
    shared = [site for site in by_a if site in by_b]
    if not shared:
        raise JfigError(f"the two SAE sets share no site (A: {sorted(by_a)}, B: {sorted(by_b)})")
    return {site: match_features(by_a[site], by_b[site], **options) for site in shared}
