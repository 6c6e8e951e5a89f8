"""How much an NFM (:mod:`jfig.saes.nfm`) adds to an SAE, on held-out tokens: reconstruction error and
next-token cross-entropy with the site replaced by the SAE's reconstruction, by the reconstruction
with the NFM's correction, with the correction's linear part only, and (the baseline) by the
reconstruction plus a secondary SAE's reconstruction of the error; and the split of the NFM's output
between its linear and interaction parts.

One jitted function per batch runs the model clean (capturing the site), encodes, and runs it again
with each candidate spliced in at every position but 0 (the SAE trainer leaves position 0 out);
sums go to the host per batch and are combined in float64 (means and squared deviations by Chan's
formula, since residual-stream activations have a large mean).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jfig.edits import Patch
from jfig.errors import JfigError, ShapeError
from jfig.saes.nfm import NFM
from jfig.saes.sae import SAE


def next_token_nll(logits: jax.Array, tokens: jax.Array, rows: jax.Array) -> jax.Array:
    """Sum over kept ``rows [batch]`` of ``-log p(tokens[:, t+1] | logits[:, t])``, t < seq - 1."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [batch, seq-1]
    return jnp.sum(nll * rows[:, None])


def moment_sums(v: jax.Array, w: jax.Array) -> dict[str, jax.Array]:
    """Weighted count, mean ``[d]`` and ``m2 = sum w ||v - mean||^2`` of rows ``v [n, d]`` (weights
    ``w [n]``), the pieces :class:`Moments` combines."""
    n = jnp.sum(w)
    mean = (w @ v) / jnp.maximum(n, 1.0)
    return {"n": n, "mean": mean, "m2": jnp.sum(w * jnp.sum((v - mean) ** 2, axis=-1))}


class Moments:
    """Host-side float64 combination of :func:`moment_sums` by Chan's parallel formula."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0.0, None, 0.0

    def add(self, s: dict[str, Any]) -> None:
        n_b = float(s["n"])
        if n_b == 0:
            return
        mean_b = np.asarray(s["mean"], np.float64)
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, float(s["m2"])
            return
        total = self.n + n_b
        delta = mean_b - self.mean
        self.m2 += float(s["m2"]) + float(delta @ delta) * self.n * n_b / total
        self.mean = self.mean + delta * (n_b / total)
        self.n = total


def check_nfm(model: Any, sae: SAE, nfm: NFM, secondary: SAE | None = None) -> str:
    """The site, after checking that ``sae`` fits the model there and ``nfm`` (and ``secondary``) fit
    ``sae``: same site, ``nfm`` reading ``d_sae`` features and writing ``d_in`` outputs."""
    if not isinstance(nfm, NFM):
        raise JfigError(f"expected a jfig.saes.NFM, got {type(nfm).__name__}")
    if not isinstance(sae, SAE):
        raise JfigError(f"expected the NFM's jfig.saes.SAE, got {type(sae).__name__}")
    site = model.check_site(sae.site)
    width = model.site_width(site)
    if width is not None and width != sae.d_in:
        raise ShapeError(f"SAE d_in {sae.d_in} does not match site {site} width {width}")
    if nfm.site != sae.site or nfm.n_features != sae.d_sae or nfm.d_out != sae.d_in:
        raise ShapeError(f"the NFM reads {nfm.n_features} features at {nfm.site} and writes {nfm.d_out}; the SAE has "
                         f"d_sae {sae.d_sae} and d_in {sae.d_in} at {sae.site}: expected the NFM trained on this SAE")
    if secondary is not None and (not isinstance(secondary, SAE) or secondary.d_in != sae.d_in):
        raise ShapeError(f"the secondary SAE must be a jfig.saes.SAE with d_in {sae.d_in} (it reads the first SAE's "
                         f"error); got {type(secondary).__name__} with d_in {getattr(secondary, 'd_in', None)}")
    return site


def metric_tokens(model: Any, tokens: Any) -> np.ndarray:
    """``tokens`` as int ``[n_seq, seq]`` with at least 2 positions, checked against the model."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0:
        raise ShapeError(f"tokens must be a non-empty int array [n_seq, seq]; got dtype {tokens.dtype}, shape "
                         f"{tokens.shape}")
    if tokens.shape[1] < 2:
        raise ShapeError(f"tokens need at least 2 positions for next-token loss; got shape {tokens.shape}")
    model.check_tokens(tokens)
    return tokens


