"""The training state, its initialisation, the optimiser and the jitted update step.

``train_step(state, batch) -> (state, metrics)`` is a pure function making one jitted call over a
:class:`TrainState` pytree (parameters, Adam state, step, per-latent tokens since each latent last
fired). Decoder rows are kept at unit norm: the gradient component along each row is removed
before the Adam update and rows are renormalised after it.

Transcoders train through the same update (:func:`_update`) on ``(x, y)`` batches: a
:class:`TrainState` with ``scale_out`` (the output's scale) set, :func:`init_transcoder_state`,
:func:`transcoder_train_step` and :func:`transcoder_from_state`. Cross-layer transcoders too, on
``(x [batch, L, d_in], y [batch, L, d_out])`` with per-layer scales: :func:`init_clt_state`,
:func:`clt_train_step` and :func:`clt_from_state`.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache, partial
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jfig.errors import JfigError
from jfig.saes.sae import SAE, fold_activation_norm_scaling_factor
from jfig.saes.crosscoder import Crosscoder
from jfig.saes.train.config import INIT_ONLY_FIELDS, CLTConfig, CrosscoderConfig, TrainConfig, TranscoderConfig
from jfig.saes.train.losses import clt_loss, clt_mask, crosscoder_loss, sae_loss, training_sae, transcoder_loss
from jfig.saes.transcoder import Transcoder

COUNTER_CAP = 2**30  # tokens-since-fired saturates here instead of overflowing int32


class TrainState(eqx.Module):
    """Everything a training run carries from step to step; a pytree of arrays plus the config.

    ``params``: dict with ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
    ``b_dec [d_in]`` and, for jumprelu, ``log_threshold [d_sae]`` (all in scaled-input units).
    ``opt_state``: optax Adam state. ``step``: int32 ``[]``, updates done. ``since_fired``: int32
    ``[d_sae]``, tokens since each latent was last active. ``scale``: float32 ``[]`` input scale.

    A transcoder's state has ``W_enc [d_in, d_tc]``, ``W_dec [d_tc, d_out]``, ``b_dec [d_out]``
    and, with ``cfg.skip``, ``W_skip [d_in, d_out]``; ``scale_out``: float32 ``[]``, the output's
    scale (None for an SAE, which then serialises exactly as before transcoders existed).
    """

    params: dict[str, jax.Array]
    opt_state: Any
    step: jax.Array
    since_fired: jax.Array
    scale: jax.Array
    cfg: TrainConfig = eqx.field(static=True)
    scale_out: jax.Array | None = None


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


def _scale_of(sample: jax.Array, width: int, cfg: TrainConfig, what: str) -> float:
    """``sqrt(width) / mean ||row||`` of ``sample`` (1 without ``scale_activations``)."""
    if not cfg.scale_activations:
        return 1.0
    mean_norm = float(jnp.mean(jnp.linalg.norm(sample, axis=-1)))
    if not mean_norm > 0:
        raise JfigError(f"cannot scale {what}: their mean norm is 0 on the first batches; expected "
                        f"non-zero activations (or scale_activations=False)")
    return math.sqrt(width) / mean_norm


def _b_dec_init(sample: jax.Array, width: int, cfg: TrainConfig) -> jax.Array:
    return {"geometric_median": lambda: geometric_median(sample),
            "mean": lambda: jnp.mean(sample, axis=0),
            "zeros": lambda: jnp.zeros((width,))}[cfg.b_dec_init]()


def _unit_decoder(cfg: TrainConfig, d_out: int) -> jax.Array:
    """Random unit decoder rows ``[d_sae, d_out]`` from ``cfg.seed``."""
    W_dec = jax.random.normal(jax.random.key(cfg.seed), (cfg.d_sae, d_out), jnp.float32)
    return W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True)


def init_train_state(cfg: TrainConfig, d_in: int, sample: Any) -> TrainState:
    """A fresh state: scale and ``b_dec`` from ``sample [n, d_in]`` (see :class:`TrainConfig`)."""
    sample = jnp.asarray(sample, jnp.float32).reshape(-1, d_in)
    scale = _scale_of(sample, d_in, cfg, "activations")
    sample = sample * scale
    b_dec = _b_dec_init(sample, d_in, cfg)
    W_dec = _unit_decoder(cfg, d_in)
    params = {"W_enc": W_dec.T, "b_enc": jnp.zeros((cfg.d_sae,)), "W_dec": W_dec, "b_dec": b_dec}
    if cfg.architecture == "jumprelu":
        params["log_threshold"] = jnp.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold))
    return TrainState(params=params, opt_state=make_optimizer(cfg).init(params), step=jnp.zeros((), jnp.int32),
                      since_fired=jnp.zeros((cfg.d_sae,), jnp.int32), scale=jnp.asarray(scale, jnp.float32),
                      cfg=cfg)


def _transcoder_params(cfg: TranscoderConfig, W_enc: jax.Array, W_dec: jax.Array, b_dec: jax.Array
                       ) -> dict[str, jax.Array]:
    d_in, d_out = W_enc.shape[0], W_dec.shape[1]
    params = {"W_enc": W_enc, "b_enc": jnp.zeros((cfg.d_sae,)), "W_dec": W_dec, "b_dec": b_dec}
    if cfg.skip:
        params["W_skip"] = jnp.zeros((d_in, d_out))
    if cfg.architecture == "jumprelu":
        params["log_threshold"] = jnp.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold))
    return params


def empty_transcoder_state(cfg: TranscoderConfig, d_in: int, d_out: int) -> TrainState:
    """A zero transcoder state of the right structure (the template a checkpoint fills)."""
    params = _transcoder_params(cfg, jnp.zeros((d_in, cfg.d_sae)), jnp.zeros((cfg.d_sae, d_out)),
                                jnp.zeros((d_out,)))
    return TrainState(params=params, opt_state=make_optimizer(cfg).init(params), step=jnp.zeros((), jnp.int32),
                      since_fired=jnp.zeros((cfg.d_sae,), jnp.int32), scale=jnp.zeros((), jnp.float32), cfg=cfg,
                      scale_out=jnp.zeros((), jnp.float32))


def init_transcoder_state(cfg: TranscoderConfig, d_in: int, d_out: int, x_sample: Any, y_sample: Any) -> TrainState:
    """A fresh transcoder state from paired samples ``x_sample [n, d_in]`` (the transcoder's input)
    and ``y_sample [n, d_out]`` (its target output): each gets its own scale; ``b_dec`` is the
    ``b_dec_init`` of the scaled ``y``; ``W_dec`` rows and ``W_enc`` columns are random unit vectors
    (independent draws: input and output bases differ); ``b_enc`` and ``W_skip`` start at 0."""
    if not isinstance(cfg, TranscoderConfig):
        raise JfigError(f"init_transcoder_state takes a TranscoderConfig, got {type(cfg).__name__}")
    x_sample = jnp.asarray(x_sample, jnp.float32).reshape(-1, d_in)
    y_sample = jnp.asarray(y_sample, jnp.float32).reshape(-1, d_out)
    scale = _scale_of(x_sample, d_in, cfg, "transcoder inputs")
    scale_out = _scale_of(y_sample, d_out, cfg, "transcoder outputs")
    b_dec = _b_dec_init(y_sample * scale_out, d_out, cfg)
    W_enc = jax.random.normal(jax.random.fold_in(jax.random.key(cfg.seed), 1), (d_in, cfg.d_sae), jnp.float32)
    W_enc = W_enc / jnp.linalg.norm(W_enc, axis=0, keepdims=True)
    params = _transcoder_params(cfg, W_enc, _unit_decoder(cfg, d_out), b_dec)
    return TrainState(params=params, opt_state=make_optimizer(cfg).init(params), step=jnp.zeros((), jnp.int32),
                      since_fired=jnp.zeros((cfg.d_sae,), jnp.int32), scale=jnp.asarray(scale, jnp.float32),
                      cfg=cfg, scale_out=jnp.asarray(scale_out, jnp.float32))


def _unit_rows(W: jax.Array, axes: tuple[int, ...] = (-1,)) -> jax.Array:
    norm = jnp.linalg.norm(W, axis=-1, keepdims=True) if axes == (-1,) else \
        jnp.sqrt(jnp.sum(W * W, axis=axes, keepdims=True))
    return W / jnp.maximum(norm, 1e-12)


@lru_cache(maxsize=64)
def _step_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the fields the update never reads set to their defaults, so that runs differing
    only in those (seed, batch size, initialisation, bookkeeping) share one compiled step."""
    return dataclasses.replace(cfg, **{f.name: f.default for f in dataclasses.fields(TrainConfig)
                                       if f.name in INIT_ONLY_FIELDS})


def _update(params: dict, opt_state: Any, step: jax.Array, since_fired: jax.Array, loss_fn: Any, n_tokens: int,
            finite: jax.Array, cfg: TrainConfig, row_axes: tuple[int, ...] = (-1,)
            ) -> tuple[tuple, jax.Array, dict[str, jax.Array]]:
    """One Adam update of ``params`` on ``loss_fn(params, dead) -> (loss, aux)``, shared by SAEs,
    transcoders and cross-layer transcoders: decoder rows (a row spans ``row_axes`` of ``W_dec``)
    kept on the unit sphere, latents' silence counted, and nothing but the step count changed when
    the batch was not ``finite``. Returns ``((params, opt_state, step, since_fired), loss, aux)``."""
    dead = since_fired >= cfg.dead_after_tokens
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, dead)
    if cfg.normalize_decoder:  # move along the unit sphere of each decoder row
        W, g = params["W_dec"], grads["W_dec"]
        grads = {**grads, "W_dec": g - jnp.sum(g * W, axis=row_axes, keepdims=True) * W}
    updates, new_opt_state = make_optimizer(cfg).update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if cfg.normalize_decoder:
        new_params = {**new_params, "W_dec": _unit_rows(new_params["W_dec"], row_axes)}
    since = jnp.where(aux["fired"] > 0, 0, jnp.minimum(since_fired + n_tokens, COUNTER_CAP)).astype(jnp.int32)
    # A batch with NaN/inf changes nothing but the step count; fit raises on it.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new = (keep(new_params, params), keep(new_opt_state, opt_state), step + 1, keep(since, since_fired))
    return new, loss, aux


