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

:func:`match_across` is the same matching between dictionaries of *different* sites (another layer,
or the attention / MLP output that writes into a residual site): both sites are captured in one run
of the model, decoder cosines need the two sites to share a width (``d_in``), and a third
similarity, ``causal`` (a standardised effect of clamping A's feature on B's, measured by the caller
with ``jfig.measure``), can be given as a matrix. :func:`mutual_best` and the ``*_moments`` helpers
are the pieces both entry points share.
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
from ..sites import site_key

METHODS = ("decoder", "activation", "both")
ACROSS_METHODS = ("decoder", "activation", "causal", "both", "all")
COMPONENTS = {"decoder": ("decoder",), "activation": ("activation",), "causal": ("causal",),
              "both": ("decoder", "activation"), "all": ("decoder", "activation", "causal")}
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

def empty_moments(d_a: int, d_b: int):
    """Moments of no tokens: (count, mean_a [d_a], mean_b [d_b], sum of squared deviations a [d_a],
    b [d_b], co-moment [d_a, d_b]), float32 on device."""
    z = partial(jnp.zeros, dtype=jnp.float32)
    return (z(()), z((d_a,)), z((d_b,)), z((d_a,)), z((d_b,)), z((d_a, d_b)))


@jax.jit
def fold_moments(moments, fa, fb, w):
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
    moments = empty_moments(sae_a.d_sae, sae_b.d_sae)
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
            moments = fold_moments(moments, _encode_rows(sae_a, a[0]), _encode_rows(sae_b, b[0]), a[1])
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
        moments = fold_moments(moments, _features_on(model, sae_a, t, site=sae_a.site),
                        _features_on(model_b, sae_b, t, site=sae_b.site), jnp.asarray(w))
    return moments


def moments_correlation(moments):
    """[d_a, d_b] Pearson correlations (0 where a feature never varies) and the token count."""
    n, _, _, va, vb, c = moments
    sa, sb = jnp.sqrt(va), jnp.sqrt(vb)
    denom = sa[:, None] * sb[None, :]
    ok = (sa[:, None] > 0) & (sb[None, :] > 0)
    return jnp.clip(jnp.where(ok, c / jnp.where(ok, denom, 1.0), 0.0), -1.0, 1.0), int(n)


def moments_std(moments) -> tuple[np.ndarray, np.ndarray]:
    """(std_a [d_a], std_b [d_b]): each feature's population standard deviation over the tokens folded
    in (zeros included: a sparse feature's spread over all tokens)."""
    n, _, _, va, vb, _ = moments
    n = max(float(n), 1.0)
    return np.sqrt(np.asarray(va, np.float64) / n), np.sqrt(np.asarray(vb, np.float64) / n)


@partial(jax.jit, static_argnames=("sites", "stop"))
def _features_at_sites(model, sae_a, sae_b, tokens, *, sites, stop):
    """A's and B's features [batch * seq, d_a], [batch * seq, d_b] from one run capturing both sites."""
    cache = model.run(tokens, capture=sites, stop_at=stop, logits=False).cache
    fa, fb = sae_a.encode(cache[sae_a.site]), sae_b.encode(cache[sae_b.site])
    return fa.reshape(-1, fa.shape[-1]), fb.reshape(-1, fb.shape[-1])


def site_moments(sae_a, sae_b, *, model=None, tokens=None, activations=None, activations_b=None,
                 batch_size: int = 8, skip_positions: int = 0):
    """Streamed moments (as :func:`empty_moments` lays them out) of two SAEs' features over the same
    tokens, the SAEs at any two sites of one model: ``model`` with ``tokens`` [n, seq] runs once per
    batch, capturing both sites and stopping at the later one; or ``activations`` [..., d_in_a] and
    ``activations_b`` [..., d_in_b] (arrays or iterables), the same tokens row for row."""
    if activations is not None:
        if activations_b is None and sae_a.site != sae_b.site:
            raise OptionError(f"activations_b= is needed: SAE B reads {sae_b.site}, not A's {sae_a.site}")
        return _moments(sae_a, sae_b, model=None, model_b=None, tokens=None, activations=activations,
                        activations_b=activations_b, batch_size=batch_size, skip_positions=skip_positions)
    if model is None or tokens is None:
        raise OptionError("activation correlation needs activations=, or model= and tokens= to run the model on")
    check_saes(model, [sae_a])
    check_saes(model, [sae_b])
    tokens = check_token_rows(tokens, model.vocab_size, what="tokens")
    if not 0 <= skip_positions < tokens.shape[1]:
        raise OptionError(f"skip_positions must be in 0..{tokens.shape[1] - 1} (sequences of {tokens.shape[1]} "
                          f"tokens), got {skip_positions}")
    sites = tuple(dict.fromkeys(sorted((sae_a.site, sae_b.site), key=site_key)))
    moments = empty_moments(sae_a.d_sae, sae_b.d_sae)
    for toks, w in _token_batches(tokens, batch_size, skip_positions):
        fa, fb = _features_at_sites(model, sae_a, sae_b, jnp.asarray(toks), sites=sites, stop=sites[-1])
        moments = fold_moments(moments, fa, fb, jnp.asarray(w))
    return moments


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
    return np.asarray(moments_correlation(m)[0])


