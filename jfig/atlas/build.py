"""Building the co-activation atlas: stream token batches through the model and its SAEs into an
on-device accumulator, then finalise the host-side `Atlas`.

    atlas = build_atlas(model, saes, tokens, window=5, position_window=0)
    atlas = extend_atlas(atlas, model, saes, more_tokens)     # the same statistics over more text
"""
from __future__ import annotations

import itertools
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..data.progress import progress_iter
from ..models.validation import check_saes, check_token_rows
from .accumulator import AtlasAccumulator
from .atlas import Atlas

MAX_TRACKED = 4096


def token_batches(tokens_or_batches, batch_size: int, vocab: int | None = None):
    """Yield (tokens [batch_size, seq] int32, n_valid_rows): rows regrouped into fixed-size batches
    (the last padded with zero rows) so every step has one shape. Accepts [n_seq, seq] or an
    iterable of such arrays."""
    src = [tokens_or_batches] if getattr(tokens_or_batches, "ndim", None) == 2 else tokens_or_batches
    buf = np.zeros((0, 0), np.int32)
    for arr in src:
        arr = check_token_rows(arr, vocab)
        if len(buf) and arr.shape[1] != buf.shape[1]:
            yield _pad(buf, batch_size)
            buf = buf[:0]
        buf = arr if not len(buf) else np.concatenate([buf, arr])
        while len(buf) >= batch_size:
            yield buf[:batch_size], batch_size
            buf = buf[batch_size:]
    if len(buf):
        yield _pad(buf, batch_size)


def _pad(rows, batch_size):
    return np.concatenate([rows, np.zeros((batch_size - len(rows), rows.shape[1]), np.int32)]), len(rows)


@partial(jax.jit, static_argnames=("sites",))
def _firing_counts(model, saes, tokens, valid, *, sites):
    out = model.run(tokens, capture=sites, stop_at=sites[-1], logits=False)
    return [((sae.encode(out.cache[s]) > 0) & valid[..., None]).sum((0, 1)) for sae, s in zip(saes, sites)]


def _most_frequent(model, saes, batches, features, max_tracked: int, skip_positions: int) -> dict:
    """Site -> the max_tracked most frequent features in `batches`, for SAEs wider than max_tracked
    whose tracked features are not given."""
    sites = tuple(s.site for s in saes)
    counts = [np.zeros(s.d_sae, np.int64) for s in saes]
    for toks, rows in batches:
        valid = np.zeros(toks.shape, bool)
        valid[:rows, skip_positions:] = True
        fired = _firing_counts(model, tuple(saes), jnp.asarray(toks), jnp.asarray(valid), sites=sites)
        for c, x in zip(counts, fired):
            c += np.asarray(x)
    return {s.site: np.sort(np.argsort(-c, kind="stable")[:max_tracked]) for s, c in zip(saes, counts)
            if s.d_sae > max_tracked and s.site not in features}


def tracked_features(model, saes, tokens_or_batches, *, batch_size: int = 8, max_tracked: int = MAX_TRACKED,
                     selection_batches: int = 16, skip_positions: int = 0) -> dict[str, np.ndarray]:
    """The features `build_atlas` would track at each SAE wider than max_tracked (the most frequent in
    the first `selection_batches` batches). Atlases of parts of a corpus merge only when they track
    the same features: pass this, from the whole corpus, as `features=` to each part's build."""
    saes = list(check_saes(model, saes).values())
    head = list(itertools.islice(token_batches(tokens_or_batches, batch_size, model.vocab_size), selection_batches))
    if not any(s.d_sae > max_tracked for s in saes):
        return {}
    return _most_frequent(model, saes, head, {}, max_tracked, skip_positions)


def build_atlas(model, saes, tokens_or_batches, *, window: int = 5, position_window: int = 0, features=None,
                top_contexts: int = 8, batch_size: int = 8, progress: bool = True, corpus_hash: str | None = None,
                max_tracked: int = MAX_TRACKED, selection_batches: int = 16, max_active=None,
                context: tuple[int, int] = (12, 4), skip_positions: int = 0, method: str = "auto",
                hist_bins: int = 256, hist_range: tuple[float, float] = (1e-4, 1e4), exact_values: int = 64) -> Atlas:
    """Stream `tokens_or_batches` ([n_seq, seq] ints, or an iterable of such batches) through `model`
    and `saes` (one SAE per site) and return the :class:`Atlas`.

    window: site pairs whose layers differ by at most this (same-site pairs included).
    position_window: count j at positions p..p+w after i at p (0: same token).
    features: site -> feature ids whose pairs are counted; default all when d_sae <= max_tracked,
      else the max_tracked most frequent in the first `selection_batches` batches.
    max_active: active features kept per token (default the SAE's k for topk, else 128).
    skip_positions: positions < this are not counted (e.g. 1 to skip BOS).
    method: "sparse" (scatter; CPU), "dense" (one-hot matmuls; accelerators) or "auto".
    """
    saes = list(check_saes(model, saes).values())
    sites = tuple(s.site for s in saes)
    batches = token_batches(tokens_or_batches, batch_size, model.vocab_size)
    features = dict(features or {})
    if any(s.d_sae > max_tracked and s.site not in features for s in saes):
        head = list(itertools.islice(batches, selection_batches))
        features.update(_most_frequent(model, saes, head, features, max_tracked, skip_positions))
        batches = itertools.chain(head, batches)
    if max_active is None:
        max_active = {s.site: s.k for s in saes if s.architecture == "topk"}
    acc = AtlasAccumulator({s.site: s.d_sae for s in saes}, features=features, window=window,
                           position_window=position_window, top_contexts=top_contexts, context=context,
                           max_active=max_active, hist_bins=hist_bins, hist_range=hist_range,
                           exact_values=exact_values, skip_positions=skip_positions, method=method)
    total = None
    if getattr(tokens_or_batches, "ndim", None) == 2:
        total = -(-len(tokens_or_batches) // batch_size)
    batches = progress_iter(batches, total=total, desc="atlas", unit="batch", enabled=progress)
    for toks, rows in batches:
        acc.update_from_model(model, saes, toks, rows)
    atlas = Atlas.from_accumulator(acc, corpus_hash)
    dropped = {s: int(atlas.stats(s)["dropped"]) for s in sites}
    if any(dropped.values()):
        warnings.warn(f"some tokens had more active features than max_active ({acc.settings()['max_active']}); "
                      f"entries left out of histograms/contexts (and sparse pair counts): {dropped}", stacklevel=2)
    return atlas


def extend_atlas(atlas: Atlas, model, saes, tokens_or_batches, *, batch_size: int = 8, progress: bool = False,
                 corpus_hash: str | None = None) -> Atlas:
    """`atlas` merged with one built on more tokens (same sites, features and settings)."""
    s = atlas.settings
    more = build_atlas(model, saes, tokens_or_batches, window=s["window"], position_window=s["position_window"],
                       features=atlas.features, top_contexts=s["top_contexts"], batch_size=batch_size,
                       progress=progress, corpus_hash=corpus_hash, max_active=s["max_active"],
                       context=tuple(s["context"]), skip_positions=s["skip_positions"], method=s["method"],
                       hist_bins=s["hist_bins"], hist_range=tuple(s["hist_range"]), exact_values=s["exact_values"])
    return Atlas.merge(atlas, more)