def _metrics(loss: jax.Array, aux: dict, since_fired: jax.Array, step: jax.Array, finite: jax.Array,
             n_tokens: int, cfg: TrainConfig) -> dict[str, jax.Array]:
    return {"loss": loss, "mse": aux["mse"], "fvu": aux["fvu"], "explained_variance": 1.0 - aux["fvu"],
            "l0": aux["l0"], "sparsity_loss": aux["sparsity_loss"],
            "dead_fraction": jnp.mean(since_fired >= cfg.dead_after_tokens),
            "lr": make_schedule(cfg)(step), "finite": finite, "tokens": jnp.asarray(n_tokens)}


@partial(jax.jit, static_argnames="cfg")
def _core_step(arrays: tuple, batch: jax.Array, cfg: TrainConfig) -> tuple[tuple, dict[str, jax.Array]]:
    params, opt_state, step, since_fired, scale = arrays
    d_in = params["b_dec"].shape[0]
    x = batch.astype(jnp.float32).reshape(-1, d_in) * scale
    finite = jnp.all(jnp.isfinite(x))
    x = jnp.where(finite, x, 0.0)
    new, loss, aux = _update(params, opt_state, step, since_fired, lambda p, dead: sae_loss(p, x, dead, cfg),
                             x.shape[0], finite, cfg)
    return (*new, scale), _metrics(loss, aux, new[3], step, finite, x.shape[0], cfg)


