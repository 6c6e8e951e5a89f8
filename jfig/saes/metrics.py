"""How good an SAE or a transcoder is: reconstruction and sparsity on activations, and the downstream
loss cost.

:func:`activation_metrics` needs only activations; :func:`sae_metrics` also runs the model three
times per batch (clean, with the SAE's reconstruction spliced in at its site, and with the site
zero-ablated) to measure next-token cross-entropy. :func:`transcoder_pair_metrics` and
:func:`transcoder_metrics` are the same for a transcoder, whose output replaces its write site. Sums are taken in jitted fixed-size chunks and
combined on the host in float64, so the numbers do not depend on the chunk size beyond float32
rounding inside a chunk.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..edits import Edit, Patch, as_positions, where_positions
from jfig.errors import JfigError, ShapeError
from jfig.saes.sae import SAE
from jfig.saes.transcoder import Transcoder

DENSE_FREQUENCY = 0.1  # a latent active on more than this fraction of tokens counts as dense


# ---------------------------------------------------------------------------------- the splice edit


class Splice(Edit):
    """Replace a site's activations by ``sae.reconstruct`` of them (at ``positions``; all if None).

    Sites with head axes (``[batch, seq, n_heads, d_head]``) are flattened to ``[batch, seq,
    d_in]`` for SAEs that do not reshape hook_z input themselves."""

    sae: SAE
    positions: jax.Array | None = None

    def __init__(self, sae: SAE, positions=None):
        self.sae = sae
        self.positions = as_positions(positions)

    @property
    def site(self) -> str:
        return self.sae.site

    def apply(self, x, pos_axis: int = 1):
        if x.ndim > 3 and not self.sae.reshape_hook_z:
            recon = self.sae.reconstruct(x.reshape(*x.shape[:2], -1)).reshape(x.shape)
        else:
            recon = self.sae.reconstruct(x)
        return where_positions(self.positions, recon.astype(x.dtype), x, pos_axis)


# ---------------------------------------------------------------------------------- activation sums


def _sae_input(sae: SAE, x: jax.Array) -> jax.Array:
    """Rows ``[n, d_in]`` in the shape ``sae`` takes: ``[n, n_heads, d_head]`` for hook_z SAEs."""
    if not sae.reshape_hook_z:
        return x
    return x.reshape(x.shape[0], *(sae.hook_z_shape or (1, sae.d_in)))


@eqx.filter_jit
def _chunk_sums(sae: SAE, x: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over the rows of ``x [n, d_in]`` where ``mask [n]`` is True (see :func:`_reconstruction_sums`)."""
    x = x.astype(jnp.float32)
    xs = _sae_input(sae, x)
    f, stats = sae.encode_with_stats(xs)
    x_hat = sae.decode(f, stats).reshape(x.shape)
    return _reconstruction_sums(x, x_hat, f, mask)