# ------------------------------------------------------------------------------ the assignment

@dataclass(frozen=True)
class MutualBest:
    """Per A feature ``[d_a]``: ``best`` B feature, its ``similarity`` (the method's score; -inf where
    the row had no finite score), ``decoder_cosine``, ``correlation`` and ``causal`` with it (NaN where
    not given); ``best_a [d_b]``: each B feature's best A feature; ``match [d_a]``: ``best`` where
    mutual and at least the threshold, else -1."""

    best: np.ndarray
    similarity: np.ndarray
    decoder_cosine: np.ndarray
    correlation: np.ndarray
    causal: np.ndarray
    best_a: np.ndarray
    match: np.ndarray


@partial(jax.jit, static_argnames=("method",))
def _block_best(wa, wb, corr, causal, *, method):
    """For a block of A's rows: each row's best B feature, its score, cosine, correlation and causal
    score; and for each B feature the block's best row and score. wa [k, d_in] and wb [d_b, d_in] unit
    rows (None when the method has no decoder part and the widths differ); corr, causal [k, d_b] or
    None. NaN scores (an unmeasured causal row) never win."""
    cos = None if wa is None else jnp.matmul(wa, wb.T, precision=HIGHEST)        # [k, d_b]
    named = {"decoder": cos, "activation": corr, "causal": causal}
    parts = COMPONENTS[method]
    score = named[parts[0]]
    for part in parts[1:]:
        score = jnp.minimum(score, named[part])
    score = jnp.where(jnp.isnan(score), -jnp.inf, score)
    best = jnp.argmax(score, axis=1)                                   # [k]
    nan = jnp.full(best.shape, jnp.nan)
    pick = lambda m: nan if m is None else jnp.take_along_axis(m, best[:, None], axis=1)[:, 0]  # noqa: E731
    return best, pick(score), pick(cos), pick(corr), pick(causal), jnp.argmax(score, axis=0), jnp.max(score, axis=0)


def _unit_rows(w):
    w = jnp.asarray(w, jnp.float32).reshape(w.shape[0], -1)
    norm = jnp.linalg.norm(w, axis=1, keepdims=True)
    return w / jnp.where(norm > 0, norm, 1.0)


