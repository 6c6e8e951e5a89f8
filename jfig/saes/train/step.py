"""The training state, its initialisation, the optimiser and the jitted update step.

``train_step(state, batch) -> (state, metrics)`` is a pure function making one jitted call over a
:class:`TrainState` pytree (parameters, Adam state, step, per-latent tokens since each latent last
fired). Decoder rows are kept at unit norm: the gradient component along each row is removed
before the Adam update and rows are renormalised after it.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache, partial
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from jfig.errors import JfigError
from jfig.saes.sae import SAE, fold_activation_norm_scaling_factor
from jfig.saes.train.config import INIT_ONLY_FIELDS, TrainConfig
from jfig.saes.train.losses import sae_loss, training_sae

COUNTER_CAP = 2**30  # tokens-since-fired saturates here instead of overflowing int32


class TrainState(eqx.Module):
    """Everything a training run carries from step to step; a pytree of arrays plus the config.

    ``params``: dict with ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
    ``b_dec [d_in]`` and, for jumprelu, ``log_threshold [d_sae]`` (all in scaled-input units).
    ``opt_state``: optax Adam state. ``step``: int32 ``[]``, updates done. ``since_fired``: int32
    ``[d_sae]``, tokens since each latent was last active. ``scale``: float32 ``[]`` input scale.
    """

    params: dict[str, jax.Array]
    opt_state: Any
    step: jax.Array
    since_fired: jax.Array
    scale: jax.Array
    cfg: TrainConfig = eqx.field(static=True)


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Learning rate by step: linear warm-up 0 -> lr, then cosine/linear decay to 0 at ``steps``."""
    warm = min(cfg.warmup_steps, cfg.steps)
    rest = max(1, cfg.steps - warm)
    decay = {"cosine": optax.cosine_decay_schedule(cfg.lr, rest),
             "linear": optax.linear_schedule(cfg.lr, 0.0, rest),
             "constant": optax.constant_schedule(cfg.lr)}[cfg.decay]
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), decay], [warm])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Adam with the schedule of :func:`make_schedule` (after optional global-norm clipping)."""
    adam = optax.adam(make_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps)
    if cfg.max_grad_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adam)


@partial(jax.jit, static_argnames=("iters",))
def geometric_median(x: jax.Array, iters: int = 32, eps: float = 1e-6) -> jax.Array:
    """Point minimising the sum of Euclidean distances to the rows of ``x [n, d]``: Weiszfeld
    iterations (distance-weighted means) from the mean, distances floored at ``eps``; ``[d]``."""
    x = x.astype(jnp.float32)

    def body(_, y):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - y, axis=-1), eps)  # [n]
        return (w @ x) / jnp.sum(w)

    return jax.lax.fori_loop(0, iters, body, jnp.mean(x, axis=0))


def empty_state(cfg: TrainConfig, d_in: int) -> TrainState:
    """A zero state of the right structure, shapes and dtypes (the template a checkpoint fills)."""
    params = {"W_enc": jnp.zeros((d_in, cfg.d_sae)), "b_enc": jnp.zeros((cfg.d_sae,)),
              "W_dec": jnp.zeros((cfg.d_sae, d_in)), "b_dec": jnp.zeros((d_in,))}
    if cfg.architecture == "jumprelu":
        params["log_threshold"] = jnp.zeros((cfg.d_sae,))
    return TrainState(params=params, opt_state=make_optimizer(cfg).init(params), step=jnp.zeros((), jnp.int32),
                      since_fired=jnp.zeros((cfg.d_sae,), jnp.int32), scale=jnp.zeros((), jnp.float32), cfg=cfg)


def init_train_state(cfg: TrainConfig, d_in: int, sample: Any) -> TrainState:
    """A fresh state: scale and ``b_dec`` from ``sample [n, d_in]`` (see :class:`TrainConfig`)."""
    sample = jnp.asarray(sample, jnp.float32).reshape(-1, d_in)
    if cfg.scale_activations:
        mean_norm = float(jnp.mean(jnp.linalg.norm(sample, axis=-1)))
        if not mean_norm > 0:
            raise JfigError("cannot scale activations: their mean norm is 0 on the first batches; expected "
                            "non-zero activations (or scale_activations=False)")
        scale = math.sqrt(d_in) / mean_norm
    else:
        scale = 1.0
    sample = sample * scale
    b_dec = {"geometric_median": lambda: geometric_median(sample),
             "mean": lambda: jnp.mean(sample, axis=0),
             "zeros": lambda: jnp.zeros((d_in,))}[cfg.b_dec_init]()
    W_dec = jax.random.normal(jax.random.key(cfg.seed), (cfg.d_sae, d_in), jnp.float32)
    W_dec = W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True)
    params = {"W_enc": W_dec.T, "b_enc": jnp.zeros((cfg.d_sae,)), "W_dec": W_dec, "b_dec": b_dec}
    if cfg.architecture == "jumprelu":
        params["log_threshold"] = jnp.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold))
    return TrainState(params=params, opt_state=make_optimizer(cfg).init(params), step=jnp.zeros((), jnp.int32),
                      since_fired=jnp.zeros((cfg.d_sae,), jnp.int32), scale=jnp.asarray(scale, jnp.float32),
                      cfg=cfg)


def _unit_rows(W: jax.Array) -> jax.Array:
    return W / jnp.maximum(jnp.linalg.norm(W, axis=-1, keepdims=True), 1e-12)


@lru_cache(maxsize=64)
def _step_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the fields the update never reads set to their defaults, so that runs differing
    only in those (seed, batch size, initialisation, bookkeeping) share one compiled step."""
    return dataclasses.replace(cfg, **{f.name: f.default for f in dataclasses.fields(TrainConfig)
                                       if f.name in INIT_ONLY_FIELDS})