def _reconstruction_sums(x: jax.Array, x_hat: jax.Array, f: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Sums over the rows of the target ``x [n, d]``, its reconstruction ``x_hat`` and the latents
    ``f [n, d_sae]`` where ``mask [n]`` is True.

    Returns n, mean [d] and m2 (sum ||x - mean||^2) of the chunk, for Chan's combination; err2
    (sum ||x - x_hat||^2), active (sum of L0) and fired [d_sae] (tokens each latent is active on).
    """
    w = mask.astype(jnp.float32)
    n = jnp.sum(w)
    mean = (w @ x) / jnp.maximum(n, 1.0)
    m2 = jnp.sum(w * jnp.sum((x - mean) ** 2, axis=-1))
    err2 = jnp.sum(w * jnp.sum((x - x_hat) ** 2, axis=-1))
    on = (f != 0).astype(jnp.float32) * w[:, None]  # [n, d_sae]
    return {"n": n, "mean": mean, "m2": m2, "err2": err2, "active": jnp.sum(on), "fired": jnp.sum(on, axis=0)}


class _Totals:
    """Host-side float64 accumulation of :func:`_chunk_sums` results."""

    def __init__(self, d_in: int, d_sae: int):
        self.n, self.mean, self.m2 = 0.0, np.zeros(d_in), 0.0
        self.err2 = self.active = 0.0
        self.fired = np.zeros(d_sae)

    def add(self, sums: dict[str, Any]) -> None:
        s = {key: np.asarray(value, np.float64) for key, value in jax.device_get(sums).items()}
        n_b = float(s["n"])
        if n_b == 0:
            return
        total = self.n + n_b
        delta = s["mean"] - self.mean
        self.m2 += float(s["m2"]) + float(delta @ delta) * self.n * n_b / total
        self.mean = self.mean + delta * (n_b / total)
        self.n = total
        self.err2 += float(s["err2"])
        self.active += float(s["active"])
        self.fired += s["fired"]

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ShapeError("no activations to measure: got 0 tokens")
        fvu = self.err2 / self.m2 if self.m2 > 0 else float("nan")
        frequency = self.fired / self.n
        return {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self.err2 / self.n,
            "l0": self.active / self.n,
            "dead_fraction": float(np.mean(frequency == 0)),
            "dense_fraction": float(np.mean(frequency > DENSE_FREQUENCY)),
            "n_tokens": int(self.n),
        }


def _check_finite(x: np.ndarray | jax.Array, what: str) -> None:
    if not bool(jnp.all(jnp.isfinite(x))):
        raise JfigError(f"{what} contain NaN or inf values; expected finite activations")


def activation_metrics(sae: SAE, acts, *, chunk_size: int = 8192) -> dict[str, float]:
    """Reconstruction and sparsity of ``sae`` on activations ``acts [..., d_in]`` (hook_z SAEs also
    take ``[..., n_heads, d_head]``).

    Returns ``fvu`` = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (mean over all tokens),
    ``explained_variance`` = 1 - fvu, ``mse`` (mean over tokens of ||x - x_hat||^2), ``l0`` (mean
    number of nonzero latents per token), ``dead_fraction`` (latents never active on ``acts``),
    ``dense_fraction`` (latents active on more than 10% of tokens) and ``n_tokens``.

    >>> sae = SAE.init_random(jax.random.key(0), 8, 32, "blocks.0.hook_resid_post")
    >>> m = activation_metrics(sae, jnp.ones((10, 8)))
    >>> sorted(m)[:3]
    ['dead_fraction', 'dense_fraction', 'explained_variance']
    """
    x = jnp.asarray(acts)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ShapeError(f"activations must be floating point; got dtype {x.dtype}")
    if x.size == 0 or x.size % sae.d_in != 0 or (x.shape[-1] != sae.d_in and not sae.reshape_hook_z):
        raise ShapeError(f"SAE at {sae.site} takes activations [..., d_in={sae.d_in}]; got shape {tuple(x.shape)}")
    x = x.reshape(-1, sae.d_in)
    _check_finite(x, f"activations for the SAE at {sae.site}")
    chunk = max(1, min(chunk_size, x.shape[0]))
    totals = _Totals(sae.d_in, sae.d_sae)
    for start in range(0, x.shape[0], chunk):
        rows = x[start:start + chunk]
        mask = jnp.ones((chunk,), bool).at[rows.shape[0]:].set(False)
        if rows.shape[0] < chunk:  # pad so every chunk has one shape and compiles once
            rows = jnp.concatenate([rows, jnp.zeros((chunk - rows.shape[0], sae.d_in), rows.dtype)])
        totals.add(_chunk_sums(sae, rows, mask))
    return totals.result()


# ---------------------------------------------------------------------------------- downstream loss


def _next_token_nll(logits: jax.Array, tokens: jax.Array, rows: jax.Array) -> jax.Array:
    """Sum over kept rows of -log p(tokens[:, t+1] | logits[:, t]) for t < seq - 1."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [batch, seq-1]
    return jnp.sum(nll * rows[:, None])


@eqx.filter_jit
def _batch_sums(model, sae: SAE, tokens: jax.Array, rows: jax.Array, exclude_first: bool):
    site = sae.site
    seq = tokens.shape[1]
    positions = jnp.arange(1, seq) if exclude_first else None
    clean = model.run(tokens, capture=(site,))
    spliced = model.run(tokens, edits=(Splice(sae, positions),)).logits
    zeroed = model.run(tokens, edits=(Patch(site, 0.0, positions),)).logits
    nll = {"ce_clean": _next_token_nll(clean.logits, tokens, rows),
           "ce_spliced": _next_token_nll(spliced, tokens, rows),
           "ce_zero": _next_token_nll(zeroed, tokens, rows)}
    acts = clean.cache[site]
    keep = rows[:, None] & ((jnp.arange(seq) >= 1) if exclude_first else jnp.ones((seq,), bool))[None, :]
    sums = _chunk_sums(sae, acts.reshape(-1, sae.d_in), keep.reshape(-1))
    return nll, sums


def sae_metrics(model, sae: SAE, tokens, *, batch_size: int = 32, exclude_first: bool = True) -> dict[str, float]:
    """:func:`activation_metrics` at ``sae.site`` plus the SAE's cost in next-token cross-entropy.

    ``tokens``: int ``[n_seq, seq]`` (or ``[seq]``), run ``batch_size`` sequences at a time.

    ``ce_clean``, ``ce_spliced`` and ``ce_zero`` are mean cross-entropies (nats) of predicting
    ``tokens[:, 1:]`` from the logits at positions ``0..seq-2``: of the clean model, with the site's
    activations replaced by ``sae.reconstruct`` of them, and with the site set to zero.
    ``ce_loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)`` (1 is perfect; NaN if
    zero-ablation costs nothing).

    With ``exclude_first`` (the default, matching :func:`jfig.saes.train.train_sae`, which trains
    without position 0) position 0 is left clean in the spliced and zero-ablated runs and is left
    out of the activation metrics: BOS activations are outliers that SAEs are not trained on.
    """
    site = model.check_site(sae.site)
    width = model.site_width(site)
    if width is not None and width != sae.d_in:
        raise ShapeError(f"SAE d_in {sae.d_in} does not match site {site} width {width}")
    tokens = _metric_tokens(model, tokens)
    return _ce_metrics(tokens, batch_size, _Totals(sae.d_in, sae.d_sae),
                       lambda batch, rows: _batch_sums(model, sae, batch, rows, exclude_first))


def _metric_tokens(model, tokens) -> np.ndarray:
    """``tokens`` as int ``[n_seq, seq]`` with at least 2 positions, checked against the model."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ShapeError(f"tokens must be an int array [n_seq, seq]; got dtype {tokens.dtype}, shape {tokens.shape}")
    if tokens.shape[1] < 2:
        raise ShapeError(f"tokens need at least 2 positions for next-token loss; got shape {tokens.shape}")
    model.check_tokens(tokens)  # vocabulary range, sequence length
    return tokens


def _ce_metrics(tokens: np.ndarray, batch_size: int, totals: _Totals, batch_sums) -> dict[str, float]:
    """Run ``batch_sums(batch, rows) -> (nll sums, reconstruction sums)`` over ``batch_size`` sequences
    at a time (the last batch padded with copies of its first row, masked out, to keep one shape);
    the activation metrics of ``totals`` plus the mean cross-entropies and ``ce_loss_recovered``."""
    n_seq, seq = tokens.shape
    bs = max(1, min(batch_size, n_seq))
    nll = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero": 0.0}
    for start in range(0, n_seq, bs):
        batch = tokens[start:start + bs]
        rows = np.arange(bs) < batch.shape[0]
        if batch.shape[0] < bs:  # pad with copies of the first row, masked out, to keep one shape
            batch = np.concatenate([batch, np.repeat(batch[:1], bs - batch.shape[0], axis=0)])
        batch_nll, sums = batch_sums(jnp.asarray(batch, jnp.int32), jnp.asarray(rows))
        for key, value in jax.device_get(batch_nll).items():
            nll[key] += float(value)
        totals.add(sums)
    n_pred = n_seq * (seq - 1)
    out = totals.result()
    out.update({key: value / n_pred for key, value in nll.items()})
    denom = out["ce_zero"] - out["ce_clean"]
    out["ce_loss_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / denom if denom != 0 else float("nan")
    return out


# ---------------------------------------------------------------------------------- transcoders


def _single_layer(transcoder: Transcoder, what: str) -> Transcoder:
    if not isinstance(transcoder, Transcoder):
        raise JfigError(f"{what} takes a jfig.saes.Transcoder, got {type(transcoder).__name__}")
    if transcoder.later_sites:
        raise JfigError(f"{what}: the transcoder {transcoder.read_site} -> {transcoder.write_site} is one layer of a "
                        f"cross-layer transcoder (it also writes {list(transcoder.later_sites)}); it measures "
                        f"single-layer transcoders")
    return transcoder


def _on_inputs(transcoder: Transcoder) -> Transcoder:
    """``transcoder`` taking its input ``x_in`` as given (any input norm taken as already applied)."""
    return dataclasses.replace(transcoder, input_norm="identity", norm_w=None, norm_b=None, norm_kind=None)


@eqx.filter_jit
def _pair_sums(transcoder: Transcoder, x: jax.Array, y: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    f = transcoder.encode(x)
    return _reconstruction_sums(y.astype(jnp.float32), transcoder.decode(f, x), f, mask)


def transcoder_pair_metrics(transcoder: Transcoder, x_in, y, *, chunk_size: int = 8192) -> dict[str, float]:
    """Reconstruction and sparsity of a transcoder on pairs: its input ``x_in [n, d_in]`` (for a
    transcoder reading at the MLP's input, after the model's norm, as training takes it) and the
    activations ``y [n, d_out]`` at its write site.

    The keys of :func:`activation_metrics`, of ``y``: ``fvu`` = sum ||y - y_hat||^2 / sum ||y -
    mean(y)||^2, ``explained_variance``, ``mse``, ``l0``, ``dead_fraction`` (latents never active
    on these pairs), ``dense_fraction`` and ``n_tokens``.
    """
    tc = _on_inputs(_single_layer(transcoder, "transcoder_pair_metrics"))
    x, y = jnp.asarray(x_in), jnp.asarray(y)
    for array, name, width in ((x, "x_in", tc.d_in), (y, "y", tc.d_out)):
        if not jnp.issubdtype(array.dtype, jnp.floating) or array.ndim != 2 or array.shape[1] != width \
                or array.shape[0] == 0:
            raise ShapeError(f"transcoder {tc.read_site} -> {tc.write_site}: {name} must be a non-empty float array "
                             f"[n, {width}]; got dtype {array.dtype}, shape {tuple(array.shape)}")
        _check_finite(array, f"{name} for the transcoder {tc.read_site} -> {tc.write_site}")
    if x.shape[0] != y.shape[0]:
        raise ShapeError(f"x_in has {x.shape[0]} rows but y has {y.shape[0]}; expected pairs")
    chunk = max(1, min(chunk_size, x.shape[0]))
    totals = _Totals(tc.d_out, tc.d_tc)
    for start in range(0, x.shape[0], chunk):
        xs, ys = x[start:start + chunk], y[start:start + chunk]
        mask = jnp.ones((chunk,), bool).at[xs.shape[0]:].set(False)
        if xs.shape[0] < chunk:  # pad so every chunk has one shape and compiles once
            xs = jnp.concatenate([xs, jnp.zeros((chunk - xs.shape[0], tc.d_in), xs.dtype)])
            ys = jnp.concatenate([ys, jnp.zeros((chunk - ys.shape[0], tc.d_out), ys.dtype)])
        totals.add(_pair_sums(tc, xs, ys, mask))
    return totals.result()


@eqx.filter_jit
def _transcoder_batch_sums(model, transcoder: Transcoder, tokens: jax.Array, rows: jax.Array, exclude_first: bool):
    site, out_site = transcoder.site, transcoder.out_site
    seq = tokens.shape[1]
    positions = jnp.arange(1, seq) if exclude_first else None
    clean = model.run(tokens, capture=(site, out_site))
    x = clean.cache[site]
    f = transcoder.encode(x)  # [batch, seq, d_tc]
    y_hat = transcoder.decode(f, x)  # [batch, seq, d_out]
    spliced = model.run(tokens, edits=(Patch(out_site, y_hat, positions),)).logits
    zeroed = model.run(tokens, edits=(Patch(out_site, 0.0, positions),)).logits
    nll = {"ce_clean": _next_token_nll(clean.logits, tokens, rows),
           "ce_spliced": _next_token_nll(spliced, tokens, rows),
           "ce_zero": _next_token_nll(zeroed, tokens, rows)}
    keep = rows[:, None] & ((jnp.arange(seq) >= 1) if exclude_first else jnp.ones((seq,), bool))[None, :]
    y = clean.cache[out_site].astype(jnp.float32)
    sums = _reconstruction_sums(y.reshape(-1, transcoder.d_out), y_hat.reshape(-1, transcoder.d_out),
                                f.reshape(-1, transcoder.d_tc), keep.reshape(-1))
    return nll, sums


def transcoder_metrics(model, transcoder: Transcoder, tokens, *, batch_size: int = 32,
                       exclude_first: bool = True) -> dict[str, float]:
    """How well a transcoder stands in for its write site, on ``tokens [n_seq, seq]``.

    The keys of :func:`transcoder_pair_metrics` (FVU and the rest of the write site's activations,
    L0 and dead fraction of the latents), measured on the model's activations, plus next-token
    cross-entropies as :func:`sae_metrics` gives them: ``ce_clean``; ``ce_spliced``, with the write
    site's activations replaced by the transcoder's output for the clean run's read-site
    activations (a ``Patch``: for an MLP transcoder, the MLP's output is the transcoder's and nothing
    else); ``ce_zero``, with the write site set to zero; and ``ce_loss_recovered = (ce_zero -
    ce_spliced) / (ce_zero - ce_clean)``. The read site comes before the write site, so patching the
    write site leaves the transcoder's input as in the clean run.

    ``exclude_first`` leaves position 0 clean and out of the activation metrics, as for SAEs. A
    transcoder reading at the MLP's input gets the model's norm if it has none attached.
    """
    tc = _single_layer(transcoder, "transcoder_metrics")
    for site, width, name in ((tc.site, tc.d_in, "d_in"), (tc.out_site, tc.d_out, "d_out")):
        model.check_site(site)
        want = model.site_width(site)
        if want is not None and want != width:
            raise ShapeError(f"transcoder {name} {width} does not match site {site} width {want}")
    if tc.input_norm == "unset":
        tc = tc.with_input_norm(model)
    tokens = _metric_tokens(model, tokens)
    return _ce_metrics(tokens, batch_size, _Totals(tc.d_out, tc.d_tc),
                       lambda batch, rows: _transcoder_batch_sums(model, tc, batch, rows, exclude_first))