@partial(jax.jit, static_argnames="cfg")
def _transcoder_core_step(arrays: tuple, x: jax.Array, y: jax.Array, cfg: TrainConfig
                          ) -> tuple[tuple, dict[str, jax.Array]]:
    params, opt_state, step, since_fired, scale, scale_out = arrays
    d_in, d_out = params["W_enc"].shape[0], params["b_dec"].shape[0]
    x = x.astype(jnp.float32).reshape(-1, d_in) * scale
    y = y.astype(jnp.float32).reshape(-1, d_out) * scale_out
    finite = jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(y))
    x, y = jnp.where(finite, x, 0.0), jnp.where(finite, y, 0.0)
    new, loss, aux = _update(params, opt_state, step, since_fired,
                             lambda p, dead: transcoder_loss(p, x, y, dead, cfg), x.shape[0], finite, cfg)
    return (*new, scale, scale_out), _metrics(loss, aux, new[3], step, finite, x.shape[0], cfg)


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


def transcoder_train_step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam update of a transcoder on a batch of pairs: input ``x [batch, d_in]`` and target
    output ``y [batch, d_out]`` (raw; scaled inside); one jitted call. Metrics as :func:`train_step`'s,
    with fvu / mse / explained_variance those of ``y``."""
    if state.scale_out is None:
        raise JfigError("transcoder_train_step needs a transcoder's state (init_transcoder_state); this one is an "
                        "SAE's: use train_step")
    if x.shape[0] != y.shape[0]:
        raise JfigError(f"transcoder batch has {x.shape[0]} input rows but {y.shape[0]} output rows; expected pairs")
    arrays = (state.params, state.opt_state, state.step, state.since_fired, state.scale, state.scale_out)
    (params, opt_state, step, since_fired, scale, scale_out), metrics = _transcoder_core_step(
        arrays, x, y, cfg=_step_config(state.cfg))
    return TrainState(params=params, opt_state=opt_state, step=step, since_fired=since_fired, scale=scale,
                      cfg=state.cfg, scale_out=scale_out), metrics


def transcoder_from_state(state: TrainState, read_site: str, write_site: str, *, model: Any = None,
                          metadata: dict[str, Any] | None = None) -> Transcoder:
    """The inference :class:`~jfig.saes.Transcoder` of a transcoder training state, taking raw
    (unscaled) inputs and writing raw outputs.

    The scales are folded in: ``W_enc * s_in``, ``W_dec / s_out``, ``b_dec / s_out``, ``W_skip *
    s_in / s_out``; jumprelu gets ``threshold = exp(log_threshold)`` (positive, so SAELens's and
    circuit-tracer's JumpReLU agree on it); topk keeps ``k``. Its input is what training took: for a
    ``read_site`` at the MLP's input (ln2.hook_normalized, mlp.hook_in) that is hook_resid_mid through
    the model's second norm, attached when ``model`` is given (:meth:`Transcoder.with_input_norm`).
    ``metadata`` adds to the recorded hooks, config and step count."""
    cfg = state.cfg
    p = state.params
    s_in, s_out = state.scale, state.scale_out
    meta = {"hook_name": read_site, "hook_name_out": write_site, "train_config": dataclasses.asdict(cfg),
            "train_steps": int(state.step), **(metadata or {})}
    tc = Transcoder(W_enc=p["W_enc"] * s_in, b_enc=p["b_enc"], W_dec=p["W_dec"] / s_out, b_dec=p["b_dec"] / s_out,
                    W_skip=p["W_skip"] * (s_in / s_out) if "W_skip" in p else None,
                    threshold=jnp.exp(p["log_threshold"]) if cfg.architecture == "jumprelu" else None,
                    read_site=read_site, write_site=write_site, architecture=cfg.architecture, k=cfg.k,
                    jump="saelens", metadata=meta)
    return tc if model is None else tc.with_input_norm(model)


# ---------------------------------------------------------------------------------- cross-layer transcoders


def _clt_params(cfg: CLTConfig, W_enc: jax.Array, W_dec: jax.Array, b_dec: jax.Array) -> dict[str, jax.Array]:
    n_layers = W_enc.shape[0]
    params = {"W_enc": W_enc, "b_enc": jnp.zeros((n_layers, cfg.d_sae)), "W_dec": W_dec, "b_dec": b_dec}
    if cfg.architecture == "jumprelu":
        params["log_threshold"] = jnp.full((n_layers, cfg.d_sae), math.log(cfg.jumprelu_init_threshold))
    return params


def _clt_state(cfg: CLTConfig, params: dict, scale: jax.Array, scale_out: jax.Array) -> TrainState:
    return TrainState(params=params, opt_state=make_optimizer(cfg).init(params), step=jnp.zeros((), jnp.int32),
                      since_fired=jnp.zeros(params["b_enc"].shape, jnp.int32), scale=scale, cfg=cfg,
                      scale_out=scale_out)


def empty_clt_state(cfg: CLTConfig, n_layers: int, d_in: int, d_out: int) -> TrainState:
    """A zero cross-layer transcoder state of the right structure (the template a checkpoint fills)."""
    params = _clt_params(cfg, jnp.zeros((n_layers, d_in, cfg.d_sae)), jnp.zeros((n_layers, cfg.d_sae, n_layers, d_out)),
                         jnp.zeros((n_layers, d_out)))
    return _clt_state(cfg, params, jnp.zeros((n_layers,)), jnp.zeros((n_layers,)))


def init_clt_state(cfg: CLTConfig, n_layers: int, d_in: int, d_out: int, x_sample: Any, y_sample: Any) -> TrainState:
    """A fresh cross-layer transcoder state from paired samples ``x_sample [n, L, d_in]`` and
    ``y_sample [n, L, d_out]``: each layer's inputs and outputs get their own scale; ``b_dec[m]`` is
    the ``b_dec_init`` of the scaled ``y_m``; each feature's decoder (its rows into every layer it
    writes, concatenated) and each ``W_enc`` column are random unit vectors; ``b_enc`` starts at 0."""
    if not isinstance(cfg, CLTConfig):
        raise JfigError(f"init_clt_state takes a CLTConfig, got {type(cfg).__name__}")
    x_sample = jnp.asarray(x_sample, jnp.float32).reshape(-1, n_layers, d_in)
    y_sample = jnp.asarray(y_sample, jnp.float32).reshape(-1, n_layers, d_out)
    scale = jnp.asarray([_scale_of(x_sample[:, i], d_in, cfg, f"inputs of read layer {i}")
                         for i in range(n_layers)], jnp.float32)
    scale_out = jnp.asarray([_scale_of(y_sample[:, i], d_out, cfg, f"outputs of write layer {i}")
                             for i in range(n_layers)], jnp.float32)
    y_scaled = y_sample * scale_out[:, None]
    b_dec = jnp.stack([_b_dec_init(y_scaled[:, i], d_out, cfg) for i in range(n_layers)])
    key = jax.random.key(cfg.seed)
    W_enc = jax.random.normal(jax.random.fold_in(key, 1), (n_layers, d_in, cfg.d_sae), jnp.float32)
    W_enc = W_enc / jnp.linalg.norm(W_enc, axis=1, keepdims=True)
    W_dec = jax.random.normal(key, (n_layers, cfg.d_sae, n_layers, d_out), jnp.float32) * clt_mask(n_layers)
    params = _clt_params(cfg, W_enc, _unit_rows(W_dec, (-2, -1)), b_dec)
    return _clt_state(cfg, params, scale, scale_out)


@partial(jax.jit, static_argnames="cfg")
def _clt_core_step(arrays: tuple, x: jax.Array, y: jax.Array, cfg: TrainConfig) -> tuple[tuple, dict[str, jax.Array]]:
    params, opt_state, step, since_fired, scale, scale_out = arrays
    n_layers, d_in = params["W_enc"].shape[:2]
    d_out = params["b_dec"].shape[1]
    x = x.astype(jnp.float32).reshape(-1, n_layers, d_in) * scale[:, None]
    y = y.astype(jnp.float32).reshape(-1, n_layers, d_out) * scale_out[:, None]
    finite = jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(y))
    x, y = jnp.where(finite, x, 0.0), jnp.where(finite, y, 0.0)
    new, loss, aux = _update(params, opt_state, step, since_fired, lambda p, dead: clt_loss(p, x, y, dead, cfg),
                             x.shape[0], finite, cfg, row_axes=(-2, -1))
    return (*new, scale, scale_out), _metrics(loss, aux, new[3], step, finite, x.shape[0], cfg)


def clt_train_step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam update of a cross-layer transcoder on ``x [batch, L, d_in]`` (every read layer's
    input) and ``y [batch, L, d_out]`` (every write layer's target), raw (scaled inside); one jitted
    call. Metrics as :func:`train_step`'s, fvu pooled over the layers and l0 summed over them."""
    if state.scale_out is None or state.params["W_enc"].ndim != 3:
        raise JfigError("clt_train_step needs a cross-layer transcoder's state (init_clt_state)")
    arrays = (state.params, state.opt_state, state.step, state.since_fired, state.scale, state.scale_out)
    (params, opt_state, step, since_fired, scale, scale_out), metrics = _clt_core_step(
        arrays, x, y, cfg=_step_config(state.cfg))
    return TrainState(params=params, opt_state=opt_state, step=step, since_fired=since_fired, scale=scale,
                      cfg=state.cfg, scale_out=scale_out), metrics