def site_parts(sae: SAE, nfm: NFM, x: jax.Array) -> dict[str, jax.Array]:
    """For activations ``x [..., d]``: ``x_hat``, the NFM's ``base`` (``x_hat`` for target "error", 0
    for "next"), ``y`` (its target), ``lin``, ``inter`` (its two parts, ``[..., d]`` each) and ``f``."""
    x = x.astype(jnp.float32)
    f, stats = sae.encode_with_stats(x)
    x_hat = sae.decode(f, stats).reshape(x.shape)
    lin, inter = nfm.parts(f)
    base = x_hat if nfm.target == "error" else jnp.zeros_like(x)
    return {"x": x, "f": f, "x_hat": x_hat, "base": base, "y": x - base, "lin": lin, "inter": inter}


@eqx.filter_jit
def _batch(model, sae: SAE, nfm: NFM, secondary: SAE | None, tokens: jax.Array, rows: jax.Array):
    site = sae.site
    seq = tokens.shape[1]
    positions = jnp.arange(1, seq)
    clean = model.run(tokens, capture=(site,))
    p = site_parts(sae, nfm, clean.cache[site])
    x, base, lin, inter = p["x"], p["base"], p["lin"], p["inter"]
    recon = {"sae": p["x_hat"], "nfm": base + lin + inter, "nfm_linear": base + lin,
             "nfm_interaction": base + nfm.b + inter}
    if secondary is not None:
        recon["secondary"] = p["x_hat"] + secondary.reconstruct(x - p["x_hat"])
    nll = {"ce_clean": next_token_nll(clean.logits, tokens, rows)}
    for name, value in recon.items():
        if name != "nfm_interaction":
            logits = model.run(tokens, edits=(Patch(site, value, positions),)).logits
            nll[f"ce_{name}"] = next_token_nll(logits, tokens, rows)
    w = (rows[:, None] & (jnp.arange(seq) >= 1)[None, :]).reshape(-1).astype(jnp.float32)
    flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    sums = {f"err2_{name}": jnp.sum(w * jnp.sum(flat(x - value) ** 2, axis=-1)) for name, value in recon.items()}
    moments = {"x": moment_sums(flat(x), w), "y": moment_sums(flat(p["y"]), w), "lin": moment_sums(flat(lin), w),
               "inter": moment_sums(flat(inter), w)}
    norms = {"norm_linear": jnp.sum(w * jnp.linalg.norm(flat(lin - nfm.b), axis=-1)),
             "norm_interaction": jnp.sum(w * jnp.linalg.norm(flat(inter), axis=-1))}
    return nll, sums, moments, norms


