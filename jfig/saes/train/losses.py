"""Training losses on top of the SAE's own encoder (:mod:`jfig.saes.sae`), and the same losses for
transcoders.

The encoding is :meth:`SAE.pre_activations` followed by :meth:`SAE.activation` (or
:meth:`SAE.topk` for the sparse TopK path); only what training adds lives here. ``x`` is a batch
scaled by ``state.scale``, ``mse = mean_batch ||x - x_hat||^2``:

- topk: ``mse + aux_coeff * auxk``. AuxK (Gao et al. 2024, "Scaling and evaluating sparse
  autoencoders") reconstructs the main error ``e = x - x_hat`` from the ``aux_k`` largest
  pre-activations among dead latents: ``||e - e_hat||^2 / ||e - mean(e)||^2`` over the batch
  (0 while no latent is dead).
- jumprelu: ``mse + sparsity_coeff * L0`` with ``f = z * H(z - theta)``, ``theta =
  exp(log_threshold)``. The step function's derivative in ``theta`` is replaced by the rectangle
  kernel ``-(1/eps) K((z - theta)/eps)`` (Rajamanoharan et al. 2024, "Jumping Ahead"), in both the
  reconstruction (times ``theta``) and the L0 term; ``z`` gets no gradient from L0.
- relu: ``mse + l1_coeff * mean_batch sum_i f_i ||W_dec_i||``.

A transcoder (:func:`transcoder_loss`) reconstructs its output ``y`` from its input ``x``
(both scaled): ``pre = x @ W_enc + b_enc``, ``y_hat = f @ W_dec + b_dec (+ x @ W_skip)``,
``mse = mean_batch ||y - y_hat||^2``, with the same three sparsity terms (AuxK reconstructs
``y - y_hat``). Its TopK keeps the k largest raw pre-activations, as
:meth:`jfig.saes.Transcoder.activation` does, so training and inference encode alike.
:func:`dictionary_loss` is the part the two share.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jfig.saes.sae import SAE
from jfig.saes.train.config import TrainConfig

TRAINING_SITE = "training"  # site name of the SAE the loss builds; the inference SAE gets the real one


def rectangle(u: jax.Array) -> jax.Array:
    """K(u) = 1 on (-1/2, 1/2), else 0."""
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _sum_to(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jnp.sum(g, axis=tuple(range(g.ndim - len(shape)))).reshape(shape)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """``z * H(z - theta)``; d/dz = H(z - theta), d/dtheta = -(theta/eps) K((z - theta)/eps)."""
    return z * (z > theta)


def _jumprelu_fwd(z, theta, bandwidth):
    return jumprelu(z, theta, bandwidth), (z, theta)


def _jumprelu_bwd(bandwidth, res, g):
    z, theta = res
    dz = (z > theta) * g
    dtheta = -(theta / bandwidth) * rectangle((z - theta) / bandwidth) * g
    return dz, _sum_to(dtheta, theta.shape)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside_step(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """``H(z - theta)``; d/dz = 0, d/dtheta = -(1/eps) K((z - theta)/eps)."""
    return (z > theta).astype(z.dtype)


def _step_fwd(z, theta, bandwidth):
    return heaviside_step(z, theta, bandwidth), (z, theta)


def _step_bwd(bandwidth, res, g):
    z, theta = res
    dtheta = -(1.0 / bandwidth) * rectangle((z - theta) / bandwidth) * g
    return jnp.zeros_like(z), _sum_to(dtheta, theta.shape)


heaviside_step.defvjp(_step_fwd, _step_bwd)


def sparse_decode(values: jax.Array, index: jax.Array, W_dec: jax.Array) -> jax.Array:
    """sum_j values[b, j] * W_dec[index[b, j]]: ``[batch, k] x [batch, k] -> [batch, d_in]``."""
    return jnp.einsum("bk,bkd->bd", values, W_dec[index])


def fvu(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """Fraction of variance unexplained over a batch ``[batch, d_in]``: a scalar."""
    return jnp.sum((x - x_hat) ** 2) / jnp.sum((x - jnp.mean(x, axis=0)) ** 2)


def training_sae(params: dict[str, jax.Array], cfg: TrainConfig, site: str = TRAINING_SITE, **static: Any) -> SAE:
    """The SAE that ``params`` (scaled-input units) describe; jumprelu gets ``threshold =
    exp(log_threshold)``. ``static`` sets other static SAE fields (e.g. ``metadata``)."""
    threshold = jnp.exp(params["log_threshold"]) if cfg.architecture == "jumprelu" else None
    return SAE(W_enc=params["W_enc"], b_enc=params["b_enc"], W_dec=params["W_dec"], b_dec=params["b_dec"],
               site=site, threshold=threshold, architecture=cfg.architecture, k=cfg.k, **static)


def sae_loss(params: dict[str, jax.Array], x: jax.Array, dead: jax.Array,
             cfg: TrainConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and aux outputs (mse, fvu, l0, sparsity_loss, fired ``[d_sae]``) for a scaled batch
    ``x [batch, d_in]``; ``dead [d_sae]`` bool marks latents for AuxK."""
    sae = training_sae(params, cfg)
    pre = sae.pre_activations(x)  # [batch, d_sae]
    return dictionary_loss(pre, x, sae.W_dec, sae.b_dec, sae.threshold, dead, cfg)