@partial(jax.jit, static_argnames="cfg")
def _core_step(arrays: tuple, batch: jax.Array, cfg: TrainConfig) -> tuple[tuple, dict[str, jax.Array]]:
    params, opt_state, step, since_fired, scale = arrays
    d_in = params["b_dec"].shape[0]
    x = batch.astype(jnp.float32).reshape(-1, d_in) * scale
    finite = jnp.all(jnp.isfinite(x))
    x = jnp.where(finite, x, 0.0)
    dead = since_fired >= cfg.dead_after_tokens
    (loss, aux), grads = jax.value_and_grad(sae_loss, has_aux=True)(params, x, dead, cfg)
    if cfg.normalize_decoder:  # move along the unit sphere of each decoder row
        W, g = params["W_dec"], grads["W_dec"]
        grads = {**grads, "W_dec": g - jnp.sum(g * W, axis=-1, keepdims=True) * W}
    updates, new_opt_state = make_optimizer(cfg).update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if cfg.normalize_decoder:
        new_params = {**new_params, "W_dec": _unit_rows(new_params["W_dec"])}
    since = jnp.where(aux["fired"] > 0, 0, jnp.minimum(since_fired + x.shape[0], COUNTER_CAP)).astype(jnp.int32)
    # A batch with NaN/inf changes nothing but the step count; fit raises on it.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new = (keep(new_params, params), keep(new_opt_state, opt_state), step + 1, keep(since, since_fired), scale)
    metrics = {"loss": loss, "mse": aux["mse"], "fvu": aux["fvu"], "explained_variance": 1.0 - aux["fvu"],
               "l0": aux["l0"], "sparsity_loss": aux["sparsity_loss"],
               "dead_fraction": jnp.mean(new[3] >= cfg.dead_after_tokens),
               "lr": make_schedule(cfg)(step), "finite": finite, "tokens": jnp.asarray(x.shape[0])}
    return new, metrics


def train_step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam update on ``batch [batch, d_in]`` (raw activations; scaled inside); one jitted call.

    Returns the new :class:`TrainState` and scalar metrics: loss, mse, fvu, explained_variance, l0,
    sparsity_loss (AuxK / L0 / weighted L1 term), dead_fraction, lr, finite (False if the batch
    had NaN/inf, in which case the state is unchanged but for ``step``) and tokens.
    """
    arrays = (state.params, state.opt_state, state.step, state.since_fired, state.scale)
    (params, opt_state, step, since_fired, scale), metrics = _core_step(arrays, batch, cfg=_step_config(state.cfg))
    return TrainState(params=params, opt_state=opt_state, step=step, since_fired=since_fired, scale=scale,
                      cfg=state.cfg), metrics


def sae_from_state(state: TrainState, site: str) -> SAE:
    """The inference :class:`SAE` of a training state, taking raw (unscaled) activations.

    jumprelu gets ``threshold = exp(log_threshold)``; topk keeps ``k``."""
    cfg = state.cfg
    sae = training_sae(state.params, cfg, site, metadata={"hook_name": site, "train_config": dataclasses.asdict(cfg),
                                                          "train_steps": int(state.step)})
    return fold_activation_norm_scaling_factor(sae, state.scale)
