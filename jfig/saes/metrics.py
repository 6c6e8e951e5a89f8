"""How good an SAE is: reconstruction and sparsity on activations, and the downstream loss cost.

:func:`activation_metrics` needs only activations; :func:`sae_metrics` also runs the model three
times per batch (clean, with the SAE's reconstruction spliced in at its site, and with the site
zero-ablated) to measure next-token cross-entropy. Sums are taken in jitted fixed-size chunks and
combined on the host in float64, so the numbers do not depend on the chunk size beyond float32
rounding inside a chunk.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..edits import Edit, Patch, as_positions, where_positions
from jfig.errors import JfigError, ShapeError
from jfig.saes.sae import SAE

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
    """Sums over the rows of ``x [n, d_in]`` where ``mask [n]`` is True.

    Returns n, mean [d_in] and m2 (sum ||x - mean||^2) of the chunk, for Chan's combination; err2
    (sum ||x - x_hat||^2), active (sum of L0) and fired [d_sae] (tokens each latent is active on).
    """
    x = x.astype(jnp.float32)
    w = mask.astype(jnp.float32)
    n = jnp.sum(w)
    mean = (w @ x) / jnp.maximum(n, 1.0)
    m2 = jnp.sum(w * jnp.sum((x - mean) ** 2, axis=-1))
    xs = _sae_input(sae, x)
    f, stats = sae.encode_with_stats(xs)
    x_hat = sae.decode(f, stats).reshape(x.shape)
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
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ShapeError(f"tokens must be an int array [n_seq, seq]; got dtype {tokens.dtype}, shape {tokens.shape}")
    if tokens.shape[1] < 2:
        raise ShapeError(f"tokens need at least 2 positions for next-token loss; got shape {tokens.shape}")
    model.check_tokens(tokens)  # vocabulary range, sequence length
    n_seq, seq = tokens.shape
    bs = max(1, min(batch_size, n_seq))
    totals = _Totals(sae.d_in, sae.d_sae)
    nll = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero": 0.0}
    for start in range(0, n_seq, bs):
        batch = tokens[start:start + bs]
        rows = np.arange(bs) < batch.shape[0]
        if batch.shape[0] < bs:  # pad with copies of the first row, masked out, to keep one shape
            batch = np.concatenate([batch, np.repeat(batch[:1], bs - batch.shape[0], axis=0)])
        batch_nll, sums = _batch_sums(model, sae, jnp.asarray(batch, jnp.int32), jnp.asarray(rows), exclude_first)
        for key, value in jax.device_get(batch_nll).items():
            nll[key] += float(value)
        totals.add(sums)
    n_pred = n_seq * (seq - 1)
    out = totals.result()
    out.update({key: value / n_pred for key, value in nll.items()})
    denom = out["ce_zero"] - out["ce_clean"]
    out["ce_loss_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / denom if denom != 0 else float("nan")
    return out