def transcoder_loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array, dead: jax.Array,
                    cfg: TrainConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and aux outputs, as :func:`sae_loss`'s, of a transcoder on a scaled batch: input
    ``x [batch, d_in]``, output ``y [batch, d_out]``. ``params``: ``W_enc [d_in, d_tc]``, ``b_enc``,
    ``W_dec [d_tc, d_out]``, ``b_dec [d_out]``, optional ``W_skip [d_in, d_out]`` and, for
    jumprelu, ``log_threshold [d_tc]``."""
    pre = x @ params["W_enc"] + params["b_enc"]  # [batch, d_tc]
    offset = params["b_dec"] if "W_skip" not in params else params["b_dec"] + x @ params["W_skip"]
    threshold = jnp.exp(params["log_threshold"]) if cfg.architecture == "jumprelu" else None
    return dictionary_loss(pre, y, params["W_dec"], offset, threshold, dead, cfg, relu_topk=False)


def dictionary_loss(pre: jax.Array, target: jax.Array, W_dec: jax.Array, offset: jax.Array,
                    threshold: jax.Array | None, dead: jax.Array, cfg: TrainConfig, *,
                    relu_topk: bool = True, dense_decode: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss shared by SAEs and transcoders: pre-activations ``pre [batch, d_sae]`` reconstruct
    ``target [batch, d]`` as ``f @ W_dec + offset`` (``offset``: ``b_dec [d]``, or ``[batch, d]``
    with a skip connection), plus the architecture's sparsity term (module docstring). TopK keeps
    the k largest pre-activations, relu'd when ``relu_topk`` (SAEs) or raw (transcoders). ``dense_decode``
    decodes TopK's k values as a dense ``[batch, d_sae]`` matmul instead of gathering k decoder rows per
    token: the same numbers up to summation order, and far faster for wide targets (a crosscoder's
    stacked layers), where the gather and its scatter-add gradient move ``batch * k * d`` floats."""
    if cfg.architecture == "topk":
        values, index = jax.lax.top_k(pre, cfg.k)  # [batch, k]
        if relu_topk:
            values = jax.nn.relu(values)
        dense = _scatter_last(values, index, cfg.d_sae) if dense_decode else None
        y_hat = (dense @ W_dec if dense_decode else sparse_decode(values, index, W_dec)) + offset
        on = values != 0
        fired = jnp.zeros((cfg.d_sae,), jnp.int32).at[index.reshape(-1)].add(on.reshape(-1).astype(jnp.int32))
        l0 = jnp.mean(jnp.sum(on, axis=-1))
        sparsity = dead_latent_fvu(pre, dead, jax.lax.stop_gradient(target - y_hat), W_dec,
                                   cfg.resolved_aux_k(target.shape[-1]), dense_decode=dense_decode)
        coeff = cfg.aux_coeff
    elif cfg.architecture == "jumprelu":
        bandwidth = cfg.jumprelu_bandwidth
        f = jumprelu(pre, threshold, bandwidth)
        y_hat = f @ W_dec + offset
        fired = jnp.sum(f != 0, axis=0)
        l0 = jnp.mean(jnp.sum(f != 0, axis=-1))
        sparsity = jnp.mean(jnp.sum(heaviside_step(pre, threshold, bandwidth), axis=-1))
        coeff = cfg.jumprelu_sparsity_coeff
    else:
        f = jax.nn.relu(pre)
        y_hat = f @ W_dec + offset
        fired = jnp.sum(f > 0, axis=0)
        l0 = jnp.mean(jnp.sum(f > 0, axis=-1))
        sparsity = jnp.mean(f @ jnp.linalg.norm(W_dec, axis=-1))
        coeff = cfg.l1_coeff
    mse = jnp.mean(jnp.sum((target - y_hat) ** 2, axis=-1))
    loss = mse + coeff * sparsity
    return loss, {"mse": mse, "fvu": fvu(target, y_hat), "l0": l0, "sparsity_loss": sparsity, "fired": fired}


