"""Train sparse autoencoders on activations: TopK (+AuxK), JumpReLU (straight-through) and ReLU+L1.

The training step is a pure function, ``train_step(state, batch) -> (state, metrics)``, that
makes one jitted call over a :class:`TrainState` pytree (parameters, Adam state, step, and per-latent tokens since each
latent last fired). :func:`fit` drives it with a progress bar and atomic checkpoints; a run resumed
from its checkpoint folder ends with exactly the parameters of an uninterrupted run.
:func:`train_sae` captures activations from a model and returns an inference :class:`SAE`.

Losses (``x`` is a batch scaled by ``state.scale``, ``mse = mean_batch ||x - x_hat||^2``):

- topk: ``mse + aux_coeff * auxk``. AuxK (Gao et al. 2024, "Scaling and evaluating sparse
  autoencoders") reconstructs the main error ``e = x - x_hat`` from the ``aux_k`` largest
  pre-activations among dead latents: ``||e - e_hat||^2 / ||e - mean(e)||^2`` over the batch
  (0 while no latent is dead).
- jumprelu: ``mse + sparsity_coeff * L0`` with ``f = z * H(z - theta)``, ``theta =
  exp(log_threshold)``. The step function's derivative in ``theta`` is replaced by the rectangle
  kernel ``-(1/eps) K((z - theta)/eps)`` (Rajamanoharan et al. 2024, "Jumping Ahead"), in both the
  reconstruction (times ``theta``) and the L0 term; ``z`` gets no gradient from L0.
- relu: ``mse + l1_coeff * mean_batch sum_i f_i ||W_dec_i||``.

Decoder rows are kept at unit norm: the gradient component along each row is removed before the
Adam update and rows are renormalised after it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jfig.errors import JfigError, ShapeError
from jfig.saes.metrics import activation_metrics, sae_metrics
from jfig.saes.sae import SAE, fold_activation_norm_scaling_factor

TRAIN_ARCHITECTURES = ("topk", "jumprelu", "relu")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
DECAYS = ("cosine", "linear", "constant")
_COUNTER_CAP = 2**30  # tokens-since-fired saturates here instead of overflowing int32
# Fields that may differ between a checkpoint and the run resuming it: they change no number.
_RESUMABLE_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every")
# Fields the update step never reads.
_INIT_ONLY_FIELDS = _RESUMABLE_FIELDS + ("batch_size", "b_dec_init", "init_batches", "scale_activations", "seed")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one SAE training run.

    Sizes: ``d_sae`` latents; ``architecture`` "topk" (needs ``k``), "jumprelu" or "relu".
    Schedule: ``steps`` updates of Adam (``adam_b1``, ``adam_b2``, ``adam_eps``; optional global
    gradient clipping ``max_grad_norm``) with peak learning rate ``lr``, linear warm-up from 0 over
    ``warmup_steps``, then ``decay`` "cosine" | "linear" to 0 at ``steps``, or "constant".
    ``batch_size`` is the number of tokens per step when training on an array (a callable or an
    iterable of batches sets its own batch size).

    TopK: ``aux_k`` dead latents in the AuxK loss (None: ``d_in // 2``, capped at ``d_sae``),
    weighted ``aux_coeff`` (1/32 as in the paper); a latent is dead once it has not fired for
    ``dead_after_tokens`` tokens. ReLU: ``l1_coeff``. JumpReLU: ``jumprelu_bandwidth`` (eps of the
    rectangle kernel), ``jumprelu_sparsity_coeff`` (lambda on L0), ``jumprelu_init_threshold``.
    The coefficients are for scaled inputs (see ``scale_activations``), where pre-activations are of
    order 1: the paper's eps = theta_0 = 0.001 then leaves almost no token inside the kernel's
    window, and thresholds barely move (on planted dictionaries in the tests, 0.05 and 0.1 learn
    in a thousand steps where 0.001 does not).

    Initialisation: ``W_dec`` rows are random unit vectors and ``W_enc = W_dec.T``; ``b_enc = 0``;
    ``b_dec`` is the ``b_dec_init`` ("geometric_median" by Weiszfeld iterations, "mean", "zeros") of
    the first ``init_batches`` batches. With ``scale_activations`` inputs are multiplied by
    ``sqrt(d_in) / mean ||x||`` (from the same batches) during training, so that hyperparameters
    transfer between sites; the returned SAE has the factor folded in and takes raw activations.

    Bookkeeping: ``seed``; ``checkpoint_every`` steps (None: only at the end); the last
    ``keep_checkpoints`` checkpoints are kept; the progress bar and history are refreshed every
    ``log_every`` steps (each refresh waits for the device).
    """

    d_sae: int
    architecture: str = "topk"
    k: int | None = None
    steps: int = 10_000
    batch_size: int = 4096
    lr: float = 3e-4
    warmup_steps: int = 100
    decay: str = "cosine"
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = None
    aux_k: int | None = None
    aux_coeff: float = 1 / 32
    dead_after_tokens: int = 10_000_000
    l1_coeff: float = 5.0
    jumprelu_bandwidth: float = 0.05
    jumprelu_sparsity_coeff: float = 1.0
    jumprelu_init_threshold: float = 0.1
    b_dec_init: str = "geometric_median"
    init_batches: int = 4
    scale_activations: bool = True
    normalize_decoder: bool = True
    seed: int = 0
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 10

    def __post_init__(self):
        def positive_int(name, allow_none=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise JfigError(f"TrainConfig.{name} must be a positive int, got {value!r}")

        for name in ("d_sae", "steps", "batch_size", "init_batches", "keep_checkpoints", "log_every"):
            positive_int(name)
        for name in ("aux_k", "checkpoint_every"):
            positive_int(name, allow_none=True)
        if self.architecture not in TRAIN_ARCHITECTURES:
            raise JfigError(f"TrainConfig.architecture {self.architecture!r} is unknown; expected one of "
                            f"{TRAIN_ARCHITECTURES}")
        if self.architecture == "topk":
            if self.k is None:
                raise JfigError("TrainConfig: architecture 'topk' needs k (latents kept per token)")
            positive_int("k")
            if self.k > self.d_sae:
                raise JfigError(f"TrainConfig: k={self.k} exceeds d_sae={self.d_sae}; expected 1 <= k <= d_sae")
        elif self.k is not None:
            raise JfigError(f"TrainConfig: k applies to architecture 'topk' only, not {self.architecture!r}")
        if self.decay not in DECAYS:
            raise JfigError(f"TrainConfig.decay {self.decay!r} is unknown; expected one of {DECAYS}")
        if self.b_dec_init not in B_DEC_INITS:
            raise JfigError(f"TrainConfig.b_dec_init {self.b_dec_init!r} is unknown; expected one of {B_DEC_INITS}")
        if self.warmup_steps < 0 or self.dead_after_tokens < 1:
            raise JfigError("TrainConfig: warmup_steps must be >= 0 and dead_after_tokens >= 1")
        if not self.lr > 0 or not self.jumprelu_bandwidth > 0 or not self.jumprelu_init_threshold > 0:
            raise JfigError("TrainConfig: lr, jumprelu_bandwidth and jumprelu_init_threshold must be > 0")

    def resolved_aux_k(self, d_in: int) -> int:
        """The number of dead latents AuxK uses for inputs of width ``d_in``."""
        return min(self.d_sae, self.aux_k if self.aux_k is not None else max(1, d_in // 2))


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


# ---------------------------------------------------------------------------------- initialisation


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
    iterations (distance-weighted means) from the mean, distances floored at ``eps``."""
    x = x.astype(jnp.float32)

    def body(_, y):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - y, axis=-1), eps)  # [n]
        return (w @ x) / jnp.sum(w)

    return jax.lax.fori_loop(0, iters, body, jnp.mean(x, axis=0))


def _empty_params(cfg: TrainConfig, d_in: int) -> dict[str, jax.Array]:
    params = {"W_enc": jnp.zeros((d_in, cfg.d_sae)), "b_enc": jnp.zeros((cfg.d_sae,)),
              "W_dec": jnp.zeros((cfg.d_sae, d_in)), "b_dec": jnp.zeros((d_in,))}
    if cfg.architecture == "jumprelu":
        params["log_threshold"] = jnp.zeros((cfg.d_sae,))
    return params


def init_train_state(cfg: TrainConfig, d_in: int, sample) -> TrainState:
    """A fresh state: scale and ``b_dec`` from ``sample [n, d_in]`` (see :class:`TrainConfig`)."""
    sample = jnp.asarray(sample, jnp.float32).reshape(-1, d_in)
    if cfg.scale_activations:
        mean_norm = float(jnp.mean(jnp.linalg.norm(sample, axis=-1)))
        if not mean_norm > 0:
            raise JfigError("cannot scale activations: their mean norm is 0 on the first batches")
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


# ---------------------------------------------------------------------------------- losses


def _rectangle(u: jax.Array) -> jax.Array:
    """K(u) = 1 on (-1/2, 1/2), else 0."""
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _sum_to(g: jax.Array, shape) -> jax.Array:
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
    dtheta = -(theta / bandwidth) * _rectangle((z - theta) / bandwidth) * g
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
    dtheta = -(1.0 / bandwidth) * _rectangle((z - theta) / bandwidth) * g
    return jnp.zeros_like(z), _sum_to(dtheta, theta.shape)


heaviside_step.defvjp(_step_fwd, _step_bwd)


def _sparse_decode(values: jax.Array, index: jax.Array, W_dec: jax.Array) -> jax.Array:
    """sum_j values[b, j] * W_dec[index[b, j]]: ``[batch, k] x [batch, k] -> [batch, d_in]``."""
    return jnp.einsum("bk,bkd->bd", values, W_dec[index])


def _fvu(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    return jnp.sum((x - x_hat) ** 2) / jnp.sum((x - jnp.mean(x, axis=0)) ** 2)


def _loss(params, x, dead, cfg: TrainConfig):
    """Total loss and aux outputs for a scaled batch ``x [batch, d_in]``; ``dead [d_sae]`` bool."""
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]  # [batch, d_sae]
    d_sae = cfg.d_sae
    if cfg.architecture == "topk":
        values, index = jax.lax.top_k(pre, cfg.k)  # [batch, k]
        values = jax.nn.relu(values)
        x_hat = _sparse_decode(values, index, params["W_dec"]) + params["b_dec"]
        on = values > 0
        fired = jnp.zeros((d_sae,), jnp.int32).at[index.reshape(-1)].add(on.reshape(-1).astype(jnp.int32))
        l0 = jnp.mean(jnp.sum(on, axis=-1))
        # AuxK: the top aux_k dead latents reconstruct the error of the live ones.
        # (Under lax.cond so batches without dead latents skip the second top-k.)
        error = jax.lax.stop_gradient(x - x_hat)

        def auxk(pre, W_dec):
            values, index = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), cfg.resolved_aux_k(x.shape[-1]))
            values = jnp.where(dead[index], jax.nn.relu(values), 0.0)
            return jnp.nan_to_num(_fvu(error, _sparse_decode(values, index, W_dec)))

        sparsity = jax.lax.cond(jnp.any(dead), auxk, lambda *_: jnp.zeros((), pre.dtype), pre, params["W_dec"])
        coeff = cfg.aux_coeff
    elif cfg.architecture == "jumprelu":
        theta = jnp.exp(params["log_threshold"])
        f = jumprelu(pre, theta, cfg.jumprelu_bandwidth)
        x_hat = f @ params["W_dec"] + params["b_dec"]
        fired = jnp.sum(f != 0, axis=0)
        l0 = jnp.mean(jnp.sum(f != 0, axis=-1))
        sparsity = jnp.mean(jnp.sum(heaviside_step(pre, theta, cfg.jumprelu_bandwidth), axis=-1))
        coeff = cfg.jumprelu_sparsity_coeff
    else:
        f = jax.nn.relu(pre)
        x_hat = f @ params["W_dec"] + params["b_dec"]
        fired = jnp.sum(f > 0, axis=0)
        l0 = jnp.mean(jnp.sum(f > 0, axis=-1))
        sparsity = jnp.mean(f @ jnp.linalg.norm(params["W_dec"], axis=-1))
        coeff = cfg.l1_coeff
    mse = jnp.mean(jnp.sum((x - x_hat) ** 2, axis=-1))
    loss = mse + coeff * sparsity
    return loss, {"mse": mse, "fvu": _fvu(x, x_hat), "l0": l0, "sparsity_loss": sparsity, "fired": fired}


# ---------------------------------------------------------------------------------- the step


def _unit_rows(W: jax.Array) -> jax.Array:
    return W / jnp.maximum(jnp.linalg.norm(W, axis=-1, keepdims=True), 1e-12)


@lru_cache(maxsize=64)
def _step_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the fields the update never reads set to their defaults, so that runs differing
    only in those (seed, batch size, initialisation, bookkeeping) share one compiled step."""
    return dataclasses.replace(cfg, **{f.name: f.default for f in dataclasses.fields(TrainConfig)
                                       if f.name in _INIT_ONLY_FIELDS})


def _core_step(arrays, batch, cfg: TrainConfig):
    params, opt_state, step, since_fired, scale = arrays
    d_in = params["b_dec"].shape[0]
    x = batch.astype(jnp.float32).reshape(-1, d_in) * scale
    finite = jnp.all(jnp.isfinite(x))
    x = jnp.where(finite, x, 0.0)
    dead = since_fired >= cfg.dead_after_tokens
    (loss, aux), grads = jax.value_and_grad(_loss, has_aux=True)(params, x, dead, cfg)
    if cfg.normalize_decoder:  # move along the unit sphere of each decoder row
        W, g = params["W_dec"], grads["W_dec"]
        grads = {**grads, "W_dec": g - jnp.sum(g * W, axis=-1, keepdims=True) * W}
    updates, new_opt_state = make_optimizer(cfg).update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if cfg.normalize_decoder:
        new_params = {**new_params, "W_dec": _unit_rows(new_params["W_dec"])}
    since = jnp.where(aux["fired"] > 0, 0, jnp.minimum(since_fired + x.shape[0], _COUNTER_CAP)).astype(jnp.int32)
    # A batch with NaN/inf changes nothing but the step count; fit raises on it.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new = (keep(new_params, params), keep(new_opt_state, opt_state), step + 1, keep(since, since_fired), scale)
    metrics = {"loss": loss, "mse": aux["mse"], "fvu": aux["fvu"], "explained_variance": 1.0 - aux["fvu"],
               "l0": aux["l0"], "sparsity_loss": aux["sparsity_loss"],
               "dead_fraction": jnp.mean(new[3] >= cfg.dead_after_tokens),
               "lr": make_schedule(cfg)(step), "finite": finite, "tokens": jnp.asarray(x.shape[0])}
    return new, metrics


_core_step_jit = jax.jit(_core_step, static_argnames="cfg")


def train_step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam update on ``batch [batch, d_in]`` (raw activations; scaled inside); one jitted call.

    Returns the new :class:`TrainState` and scalar metrics: loss, mse, fvu, explained_variance, l0,
    sparsity_loss (AuxK / L0 / weighted L1 term), dead_fraction, lr, finite (False if the batch
    had NaN/inf, in which case the state is unchanged but for ``step``) and tokens.
    """
    arrays = (state.params, state.opt_state, state.step, state.since_fired, state.scale)
    (params, opt_state, step, since_fired, scale), metrics = _core_step_jit(arrays, batch,
                                                                            cfg=_step_config(state.cfg))
    return TrainState(params=params, opt_state=opt_state, step=step, since_fired=since_fired, scale=scale,
                      cfg=state.cfg), metrics


def sae_from_state(state: TrainState, site: str) -> SAE:
    """The inference :class:`SAE` of a training state, taking raw (unscaled) activations.

    jumprelu gets ``threshold = exp(log_threshold)``; topk keeps ``k``."""
    p, cfg = state.params, state.cfg
    threshold = jnp.exp(p["log_threshold"]) if cfg.architecture == "jumprelu" else None
    sae = SAE(W_enc=p["W_enc"], b_enc=p["b_enc"], W_dec=p["W_dec"], b_dec=p["b_dec"], site=site,
              threshold=threshold, architecture=cfg.architecture, k=cfg.k,
              metadata={"hook_name": site, "train_config": dataclasses.asdict(cfg), "train_steps": int(state.step)})
    return fold_activation_norm_scaling_factor(sae, state.scale)


# ---------------------------------------------------------------------------------- batches


class _Batches:
    """Batch ``step`` of a run, from an array, a callable ``batch_at(step)`` or an iterable."""

    def __init__(self, source, cfg: TrainConfig, d_in: int, site: str):
        self.cfg, self.d_in, self.site = cfg, d_in, site
        self.array = self.fn = self.iterator = None
        self.buffer: list = []
        self.next_step = 0
        if callable(source) and not hasattr(source, "shape"):
            self.fn = source
        elif hasattr(source, "shape") and hasattr(source, "dtype"):
            array = jnp.asarray(source)
            self._check(array, "activations")
            self.array = array.reshape(-1, d_in)
            if not bool(jnp.all(jnp.isfinite(self.array))):
                raise JfigError(f"activations for the SAE at {site} contain NaN or inf values; expected finite values")
            self.size = min(cfg.batch_size, self.array.shape[0])
            self.per_epoch = self.array.shape[0] // self.size
            self.epoch, self.perm = -1, None
        elif isinstance(source, Iterable):
            self.iterator = iter(source)
        else:
            raise JfigError(f"activation batches must be an array [n, d_in], a callable batch_at(step) or an "
                            f"iterable of arrays; got {type(source).__name__}")

    def _check(self, batch, what: str):
        if not hasattr(batch, "shape") or batch.ndim < 1 or batch.shape[-1] != self.d_in:
            shape = tuple(getattr(batch, "shape", ())) or type(batch).__name__
            raise ShapeError(f"{what} have shape {shape}; the SAE at {self.site} takes [..., d_in={self.d_in}]")
        if not jnp.issubdtype(batch.dtype, jnp.floating):
            raise ShapeError(f"{what} have dtype {batch.dtype}; expected floating-point activations")
        if batch.size == 0:
            raise ShapeError(f"{what} are empty; the SAE at {self.site} needs tokens to train on")

    def skip_to(self, step: int) -> None:
        """Position an iterable at ``step`` by drawing and dropping batches (resume)."""
        if self.iterator is not None:
            for _ in range(step - self.next_step):
                self._draw()
        self.next_step = step

    def _draw(self):
        try:
            return next(self.iterator)
        except StopIteration:
            raise JfigError(f"the activation batches ran out after {self.next_step} batches; the config asks "
                            f"for steps={self.cfg.steps}") from None

    def __call__(self, step: int) -> jax.Array:
        if self.array is not None:
            epoch, i = divmod(step, self.per_epoch)
            if epoch != self.epoch:
                rng = np.random.default_rng([self.cfg.seed, epoch])
                self.epoch, self.perm = epoch, jnp.asarray(rng.permutation(self.array.shape[0]))
            batch = self.array[self.perm[i * self.size:(i + 1) * self.size]]
        elif self.fn is not None:
            batch = jnp.asarray(self.fn(step))
        else:
            if step != self.next_step:
                raise JfigError(f"an iterable of batches is read in order; asked for step {step} at {self.next_step}")
            batch = self.buffer.pop(0) if self.buffer else self._draw()
            batch = jnp.asarray(batch)
            self.next_step += 1
        self._check(batch, f"activation batch {step}")
        return batch

    def first(self, n: int) -> list[jax.Array]:
        """The first ``n`` batches (an iterable's are kept and served again at steps 0..n-1)."""
        n = min(n, self.cfg.steps)
        if self.iterator is None:
            return [self(s) for s in range(n)]
        while len(self.buffer) < n:
            batch = jnp.asarray(self._draw())
            self._check(batch, f"activation batch {len(self.buffer)}")
            self.buffer.append(batch)
        return list(self.buffer)


# ---------------------------------------------------------------------------------- checkpoints


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("step_*.npz"))


def _save_checkpoint(folder: Path, state: TrainState, history: dict[str, list], meta: dict) -> Path:
    """Write ``step_{step:09d}.npz`` (state leaves, history, JSON meta) atomically; prune old ones."""
    folder.mkdir(parents=True, exist_ok=True)
    step = int(state.step)
    leaves = jax.device_get(jax.tree.leaves(state))
    arrays = {f"leaf_{i:04d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
    arrays.update({f"history_{key}": np.asarray(value) for key, value in history.items()})
    arrays["meta"] = np.asarray(json.dumps({**meta, "step": step, "n_leaves": len(leaves)}))
    final = folder / f"step_{step:09d}.npz"
    fd, tmp = tempfile.mkstemp(prefix=".step_", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in _checkpoint_files(folder)[:-state.cfg.keep_checkpoints]:
        old.unlink(missing_ok=True)
    return final


def _load_checkpoint(file: Path, template: TrainState, meta: dict) -> tuple[TrainState, dict[str, list]]:
    with np.load(file) as data:
        saved = json.loads(str(data["meta"]))
        want, got = meta["config"], saved.get("config", {})
        diff = sorted(key for key in set(want) | set(got)
                      if key not in _RESUMABLE_FIELDS and want.get(key) != got.get(key))
        if diff:
            raise JfigError(f"checkpoint {file} was written with a different TrainConfig "
                            f"({', '.join(f'{k}: {got.get(k)!r} there, {want.get(k)!r} now' for k in diff)})")
        for key in ("d_in", "site"):
            if saved.get(key) != meta[key]:
                raise JfigError(f"checkpoint {file} is for {key} {saved.get(key)!r}; this run has {meta[key]!r}")
        leaves, treedef = jax.tree.flatten(template)
        if saved["n_leaves"] != len(leaves):
            raise JfigError(f"checkpoint {file} has {saved['n_leaves']} state arrays; expected {len(leaves)}")
        loaded = []
        for i, leaf in enumerate(leaves):
            array = data[f"leaf_{i:04d}"]
            if array.shape != leaf.shape or array.dtype != leaf.dtype:
                raise JfigError(f"checkpoint {file}: state array {i} is {array.dtype}{list(array.shape)}; "
                                f"expected {leaf.dtype}{list(leaf.shape)}")
            loaded.append(jnp.asarray(array))
        history = {key[len("history_"):]: list(data[key]) for key in data.files if key.startswith("history_")}
    return jax.tree.unflatten(treedef, loaded), history


# ---------------------------------------------------------------------------------- fit


def fit(activation_batches, d_in: int, site: str, cfg: TrainConfig, *, checkpoint_dir=None, progress: bool = True,
        max_steps: int | None = None, callback: Callable | None = None) -> tuple[SAE, dict[str, np.ndarray]]:
    """Train an SAE at ``site`` on ``d_in``-wide activations; returns ``(sae, history)``.

    ``activation_batches`` is one of:

    - an array ``[n, d_in]``: each step takes ``cfg.batch_size`` rows; every epoch visits the rows
      in a permutation seeded by ``(cfg.seed, epoch)``, so batch ``s`` depends only on ``s``;
    - a callable ``batch_at(step) -> [batch, d_in]``, which must be deterministic in ``step``;
    - an iterable of ``[batch, d_in]`` arrays. On resume, the first ``step`` batches are drawn and
      dropped, so pass the same sequence from its start.

    With ``checkpoint_dir``, the state is written there (atomically) every ``cfg.checkpoint_every``
    steps and at the end; if the folder already holds a checkpoint, training continues from the
    latest one (its TrainConfig must match ``cfg``) and ends with the same parameters, bit for
    bit, as a run that was never interrupted.

    ``max_steps`` stops once that many steps are done in total (an interrupted run, e.g. for a
    time budget); ``callback(step, state, metrics)`` is called after each step (step = updates
    done) and may raise to stop. The progress bar shows loss, L0, explained variance and tokens/s.
    ``history`` maps each metric of :func:`train_step` (and "step") to an array over the steps run,
    including those before a resume.

    Raises ShapeError when a batch is not ``[..., d_in]`` and JfigError on NaN/inf activations.
    """
    from tqdm.auto import tqdm

    if not isinstance(d_in, (int, np.integer)) or d_in < 1:
        raise ShapeError(f"d_in must be a positive int, got {d_in!r}")
    batches = _Batches(activation_batches, cfg, int(d_in), site)
    meta = {"config": dataclasses.asdict(cfg), "d_in": int(d_in), "site": site}
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    existing = _checkpoint_files(folder) if folder is not None and folder.exists() else []
    history: dict[str, list] = {}
    if existing:
        empty = _empty_params(cfg, d_in)
        template = TrainState(params=empty, opt_state=make_optimizer(cfg).init(empty), step=jnp.zeros((), jnp.int32),
                              since_fired=jnp.zeros((cfg.d_sae,), jnp.int32), scale=jnp.zeros((), jnp.float32),
                              cfg=cfg)
        state, history = _load_checkpoint(existing[-1], template, meta)
        batches.skip_to(int(state.step))
    else:
        first = [b.reshape(-1, d_in).astype(jnp.float32) for b in batches.first(cfg.init_batches)]
        for i, b in enumerate(first):
            if not bool(jnp.all(jnp.isfinite(b))):
                raise JfigError(f"activation batch {i} for the SAE at {site} contains NaN or inf values; "
                                f"expected finite activations")
        state = init_train_state(cfg, d_in, jnp.concatenate(first))
    start = int(state.step)
    stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    pending: list[tuple[int, dict]] = []
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=f"SAE {site}", dynamic_ncols=True)
    clock = [time.perf_counter(), 0]  # time of the last flush, tokens since then

    def flush():
        if not pending:
            return
        values = jax.device_get([m for _, m in pending])
        for (step, _), m in zip(pending, values):
            if not bool(m["finite"]):
                raise JfigError(f"activation batch {step} for the SAE at {site} contains NaN or inf values; "
                                f"expected finite activations")
            history.setdefault("step", []).append(step)
            for key, value in m.items():
                history.setdefault(key, []).append(value)
            clock[1] += int(m["tokens"])
        now = time.perf_counter()
        last = values[-1]
        bar.set_postfix(loss=f"{float(last['loss']):.4g}", L0=f"{float(last['l0']):.1f}",
                        EV=f"{float(last['explained_variance']):.3f}",
                        tok_s=f"{clock[1] / max(now - clock[0], 1e-9):.3g}", refresh=False)
        bar.update(len(pending))
        clock[0], clock[1] = now, 0
        pending.clear()

    try:
        for step in range(start, stop):
            state, metrics = train_step(state, batches(step))
            pending.append((step, metrics))
            done = step + 1
            if done % cfg.log_every == 0 or done == stop:
                flush()
            if folder is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                flush()
                _save_checkpoint(folder, state, history, meta)
            if callback is not None:
                callback(done, state, metrics)
        flush()
        if folder is not None and int(state.step) > start and (
                not cfg.checkpoint_every or int(state.step) % cfg.checkpoint_every != 0):
            _save_checkpoint(folder, state, history, meta)
    finally:
        bar.close()
    return sae_from_state(state, site), {key: np.asarray(value) for key, value in history.items()}


# ---------------------------------------------------------------------------------- train_sae


def capture_activations(model, tokens, site: str, *, batch_size: int = 32, drop_first: bool = True) -> jax.Array:
    """Activations at ``site`` for int ``tokens [n_seq, seq]``, as rows ``[n_tokens, d_in]``.

    Runs ``batch_size`` sequences at a time, stopping at ``site``; head axes are flattened.
    ``drop_first`` leaves out position 0 (BOS), whose activations are outliers."""
    model.check_site(site)
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ShapeError(f"tokens must be an int array [n_seq, seq]; got dtype {tokens.dtype}, shape {tokens.shape}")
    if drop_first and tokens.shape[1] < 2:
        raise ShapeError(f"tokens of length {tokens.shape[1]} leave nothing once position 0 is dropped")
    model.check_tokens(tokens)
    n_seq = tokens.shape[0]
    bs = max(1, min(batch_size, n_seq))
    out = []
    for start in range(0, n_seq, bs):
        batch = tokens[start:start + bs]
        n = batch.shape[0]
        if n < bs:  # pad to one shape so the run compiles once
            batch = np.concatenate([batch, np.repeat(batch[:1], bs - n, axis=0)])
        acts = model.run(jnp.asarray(batch, jnp.int32), capture=(site,), stop_at=site, logits=False).cache[site]
        acts = acts[:n, 1:] if drop_first else acts[:n]
        out.append(acts.reshape(-1, math.prod(acts.shape[2:])))
    return jnp.concatenate(out)


def train_sae(model, tokens_or_activations, site: str, *, d_sae: int, k: int | None = None,
              architecture: str | None = None, steps: int | None = None, batch_size: int = 4096, lr: float = 3e-4,
              seed: int = 0, checkpoint_dir=None, progress: bool = True, **kw) -> tuple[SAE, dict[str, float]]:
    """Train an SAE at ``site`` and measure it; returns ``(sae, metrics)``.

    ``tokens_or_activations``: float activations ``[n, d_in]`` (``model`` may then be None; if
    given, its site width is checked), or int tokens ``[n_seq, seq]``, whose activations at
    ``site`` are captured (position 0 dropped, see :func:`capture_activations`).

    ``architecture`` defaults to "topk" when ``k`` is given, else "jumprelu". ``steps`` defaults to
    one pass over the activations (``n // batch_size``, at least 1). Other keywords set
    :class:`TrainConfig` fields. The returned SAE takes raw activations; at hook_z sites it takes
    ``[..., n_heads, d_head]``. ``metrics`` is :func:`jfig.saes.metrics.sae_metrics` on the tokens
    (with downstream cross-entropy) or :func:`jfig.saes.metrics.activation_metrics` on the
    activations.
    """
    unknown = set(kw) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise JfigError(f"train_sae got unknown options {sorted(unknown)}; expected TrainConfig fields")
    data = tokens_or_activations
    if not hasattr(data, "dtype"):
        data = np.asarray(data)
    from_tokens = jnp.issubdtype(data.dtype, jnp.integer)
    head_shape = None
    if from_tokens:
        if model is None:
            raise JfigError("train_sae needs a model to capture activations from tokens")
        acts = capture_activations(model, data, site)
        if site.endswith("attn.hook_z"):
            head_shape = (model.config.n_heads, model.config.d_head) if model.config is not None else None
    else:
        if not jnp.issubdtype(data.dtype, jnp.floating):
            raise ShapeError(f"train_sae takes int tokens or float activations; got dtype {data.dtype}")
        acts = jnp.asarray(data)
        if acts.ndim != 2:
            raise ShapeError(f"activations must be [n, d_in]; got shape {tuple(acts.shape)}")
        if model is not None:
            model.check_site(site)
            width = model.site_width(site)
            if width is not None and width != acts.shape[-1]:
                raise ShapeError(f"activations have width {acts.shape[-1]} but site {site} of the model has "
                                 f"width {width}")
    d_in = int(acts.shape[-1])
    architecture = architecture or ("topk" if k is not None else "jumprelu")
    if steps is None:
        steps = max(1, acts.shape[0] // batch_size)
    cfg = TrainConfig(d_sae=d_sae, architecture=architecture, k=k, steps=steps, batch_size=batch_size, lr=lr,
                      seed=seed, **kw)
    sae, _ = fit(acts, d_in, site, cfg, checkpoint_dir=checkpoint_dir, progress=progress)
    if head_shape is not None:
        sae = dataclasses.replace(sae, reshape_hook_z=True, hook_z_shape=head_shape)
    if from_tokens:
        return sae, sae_metrics(model, sae, data)
    return sae, activation_metrics(sae, acts)