def nfm_metrics(model: Any, sae: SAE, nfm: NFM, tokens: Any, *, secondary: SAE | None = None,
                batch_size: int = 16) -> dict[str, float]:
    """What ``nfm`` (and the ``secondary`` SAE, the baseline) add to ``sae`` on held-out int ``tokens
    [n_seq, seq]``, position 0 left clean and out of every sum. Keys (floats):

    - ``fvu_sae``, ``fvu_nfm``, ``fvu_nfm_linear``, ``fvu_secondary``: ``sum ||x - r||^2 / sum ||x -
      mean x||^2`` for ``r`` the SAE's reconstruction ``x_hat``, the NFM-corrected one (``x_hat + y_hat``;
      ``y_hat`` alone for target "next"), the corrected one with the interaction part zeroed, and
      ``x_hat`` plus the secondary SAE's reconstruction of ``x - x_hat``; ``mse_*`` the same sums per token;
    - ``error_reduction_nfm``, ``error_reduction_secondary``, ``error_reduction_linear``: ``1 - err / err_sae``
      (the relative reduction of the SAE's squared error the seed reports); ``error_reduction_interaction``:
      what the interaction part adds on top of the linear part, ``(err_linear - err_nfm) / err_sae``;
    - ``explained_linear``, ``explained_interaction``, ``explained_nfm``: the fraction of the target's
      variance (``x - x_hat``, or ``x`` for "next") explained by the linear part alone, the interaction part
      alone (with the bias ``b``) and both;
    - ``var_linear``, ``var_interaction`` (per-token variance of each part's output), ``interaction_share =
      var_interaction / (var_linear + var_interaction)``, ``norm_linear`` / ``norm_interaction`` (mean
      output norms; the linear part without ``b``), ``norm_ratio`` (the seed's "mean weights" split);
    - ``ce_clean``, ``ce_sae``, ``ce_nfm``, ``ce_nfm_linear``, ``ce_secondary``: mean next-token
      cross-entropy (nats) with the site replaced by each reconstruction; ``ce_recovered_nfm`` /
      ``ce_recovered_secondary`` / ``ce_recovered_linear``: ``(ce_sae - ce) / (ce_sae - ce_clean)``, the
      fraction of the SAE's loss cost removed; ``n_tokens``.

    Raises ShapeError / SiteError when the SAE does not fit the model or the NFM the SAE."""
    check_nfm(model, sae, nfm, secondary)
    tokens = metric_tokens(model, tokens)
    n_seq, seq = tokens.shape
    bs = max(1, min(batch_size, n_seq))
    nll: dict[str, float] = {}
    sums: dict[str, float] = {}
    moments = {key: Moments() for key in ("x", "y", "lin", "inter")}
    for start in range(0, n_seq, bs):
        batch = tokens[start:start + bs]
        rows = np.arange(bs) < batch.shape[0]
        if batch.shape[0] < bs:  # pad with copies of the first row, masked out, to keep one shape
            batch = np.concatenate([batch, np.repeat(batch[:1], bs - batch.shape[0], axis=0)])
        b_nll, b_sums, b_moments, b_norms = jax.device_get(_batch(model, sae, nfm, secondary,
                                                                  jnp.asarray(batch, jnp.int32), jnp.asarray(rows)))
        for out, part in ((nll, b_nll), (sums, {**b_sums, **b_norms})):
            for key, value in part.items():
                out[key] = out.get(key, 0.0) + float(value)
        for key, m in moments.items():
            m.add(b_moments[key])
    n = moments["x"].n
    if not n:
        raise ShapeError("no tokens to measure: every sequence has only position 0")
    out: dict[str, float] = {"n_tokens": n}
    m2_x, m2_y = moments["x"].m2, moments["y"].m2
    for name in ("sae", "nfm", "nfm_linear", "secondary"):
        if f"err2_{name}" in sums:
            out[f"fvu_{name}"] = sums[f"err2_{name}"] / m2_x
            out[f"mse_{name}"] = sums[f"err2_{name}"] / n
    err_sae = sums["err2_sae"]
    out["error_reduction_nfm"] = 1.0 - sums["err2_nfm"] / err_sae
    out["error_reduction_linear"] = 1.0 - sums["err2_nfm_linear"] / err_sae
    out["error_reduction_interaction"] = (sums["err2_nfm_linear"] - sums["err2_nfm"]) / err_sae
    if secondary is not None:
        out["error_reduction_secondary"] = 1.0 - sums["err2_secondary"] / err_sae
    out["explained_linear"] = 1.0 - sums["err2_nfm_linear"] / m2_y
    out["explained_interaction"] = 1.0 - sums["err2_nfm_interaction"] / m2_y
    out["explained_nfm"] = 1.0 - sums["err2_nfm"] / m2_y
    out["var_linear"], out["var_interaction"] = moments["lin"].m2 / n, moments["inter"].m2 / n
    total_var = out["var_linear"] + out["var_interaction"]
    out["interaction_share"] = out["var_interaction"] / total_var if total_var > 0 else float("nan")
    out["norm_linear"], out["norm_interaction"] = sums["norm_linear"] / n, sums["norm_interaction"] / n
    out["norm_ratio"] = out["norm_linear"] / out["norm_interaction"] if out["norm_interaction"] > 0 else float("inf")
    n_pred = n_seq * (seq - 1)
    for key, value in nll.items():
        out[key] = value / n_pred
    gap = out["ce_sae"] - out["ce_clean"]
    for name, key in (("nfm", "ce_nfm"), ("linear", "ce_nfm_linear"), ("secondary", "ce_secondary")):
        if key in out:
            out[f"ce_recovered_{name}"] = (out["ce_sae"] - out[key]) / gap if gap != 0 else float("nan")
    return out