def auxk_loss(sae: SAE, pre: jax.Array, dead: jax.Array, error: jax.Array, aux_k: int) -> jax.Array:
    """AuxK: the top ``aux_k`` dead latents of ``pre [batch, d_sae]`` reconstruct ``error [batch,
    d_in]``; FVU of that reconstruction, 0 when no latent is dead (under ``lax.cond``, so batches
    without dead latents skip the second top-k)."""
    return dead_latent_fvu(pre, dead, error, sae.W_dec, aux_k)


def dead_latent_fvu(pre: jax.Array, dead: jax.Array, error: jax.Array, W_dec: jax.Array, aux_k: int, *,
                    dense_decode: bool = False) -> jax.Array:
    """AuxK for any dictionary with decoder ``W_dec [d_sae, d]``: the ``aux_k`` largest relu'd
    pre-activations among dead latents reconstruct ``error [batch, d]`` (see :func:`auxk_loss`);
    ``dense_decode`` as in :func:`dictionary_loss` (the gather would hold ``batch * aux_k * d`` floats,
    and XLA reserves the branch's buffers even while no latent is dead)."""

    def auxk(pre: jax.Array, W_dec: jax.Array) -> jax.Array:
        values, index = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), aux_k)
        values = jnp.where(dead[index], jax.nn.relu(values), 0.0)
        e_hat = (_scatter_last(values, index, pre.shape[-1]) @ W_dec if dense_decode
                 else sparse_decode(values, index, W_dec))
        return jnp.nan_to_num(fvu(error, e_hat))

    return jax.lax.cond(jnp.any(dead), auxk, lambda *_: jnp.zeros((), pre.dtype), pre, W_dec)


def clt_mask(n_layers: int) -> jax.Array:
    """``[L, 1, L, 1]``: 1 where write layer m >= read layer l (a CLT's decoder ``[L, d_tc, L, d]``)."""
    return jnp.triu(jnp.ones((n_layers, n_layers), jnp.float32))[:, None, :, None]


def clt_decoder_norms(W_dec: jax.Array) -> jax.Array:
    """``[L, d_tc]``: each feature's decoder norm over every layer it writes (its rows concatenated)."""
    return jnp.sqrt(jnp.sum((W_dec * clt_mask(W_dec.shape[0])) ** 2, axis=(-2, -1)))