def mutual_best(dec_a, dec_b, *, method: str, min_similarity: float, correlation=None, causal=None,
                block: int | None = None) -> MutualBest:
    """One-to-one assignment of A's features to B's by mutual best similarity (module docstring).

    dec_a [d_a, d_in], dec_b [d_b, d_in]: decoder rows (None for both when ``method`` has no decoder
    part); correlation, causal: [d_a, d_b] similarity matrices (device or host) when the method
    uses them; method: a key of ``COMPONENTS`` (a combined method scores a pair by its smallest part).
    Scored ``block`` A rows at a time on device (default: as many as fit 256 MB)."""
    need = COMPONENTS[method]
    given = {"decoder": dec_a, "activation": correlation, "causal": causal}
    missing = [p for p in need if given[p] is None]
    if missing:
        raise OptionError(f"method={method!r} needs the {missing} similarity, which was not given")
    d_a, d_b = (len(dec_a), len(dec_b)) if dec_a is not None else np.shape(correlation if correlation is not None
                                                                             else causal)
    wa, wb = (_unit_rows(dec_a), _unit_rows(dec_b)) if dec_a is not None else (None, None)
    corr = None if correlation is None else jnp.asarray(correlation, jnp.float32)
    caus = None if causal is None else jnp.asarray(causal, jnp.float32)
    k = min(d_a, block or max(1, SCORE_BYTES // (4 * 3 * d_b)))
    out_rows = [np.zeros(d_a, np.int64)] + [np.zeros(d_a, np.float32) for _ in range(4)]
    col_arg, col_max = np.zeros(d_b, np.int64), np.full(d_b, -np.inf, np.float32)
    cut = lambda m, s: None if m is None else jax.lax.dynamic_slice_in_dim(m, s, k, axis=0)  # noqa: E731
    for start in range(0, d_a, k):
        s = min(start, d_a - k)                     # the last block overlaps the one before: one shape
        out = [np.asarray(x) for x in _block_best(cut(wa, s), wb, cut(corr, s), cut(caus, s), method=method)]
        for row, value in zip(out_rows, out[:5]):
            row[s:s + k] = value
        better = out[6] > col_max                    # strict: ties keep the lowest A id, as argmax does
        col_arg[better], col_max[better] = out[5][better] + s, out[6][better]
    best, score = out_rows[0], out_rows[1]
    mutual = (col_arg[best] == np.arange(d_a)) & (score >= min_similarity)
    return MutualBest(best=best, similarity=score, decoder_cosine=out_rows[2], correlation=out_rows[3],
                      causal=out_rows[4], best_a=col_arg, match=np.where(mutual, best, -1))


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
        corr, n_tokens = moments_correlation(_moments(sae_a, sae_b, model=model, model_b=model_b, tokens=tokens,
                                               activations=activations, activations_b=activations_b,
                                               batch_size=batch_size, skip_positions=skip_positions))
        if n_tokens < 2:
            raise JfigError(f"activation correlation needs at least 2 tokens, got {n_tokens}")
    r = mutual_best(sae_a.W_dec, sae_b.W_dec, method=method, min_similarity=float(min_similarity), correlation=corr,
                    block=block)
    return FeatureMatching(site=sae_a.site, method=method, min_similarity=float(min_similarity), best=r.best,
                           similarity=r.similarity, decoder_cosine=r.decoder_cosine, correlation=r.correlation,
                           best_a=r.best_a, match=r.match, n_tokens=n_tokens)


@dataclass(frozen=True, eq=False)
class CrossMatching(FeatureMatching):
    """A :class:`FeatureMatching` between SAE A at ``site`` and SAE B at ``site_b`` (another layer or
    component). ``causal [d_sae_a]``: the standardised causal effect of each A feature on its best B
    feature (NaN where not measured or not given)."""

    site_b: str = ""
    causal: np.ndarray | None = None

    def table(self) -> pa.Table:
        """:meth:`FeatureMatching.table` plus a ``causal`` column."""
        t = super().table()
        return t.append_column("causal", pa.array(self.causal if self.causal is not None
                                                  else np.full(self.d_sae_a, np.nan), pa.float32()))

    def summary(self) -> str:
        return (f"{self.site} -> {self.site_b}: {self.n_matched} of {self.d_sae_a} A features matched one to one to "
                f"B's {self.d_sae_b} by {self.method} (similarity >= {self.min_similarity:g}"
                + (f", correlations over {self.n_tokens} tokens)" if self.n_tokens else ")"))


def match_across(sae_a, sae_b, *, method: str = "decoder", min_similarity: float = 0.5, model=None, tokens=None,
                 activations=None, activations_b=None, causal=None, moments=None, batch_size: int = 8,
                 skip_positions: int = 0, block: int | None = None) -> CrossMatching:
    """Match the features of ``sae_a`` to those of ``sae_b`` when the two read *different* sites (an
    earlier and a later layer; a residual site and the attention or MLP output written into it), one
    to one by mutual best similarity, as :func:`match_features` does at one site.

    method: "decoder" (decoder cosine: both sites must have the same width), "activation" (Pearson
    correlation over tokens), "causal" (the ``causal`` matrix), "both" (decoder and activation, the
    smaller) or "all" (the smallest of the three).
    Activations: ``model`` with ``tokens`` [n, seq] (both sites captured in one run per batch of
    ``batch_size`` sequences; positions < ``skip_positions`` left out), or ``activations`` (A's site)
    with ``activations_b`` (B's site), or ``moments`` already streamed by :func:`site_moments`.
    causal: [d_sae_a, d_sae_b] standardised effects of A's features on B's (NaN rows: not measured,
    never matched), e.g. ``jfig.analysis.lineage.causal_similarity``. min_similarity: in [-1, 1] for
    cosines and correlations; any finite number when the method includes ``causal``.

    >>> m = match_across(sae6, sae10, method="both", model=model, tokens=tokens)   # doctest: +SKIP
    >>> m.match                                                   # [d_sae_a] ids of sae10, -1 unmatched
    """
    if method not in ACROSS_METHODS:
        raise OptionError(f"method must be one of {ACROSS_METHODS}, got {method!r}")
    parts = COMPONENTS[method]
    if not np.isfinite(float(min_similarity)) or ("causal" not in parts and not -1.0 <= float(min_similarity) <= 1.0):
        raise OptionError(f"min_similarity must be in [-1, 1] (a cosine or a correlation), or finite when the method "
                          f"includes causal, got {min_similarity}")
    if block is not None and int(block) < 1:
        raise OptionError(f"block must be >= 1 features, got {block}")
    if batch_size < 1:
        raise OptionError(f"batch_size must be >= 1, got {batch_size}")
    if "decoder" in parts and sae_a.d_in != sae_b.d_in:
        raise ShapeError(f"decoder cosines need one width: SAE A at {sae_a.site} has d_in {sae_a.d_in}, SAE B at "
                         f"{sae_b.site} has d_in {sae_b.d_in}; use method='activation' or 'causal'")
    if causal is not None:
        causal = np.asarray(causal, np.float32)
        if causal.shape != (sae_a.d_sae, sae_b.d_sae):
            raise ShapeError(f"causal has shape {causal.shape}, expected [d_sae_a, d_sae_b] = "
                             f"[{sae_a.d_sae}, {sae_b.d_sae}]")
    elif "causal" in parts:
        raise OptionError(f"method={method!r} needs causal=, a [{sae_a.d_sae}, {sae_b.d_sae}] matrix of "
                          f"standardised effects (jfig.analysis.lineage.causal_similarity)")
    given = moments is not None or activations is not None or model is not None or tokens is not None
    if "activation" in parts and not given:
        raise OptionError(f"method={method!r} correlates activations: pass moments=, activations= with "
                          f"activations_b=, or model= and tokens=")
    corr, n_tokens = None, 0
    if given:
        if moments is None:
            moments = site_moments(sae_a, sae_b, model=model, tokens=tokens, activations=activations,
                                   activations_b=activations_b, batch_size=batch_size, skip_positions=skip_positions)
        if tuple(np.shape(moments[5])) != (sae_a.d_sae, sae_b.d_sae):
            raise ShapeError(f"moments hold a co-moment of shape {tuple(np.shape(moments[5]))}, expected "
                             f"[{sae_a.d_sae}, {sae_b.d_sae}] for these two SAEs")
        corr, n_tokens = moments_correlation(moments)
        if n_tokens < 2:
            raise JfigError(f"activation correlation needs at least 2 tokens, got {n_tokens}")
    same_width = sae_a.d_in == sae_b.d_in
    r = mutual_best(sae_a.W_dec if same_width else None, sae_b.W_dec if same_width else None, method=method,
                    min_similarity=float(min_similarity), correlation=corr, causal=causal, block=block)
    return CrossMatching(site=sae_a.site, method=method, min_similarity=float(min_similarity), best=r.best,
                         similarity=r.similarity, decoder_cosine=r.decoder_cosine, correlation=r.correlation,
                         best_a=r.best_a, match=r.match, n_tokens=n_tokens, site_b=sae_b.site, causal=r.causal)


def match_sae_sets(saes_a: Iterable, saes_b: Iterable, **options) -> dict[str, FeatureMatching]:
    """{site: FeatureMatching} for the sites both SAE sets cover (one SAE per site each); options as
    :func:`match_features`. JfigError when they share no site."""
    by_a = {s.site: s for s in saes_a}
    by_b = {s.site: s for s in saes_b}
    shared = [site for site in by_a if site in by_b]
    if not shared:
        raise JfigError(f"the two SAE sets share no site (A: {sorted(by_a)}, B: {sorted(by_b)})")
    return {site: match_features(by_a[site], by_b[site], **options) for site in shared}