def clt_from_state(state: TrainState, read_sites: list[str], write_sites: list[str], *, model: Any = None,
                   metadata: dict[str, Any] | None = None) -> list[Transcoder]:
    """The inference cross-layer transcoder of a training state: one :class:`~jfig.saes.Transcoder`
    per read layer ``i`` (reading ``read_sites[i]``), whose ``W_dec`` writes ``write_sites[i]`` and
    ``W_dec_later [d_tc, L - i - 1, d_out]`` the later ``write_sites``, with ``b_dec`` the bias of
    its own write layer (as :func:`jfig.saes.load_transcoders` splits a circuit-tracer CLT).

    The scales are folded in (``W_enc[i] * s_in[i]``, rows into layer m ``/ s_out[m]``, ``b_dec[m] /
    s_out[m]``); JumpReLU is circuit-tracer's (``pre`` above ``threshold = exp(log_threshold)``, which
    is positive, so it equals the relu'd form); the model's input norm is attached when ``model`` is
    given and the read hooks are at the MLP's input."""
    cfg = state.cfg
    p = jax.device_get(state.params)
    s_in, s_out = jnp.asarray(state.scale), jnp.asarray(state.scale_out)
    n_layers = p["W_enc"].shape[0]
    W_dec = jnp.asarray(p["W_dec"]) * clt_mask(n_layers) / s_out[None, None, :, None]
    out = []
    for i in range(n_layers):
        meta = {"hook_name": read_sites[i], "hook_name_out": write_sites[i], "cross_layer": True, "layer_index": i,
                "train_config": dataclasses.asdict(cfg), "train_steps": int(state.step), **(metadata or {})}
        later = W_dec[i, :, i + 1:] if i + 1 < n_layers else None
        tc = Transcoder(W_enc=p["W_enc"][i] * s_in[i], b_enc=p["b_enc"][i], W_dec=W_dec[i, :, i],
                        b_dec=p["b_dec"][i] / s_out[i], W_dec_later=later, later_sites=tuple(write_sites[i + 1:]),
                        threshold=jnp.exp(p["log_threshold"][i]) if cfg.architecture == "jumprelu" else None,
                        read_site=read_sites[i], write_site=write_sites[i], architecture=cfg.architecture, k=cfg.k,
                        jump="circuit_tracer", metadata=meta)
        out.append(tc if model is None else tc.with_input_norm(model))
    return out