def clt_loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array, dead: jax.Array,
             cfg: TrainConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and aux outputs, as :func:`transcoder_loss`'s, of a cross-layer transcoder on a
    scaled batch: inputs ``x [batch, L, d_in]`` (one per read layer), outputs ``y [batch, L, d_out]``.

    ``params``: ``W_enc [L, d_in, d_tc]``, ``b_enc [L, d_tc]``, ``W_dec [L, d_tc, L, d_out]`` (read
    layer, latent, write layer; entries with write layer < read layer masked out), ``b_dec [L,
    d_out]`` and, for jumprelu, ``log_threshold [L, d_tc]``. ``y_hat_m = sum_{l <= m} f_l
    W_dec[l, :, m] + b_dec[m]``; ``mse = mean_batch sum_m ||y_m - y_hat_m||^2``; ``fvu`` pools every
    layer. The sparsity terms are :func:`dictionary_loss`'s summed over read layers, with a feature's
    decoder norm taken over all the layers it writes; TopK keeps the k largest raw pre-activations of
    each layer and AuxK reconstructs every layer's error from each layer's ``aux_k`` largest dead
    latents; ``dead [L, d_tc]``."""
    n_layers = x.shape[1]
    W_dec = params["W_dec"] * clt_mask(n_layers)
    pre = jnp.einsum("bld,ldf->blf", x, params["W_enc"]) + params["b_enc"]  # [batch, L, d_tc]
    decode = lambda f: jnp.einsum("blf,lfmo->bmo", f, W_dec)  # noqa: E731
    if cfg.architecture == "topk":
        values, index = jax.lax.top_k(pre, cfg.k)  # [batch, L, k]
        f = _scatter_last(values, index, cfg.d_sae)
        on = f != 0
        y_hat = decode(f) + params["b_dec"]
        aux_k = cfg.resolved_aux_k(y.shape[-1])

        def auxk(pre: jax.Array, W_dec: jax.Array) -> jax.Array:
            values, index = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), aux_k)
            values = jnp.where(jnp.take_along_axis(jnp.broadcast_to(dead, pre.shape), index, -1),
                               jax.nn.relu(values), 0.0)
            error = jax.lax.stop_gradient(y - y_hat).reshape(y.shape[0], -1)
            e_hat = jnp.einsum("blf,lfmo->bmo", _scatter_last(values, index, cfg.d_sae), W_dec)
            return jnp.nan_to_num(fvu(error, e_hat.reshape(y.shape[0], -1)))

        sparsity = jax.lax.cond(jnp.any(dead), auxk, lambda *_: jnp.zeros((), pre.dtype), pre, W_dec)
        coeff = cfg.aux_coeff
    elif cfg.architecture == "jumprelu":
        threshold = jnp.exp(params["log_threshold"])
        bandwidth = cfg.jumprelu_bandwidth
        f = jumprelu(pre, threshold, bandwidth)
        on = f != 0
        y_hat = decode(f) + params["b_dec"]
        sparsity = jnp.mean(jnp.sum(heaviside_step(pre, threshold, bandwidth), axis=(-2, -1)))
        coeff = cfg.jumprelu_sparsity_coeff
    else:
        f = jax.nn.relu(pre)
        on = f > 0
        y_hat = decode(f) + params["b_dec"]
        sparsity = jnp.mean(jnp.sum(f * clt_decoder_norms(W_dec), axis=(-2, -1)))
        coeff = cfg.l1_coeff
    fired = jnp.sum(on, axis=0)  # [L, d_tc]
    l0 = jnp.mean(jnp.sum(on, axis=(-2, -1)))
    mse = jnp.mean(jnp.sum((y - y_hat) ** 2, axis=(-2, -1)))
    loss = mse + coeff * sparsity
    flat = lambda a: a.reshape(a.shape[0], -1)  # noqa: E731
    return loss, {"mse": mse, "fvu": fvu(flat(y), flat(y_hat)), "l0": l0, "sparsity_loss": sparsity, "fired": fired}


def _scatter_last(values: jax.Array, index: jax.Array, size: int) -> jax.Array:
    """Dense ``[..., size]`` holding ``values [..., k]`` at ``index [..., k]`` along the last axis."""
    lead = values.shape[:-1]
    flat_v, flat_i = values.reshape(-1, values.shape[-1]), index.reshape(-1, index.shape[-1])
    rows = jnp.arange(flat_i.shape[0])[:, None]
    return jnp.zeros((flat_i.shape[0], size), values.dtype).at[rows, flat_i].set(flat_v).reshape(*lead, size)


def interaction_penalty(f: jax.Array, W_dec: jax.Array, readers: jax.Array) -> jax.Array:
    """The crosscoder's interaction penalty on a batch: ``f [batch, n]`` activations, ``W_dec [n, L, d]``
    decoder rows (training units), ``readers [L, d, F, c]`` unit read directions of the F neurons of the
    MLP reading each layer (c = 1 plain, 2 gated: up and gate). With ``w_ilm = sum_c (W_dec[i, l] .
    r_lmc)^2``, feature i's squared footprint on neuron m, the penalty is

        mean_batch sum_l sum_{i != j} f_i f_j sum_m w_ilm w_jlm,

    the co-activation-weighted squared Hadamard overlap ``||v_i * v_j||^2`` of every co-active pair
    (two features feeding one neuron at once is where a nonlinearity stops distributing over them).
    Computed as ``sum_m (f @ w)^2 - f^2 @ w^2`` per layer: O(batch * n * F), no pair loop."""
    u = jnp.einsum("nld,ldfc->nlfc", W_dec, readers)
    w = jnp.sum(u * u, axis=-1)                                # [n, L, F]
    a = jnp.einsum("bn,nlf->blf", f, w)
    b = jnp.einsum("bn,nlf->blf", f * f, w * w)
    return jnp.mean(jnp.sum(a * a - b, axis=(-2, -1)))


def crosscoder_loss(params: dict[str, jax.Array], x: jax.Array, dead: jax.Array, cfg: Any,
                    readers: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`sae_loss` on the stacked, scaled batch ``x [batch, L, d]`` (the crosscoder is an SAE on
    ``concat_l x_l``; ``W_dec`` stored ``[n, L * d]``; TopK decoded densely), plus ``cfg.interaction_penalty`` times
    :func:`interaction_penalty` when ``readers`` is given; aux adds ``interaction``."""
    n_layers, d = x.shape[1], x.shape[2]
    flat = x.reshape(x.shape[0], n_layers * d)
    if cfg.aux_k is None:                                      # AuxK sized for one layer, not the stack
        cfg = dataclasses.replace(cfg, aux_k=min(cfg.d_sae, max(1, d // 2)))
    sae = training_sae(params, cfg)
    pre = sae.pre_activations(flat)
    loss, aux = dictionary_loss(pre, flat, sae.W_dec, sae.b_dec, sae.threshold, dead, cfg, dense_decode=True)
    if readers is None:
        return loss, {**aux, "interaction": jnp.zeros((), loss.dtype)}
    f = sae.activation(pre, jump=lambda z, t: jumprelu(z, t, cfg.jumprelu_bandwidth))
    penalty = interaction_penalty(f, params["W_dec"].reshape(-1, n_layers, d), readers)
    return loss + cfg.interaction_penalty * penalty, {**aux, "interaction": penalty}