# ---------------------------------------------------------------------------------- crosscoders


def empty_crosscoder_state(cfg: CrosscoderConfig, n_layers: int, d_in: int) -> TrainState:
    """A zero crosscoder state of the right structure (the template a checkpoint fills): an SAE state
    on ``L * d_in`` inputs with one scale per layer (``scale [L]``)."""
    state = empty_state(cfg, n_layers * d_in)
    return dataclasses.replace(state, scale=jnp.zeros((n_layers,), jnp.float32))


def init_crosscoder_state(cfg: CrosscoderConfig, n_layers: int, d_in: int, sample: Any) -> TrainState:
    """A fresh crosscoder state from ``sample [n, L, d_in]``: each layer scaled to mean norm
    ``sqrt(d_in)`` (one factor per layer), then the SAE initialisation of the stacked, scaled rows
    (``b_dec`` their ``b_dec_init``; unit decoder rows over all layers; ``W_enc = W_dec.T``)."""
    if not isinstance(cfg, CrosscoderConfig):
        raise JfigError(f"init_crosscoder_state takes a CrosscoderConfig, got {type(cfg).__name__}")
    sample = jnp.asarray(sample, jnp.float32).reshape(-1, n_layers, d_in)
    scale = jnp.asarray([_scale_of(sample[:, i], d_in, cfg, f"activations of crosscoder layer {i}")
                         for i in range(n_layers)], jnp.float32)
    flat = (sample * scale[:, None]).reshape(-1, n_layers * d_in)
    unscaled = dataclasses.replace(cfg, scale_activations=False)
    state = init_train_state(unscaled, n_layers * d_in, flat)
    return dataclasses.replace(state, scale=scale, cfg=cfg)


def _crosscoder_metrics(loss, aux, since_fired, step, finite, n_tokens, cfg) -> dict[str, jax.Array]:
    return {**_metrics(loss, aux, since_fired, step, finite, n_tokens, cfg), "interaction": aux["interaction"]}


@partial(jax.jit, static_argnames="cfg")
def _crosscoder_core_step(arrays: tuple, x: jax.Array, readers: jax.Array | None, cfg: TrainConfig
                          ) -> tuple[tuple, dict[str, jax.Array]]:
    params, opt_state, step, since_fired, scale = arrays
    n_layers = scale.shape[0]
    d_in = params["b_dec"].shape[0] // n_layers
    x = x.astype(jnp.float32).reshape(-1, n_layers, d_in) * scale[:, None]
    finite = jnp.all(jnp.isfinite(x))
    x = jnp.where(finite, x, 0.0)
    new, loss, aux = _update(params, opt_state, step, since_fired,
                             lambda p, dead: crosscoder_loss(p, x, dead, cfg, readers), x.shape[0], finite, cfg)
    return (*new, scale), _crosscoder_metrics(loss, aux, new[3], step, finite, x.shape[0], cfg)


def crosscoder_train_step(state: TrainState, x: jax.Array, readers: jax.Array | None = None
                          ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One Adam update of a crosscoder on ``x [batch, L, d_in]`` (raw; each layer scaled inside); one
    jitted call. ``readers [L, d_in, F, c]`` (unit columns) switch the interaction penalty on (with
    ``cfg.interaction_penalty``). Metrics as :func:`train_step`'s (fvu pooled over layers) plus
    ``interaction`` (the penalty's value, 0 without readers)."""
    if state.scale.ndim != 1:
        raise JfigError("crosscoder_train_step needs a crosscoder's state (init_crosscoder_state)")
    arrays = (state.params, state.opt_state, state.step, state.since_fired, state.scale)
    (params, opt_state, step, since_fired, scale), metrics = _crosscoder_core_step(
        arrays, x, readers, cfg=_step_config(state.cfg))
    return TrainState(params=params, opt_state=opt_state, step=step, since_fired=since_fired, scale=scale,
                      cfg=state.cfg), metrics


def crosscoder_from_state(state: TrainState, sites: list[str], *, metadata: dict[str, Any] | None = None
                          ) -> Crosscoder:
    """The inference :class:`~jfig.saes.crosscoder.Crosscoder` of a training state, taking raw
    activations: layer l's scale ``s_l`` folded in (``W_enc_l * s_l``, ``W_dec[:, l] / s_l``,
    ``b_dec_l / s_l``) and recorded as the layer's mean norm ``sqrt(d) / s_l`` (``layer_norms``); jumprelu gets ``threshold = exp(log_threshold)``; topk keeps ``k``."""
    cfg = state.cfg
    p = jax.device_get(state.params)
    s = jnp.asarray(state.scale)
    n_layers = s.shape[0]
    d_in = p["b_dec"].shape[0] // n_layers
    W_enc = jnp.asarray(p["W_enc"]).reshape(n_layers, d_in, -1) * s[:, None, None]
    W_dec = jnp.asarray(p["W_dec"]).reshape(-1, n_layers, d_in) / s[None, :, None]
    b_dec = jnp.asarray(p["b_dec"]).reshape(n_layers, d_in) / s[:, None]
    meta = {"sites": list(sites), "train_config": dataclasses.asdict(cfg), "train_steps": int(state.step),
            **(metadata or {})}
    norms = math.sqrt(d_in) / np.asarray(s, np.float64) if cfg.scale_activations else None  # mean ||x_l||
    return Crosscoder(W_enc, p["b_enc"], W_dec, b_dec, sites,
                      threshold=jnp.exp(p["log_threshold"]) if cfg.architecture == "jumprelu" else None,
                      architecture=cfg.architecture, k=cfg.k, layer_norms=norms, metadata=meta)
