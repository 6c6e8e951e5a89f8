"""Training a neural factorization machine (:class:`~jfig.saes.nfm.NFM`) on an SAE's features, and the
matched-parameter secondary SAE it is compared with.

:func:`fit_nfm` trains on pairs ``(f [n_rows, n], y [n_rows, d])`` through the SAE trainer's loop
(:class:`~jfig.saes.train.loop.BatchSource`, :func:`~jfig.saes.train.loop.start_state`,
:func:`~jfig.saes.train.loop.run_loop`), its schedule and optimiser (:func:`make_optimizer`) and its
atomic checkpoints, so a run resumed from its folder ends with exactly the parameters of an
uninterrupted one. The state is an :class:`NFMState` (the SAE's :class:`TrainState` carries an
encoder, dead-latent counters and a decoder on the unit sphere, none of which an NFM has).

:func:`train_nfm` captures the SAE's site from a model, encodes it with the SAE and forms the target
on the device, batch by batch (:class:`FeatureCapture`). :func:`train_secondary_sae` trains an SAE on
the same error stream with as many parameters as the NFM (:func:`matched_d_sae`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jfig.data import tokens_from
from jfig.data.files import fingerprint
from jfig.errors import JfigError, ShapeError
from jfig.saes.nfm import NFM, TARGETS
from jfig.saes.sae import SAE
from jfig.saes.train.checkpoint import checkpoint_dirs
from jfig.saes.train.config import DECAYS, TrainConfig
from jfig.saes.train.fit import fit
from jfig.saes.train.loop import BatchSource, Part, run_loop, run_meta, start_state
from jfig.saes.train.step import make_optimizer, make_schedule
from jfig.saes.train.transcoder import capture_all, capture_tokens, streamed

# Fields the update step never reads (runs differing only in these share one compiled step), and those
# a resumed run may change.
NFM_INIT_ONLY = ("batch_size", "embed_scale", "init_batches", "scale_activations", "seed", "checkpoint_every",
                 "keep_checkpoints", "log_every")


@dataclasses.dataclass(frozen=True)
class NFMConfig:
    """Hyperparameters of one NFM training run.

    Sizes: ``k`` (the embedding size K), ``hidden`` (the width of the output layer's hidden ReLU layer;
    None: K, as the seed's ``Linear(K, K) + ReLU + Linear(K, d)``; 0: a projection K -> d).
    Schedule as :class:`~jfig.saes.train.TrainConfig`: ``steps`` Adam updates (``adam_b1``,
    ``adam_b2``, ``adam_eps``, optional ``max_grad_norm``), peak ``lr``, linear warm-up over
    ``warmup_steps``, then ``decay`` "cosine" | "linear" to 0, or "constant". ``batch_size`` tokens a
    step. The loss is the mean squared error ``mean_rows ||y - y_hat||^2`` on scaled data.

    Scaling (``scale_activations``): features by ``1 / mean |f|`` over their nonzero entries (a
    typical active feature is 1) and targets to mean norm ``sqrt(d)``, both from the first
    ``init_batches`` batches and folded back into the returned NFM, so hyperparameters transfer
    between sites. ``embed_scale``: the standard deviation of ``V`` at initialisation (in scaled
    units). Bookkeeping: ``seed``, ``checkpoint_every``, ``keep_checkpoints``, ``log_every``.
    """

    k: int
    hidden: int | None = None
    steps: int = 2_000
    batch_size: int = 1024
    lr: float = 1e-3
    warmup_steps: int = 50
    decay: str = "cosine"
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    embed_scale: float = 0.1
    scale_activations: bool = True
    init_batches: int = 2
    seed: int = 0
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("k", "steps", "batch_size", "init_batches", "keep_checkpoints", "log_every"):
            self._positive_int(name)
        self._positive_int("checkpoint_every", allow_none=True)
        if self.hidden is not None and (not isinstance(self.hidden, (int, np.integer)) or isinstance(self.hidden, bool)
                                        or self.hidden < 0):
            raise JfigError(f"NFMConfig.hidden must be None (K), 0 (no hidden layer) or a positive int, got "
                            f"{self.hidden!r}")
        if self.decay not in DECAYS:
            raise JfigError(f"NFMConfig.decay {self.decay!r} is unknown; expected one of {DECAYS}")
        if not self.lr > 0 or not self.embed_scale > 0 or self.warmup_steps < 0:
            raise JfigError(f"NFMConfig: lr and embed_scale must be > 0 and warmup_steps >= 0; got {self.lr}, "
                            f"{self.embed_scale} and {self.warmup_steps}")

    def _positive_int(self, name: str, allow_none: bool = False) -> None:
        value = getattr(self, name)
        if value is None and allow_none:
            return
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise JfigError(f"NFMConfig.{name} must be a positive int, got {value!r}")

    @property
    def resolved_hidden(self) -> int:
        return self.k if self.hidden is None else int(self.hidden)


class NFMState(eqx.Module):
    """What an NFM run carries from step to step: ``params`` (``W_lin [n, d]``, ``b [d]``, ``V [n, K]``,
    ``W_out``, and ``W_hidden [K, H]`` with a hidden layer; scaled units), the optax state, ``step``
    (int32 ``[]``), ``scale_in`` and ``scale_out`` (float32 ``[]``: features' and targets' scales)."""

    params: dict[str, jax.Array]
    opt_state: Any
    step: jax.Array
    scale_in: jax.Array
    scale_out: jax.Array
    cfg: NFMConfig = eqx.field(static=True)


def _fresh_params(cfg: NFMConfig, n: int, d: int) -> dict[str, jax.Array]:
    nfm = NFM.init(jax.random.key(cfg.seed), n, d, cfg.k, "training", hidden=cfg.resolved_hidden,
                   embed_scale=cfg.embed_scale)
    params = {"W_lin": nfm.W_lin, "b": nfm.b, "V": nfm.V, "W_out": nfm.W_out}
    if nfm.W_hidden is not None:
        params["W_hidden"] = nfm.W_hidden
    return params


def _state(cfg: NFMConfig, params: dict, scale_in: float, scale_out: float) -> NFMState:
    return NFMState(params=params, opt_state=make_optimizer(cfg).init(params), step=jnp.zeros((), jnp.int32),
                    scale_in=jnp.asarray(scale_in, jnp.float32), scale_out=jnp.asarray(scale_out, jnp.float32),
                    cfg=cfg)


def empty_nfm_state(cfg: NFMConfig, n: int, d: int) -> NFMState:
    """A state of the right structure, shapes and dtypes (the template a checkpoint fills)."""
    return _state(cfg, jax.tree.map(jnp.zeros_like, _fresh_params(cfg, n, d)), 0.0, 0.0)


def init_nfm_state(cfg: NFMConfig, n: int, d: int, f_sample: Any, y_sample: Any) -> NFMState:
    """A fresh state from samples ``f_sample [rows, n]`` and ``y_sample [rows, d]``: the scales (see
    :class:`NFMConfig`), ``V`` random from ``cfg.seed``, ``b`` the mean scaled target, the rest 0."""
    f = jnp.asarray(f_sample, jnp.float32).reshape(-1, n)
    y = jnp.asarray(y_sample, jnp.float32).reshape(-1, d)
    scale_in = scale_out = 1.0
    if cfg.scale_activations:
        active = jnp.abs(f) > 0
        count = int(jnp.sum(active))
        if count == 0:
            raise JfigError("cannot scale the NFM's features: no feature is active on the first batches; expected "
                            "SAE feature activations with nonzero entries")
        scale_in = count / float(jnp.sum(jnp.abs(f)))
        mean_norm = float(jnp.mean(jnp.linalg.norm(y, axis=-1)))
        if not mean_norm > 0:
            raise JfigError("cannot scale the NFM's targets: their mean norm is 0 on the first batches; expected a "
                            "nonzero target (or scale_activations=False)")
        scale_out = math.sqrt(d) / mean_norm
    params = _fresh_params(cfg, n, d)
    params["b"] = jnp.mean(y * scale_out, axis=0)
    return _state(cfg, params, scale_in, scale_out)


@lru_cache(maxsize=64)
def _step_config(cfg: NFMConfig) -> NFMConfig:
    return dataclasses.replace(cfg, **{name: NFMConfig.__dataclass_fields__[name].default for name in NFM_INIT_ONLY})


def _model_of(params: dict) -> NFM:
    return NFM(W_lin=params["W_lin"], b=params["b"], V=params["V"], W_out=params["W_out"],
               W_hidden=params.get("W_hidden"), site="training")


@partial(jax.jit, static_argnames="cfg")
def _nfm_core_step(arrays: tuple, f: jax.Array, y: jax.Array, cfg: NFMConfig) -> tuple[tuple, dict[str, jax.Array]]:
    params, opt_state, step, scale_in, scale_out = arrays
    n, d = params["W_lin"].shape
    f = f.astype(jnp.float32).reshape(-1, n) * scale_in
    y = y.astype(jnp.float32).reshape(-1, d) * scale_out
    finite = jnp.all(jnp.isfinite(f)) & jnp.all(jnp.isfinite(y))
    f, y = jnp.where(finite, f, 0.0), jnp.where(finite, y, 0.0)

    def loss_fn(p):
        lin, inter = _model_of(p).parts(f)
        err = y - lin - inter
        return jnp.mean(jnp.sum(err * err, axis=-1)), (err, inter)

    (loss, (err, inter)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, new_opt = make_optimizer(cfg).update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    total = jnp.sum((y - jnp.mean(y, axis=0)) ** 2)
    fvu = jnp.sum(err * err) / jnp.maximum(total, 1e-30)
    metrics = {"loss": loss, "mse": loss, "fvu": fvu, "explained_variance": 1.0 - fvu,
               "interaction_norm": jnp.mean(jnp.linalg.norm(inter, axis=-1)),
               "l0": jnp.mean(jnp.sum(f != 0, axis=-1).astype(jnp.float32)), "lr": make_schedule(cfg)(step),
               "finite": finite, "tokens": jnp.asarray(f.shape[0])}
    return (keep(new_params, params), keep(new_opt, opt_state), step + 1, scale_in, scale_out), metrics


def nfm_train_step(state: NFMState, f: jax.Array, y: jax.Array) -> tuple[NFMState, dict[str, jax.Array]]:
    """One Adam update on features ``f [batch, n]`` and targets ``y [batch, d]`` (raw; scaled inside);
    one jitted call, compiled once per shape and update-relevant config. Metrics: loss (= mse, scaled
    units), fvu and explained_variance of the batch's target, interaction_norm (mean norm of the
    interaction part), l0 (active features per row), lr, finite (False: the batch had NaN/inf and the
    state is unchanged but for ``step``), tokens."""
    arrays = (state.params, state.opt_state, state.step, state.scale_in, state.scale_out)
    (params, opt_state, step, scale_in, scale_out), metrics = _nfm_core_step(arrays, f, y, cfg=_step_config(state.cfg))
    return NFMState(params=params, opt_state=opt_state, step=step, scale_in=scale_in, scale_out=scale_out,
                    cfg=state.cfg), metrics


def nfm_from_state(state: NFMState, site: str, target: str = "error", *, metadata: dict | None = None) -> NFM:
    """The :class:`NFM` of a training state, on raw features and raw targets: with ``s`` the features'
    scale and ``t`` the targets', ``V * s``, ``W_lin * s / t``, ``b / t``, ``W_out / t`` (exact: the
    pooling is quadratic in ``f`` and linear in ``V V``, and the output layer is positively homogeneous)."""
    p = jax.device_get(state.params)
    s, t = float(state.scale_in), float(state.scale_out)
    meta = {"train_config": dataclasses.asdict(state.cfg), "train_steps": int(state.step), **(metadata or {})}
    return NFM(W_lin=p["W_lin"] * (s / t), b=p["b"] / t, V=p["V"] * s, W_out=p["W_out"] / t,
               W_hidden=p.get("W_hidden"), site=site, target=target, metadata=meta)


def fit_nfm(pairs: Any, n: int, d: int, site: str, cfg: NFMConfig, *, target: str = "error",
            checkpoint_dir: str | os.PathLike | None = None, progress: bool = True, max_steps: int | None = None,
            callback: Callable[[int, NFMState, dict[str, jax.Array]], None] | None = None,
            meta: dict[str, Any] | None = None) -> tuple[NFM, dict[str, np.ndarray]]:
    """Train an NFM from ``n`` features to ``d`` targets; returns ``(nfm, history)``.

    ``pairs``: arrays ``(f [rows, n], y [rows, d])`` (each step takes ``cfg.batch_size`` rows of a
    per-epoch permutation seeded by ``(cfg.seed, epoch)``), a callable ``batch_at(step) -> (f, y)``
    deterministic in ``step``, or an iterable of such pairs. Checkpoints in ``checkpoint_dir`` and exact
    resume, ``max_steps`` and ``callback`` as :func:`jfig.saes.train.fit`; ``meta`` adds what a
    checkpoint must match (e.g. the SAE's fingerprint). Raises ShapeError on batches of the wrong width,
    JfigError on NaN/inf and FormatError on a corrupt checkpoint."""
    for name, value in (("n", n), ("d", d)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ShapeError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(cfg, NFMConfig):
        raise JfigError(f"fit_nfm takes an NFMConfig, got {type(cfg).__name__}")
    if target not in TARGETS:
        raise JfigError(f"target {target!r} is unknown; expected one of {TARGETS}")
    n, d = int(n), int(d)
    label = f"the NFM at {site}"
    batches = BatchSource(pairs, cfg, (Part("features", "n", n, "features "), Part("targets", "d", d, "targets ")),
                          label)
    record = {**run_meta(cfg, site, d_in=n, d_out=d), "target": target, **(meta or {})}
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state, history = start_state(batches, folder, record, template=lambda: empty_nfm_state(cfg, n, d),
                                 init=lambda first: init_nfm_state(cfg, n, d, *first))
    state, history = run_loop(state, history, batches, lambda s, b: nfm_train_step(s, *b), record, folder,
                              desc=f"NFM {site}", progress=progress, max_steps=max_steps, callback=callback)
    last = {key: float(history[key][-1]) for key in ("loss", "fvu") if key in history}
    return nfm_from_state(state, site, target, metadata={"train_metrics": last}), history


# ---------------------------------------------------------------------------------- from a model


def check_sae_site(model: Any, sae: Any, what: str = "the NFM") -> str:
    """The SAE's site, checked against ``model`` before any work: SiteError when the model has no such
    site, ShapeError when the site's width is not the SAE's ``d_in`` (an SAE from another site or model)."""
    if not isinstance(sae, SAE):
        raise JfigError(f"{what} needs a jfig.saes.SAE, got {type(sae).__name__}")
    site = model.check_site(sae.site)
    width = model.site_width(site)
    if width is not None and width != sae.d_in:
        raise ShapeError(f"the SAE reads {site} with d_in {sae.d_in}, but that site of the model has width {width}; "
                         f"{what} needs the SAE trained at this model's {site} (an SAE from another site or model "
                         f"does not fit)")
    return site


@eqx.filter_jit
def encode_rows(sae: SAE, x: jax.Array, target: str) -> tuple[jax.Array, jax.Array]:
    """``x [rows, ...]`` (the SAE's site) -> ``(f [rows, n], y [rows, d_in])``: the SAE's features and
    the NFM's target (``x - x_hat`` for "error", ``x`` for "next")."""
    f, stats = sae.encode_with_stats(x)
    x = x.astype(jnp.float32)
    y = x - sae.decode(f, stats).reshape(x.shape) if target == "error" else x
    return f.reshape(x.shape[0], -1), y.reshape(x.shape[0], -1)


@eqx.filter_jit
def _site_rows(model: Any, sae: SAE, tokens: jax.Array, n: int, start: int) -> jax.Array:
    cache = model.run(tokens, capture=(sae.site,), stop_at=sae.site, logits=False).cache
    x = cache[sae.site][:n, start:]
    return x.reshape(-1, *x.shape[2:])


class FeatureCapture:
    """Rows ``(f, y)`` of sequences of int tokens for an SAE at its site: the model runs to the site,
    the SAE encodes it and the target is formed, all on the device (``encode_rows``). With
    ``stream=False`` the site's activations are captured once (``[n_seq, seq - 1, d]`` on the device)
    and encoded per batch; with ``stream=True`` each batch of sequences is run through the model.
    Position 0 is dropped (``drop_first``), as the SAE trainer drops it."""

    def __init__(self, model: Any, sae: SAE, tokens: Any, target: str, *, stream: bool, drop_first: bool = True,
                 capture_batch_size: int = 32):
        self.site = check_sae_site(model, sae)
        self.model, self.sae, self.target, self.drop_first = model, sae, target, drop_first
        self.tokens = capture_tokens(model, tokens, drop_first)
        self.x = None if stream else self.capture_site(capture_batch_size)

    @property
    def rows_per_sequence(self) -> int:
        return self.tokens.shape[1] - (1 if self.drop_first else 0)

    def run(self, batch: np.ndarray, n: int) -> tuple[jax.Array]:
        """The site's rows ``[n * rows_per_sequence, ...]`` of the first ``n`` sequences of ``batch``."""
        return (_site_rows(self.model, self.sae, jnp.asarray(batch, jnp.int32), n, 1 if self.drop_first else 0),)

    def capture_site(self, batch_size: int) -> jax.Array:
        """Every sequence's site activations ``[n_seq, rows_per_sequence, ...]`` (``capture_all``: padded
        batches, one compilation), checked finite."""
        x = capture_all(self, batch_size)[0]
        if not bool(jnp.all(jnp.isfinite(x))):
            raise JfigError(f"the model's activations at {self.site} contain NaN or inf values; check the model's "
                            f"parameters")
        return x.reshape(self.tokens.shape[0], self.rows_per_sequence, *x.shape[1:])

    def sequences(self, index: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """``(f, y)`` rows of the sequences ``index`` (one device computation, no host transfer)."""
        if self.x is None:
            x = self.run(self.tokens[index], len(index))[0]
        else:
            x = self.x[jnp.asarray(index)]
            x = x.reshape(-1, *x.shape[2:])
        return encode_rows(self.sae, x, self.target)


def nfm_tokens(model: Any, corpus_or_tokens: Any, *, seq_len: int = 64, max_tokens: int | None = None,
               seed: int = 0) -> np.ndarray:
    """int tokens ``[n_seq, seq]`` from a token array (checked) or a corpus ("default", a path, a
    :class:`jfig.data.Corpus`; packed to ``seq_len``, at most ``max_tokens``). JfigError when empty."""
    if corpus_or_tokens is None:
        raise JfigError("train_nfm needs tokens [n_seq, seq] or a corpus; got None")
    tokens = tokens_from(corpus_or_tokens, model, seq_len if not hasattr(corpus_or_tokens, "shape") else None,
                         seed=seed, max_tokens=max_tokens)
    if tokens.size == 0:
        raise JfigError(f"the corpus gave no tokens (shape {tokens.shape}); expected at least one sequence")
    return tokens


def _check_request(k: Any, hidden: Any, target: str, checkpoint_dir: Any, resume: bool, kw: dict) -> None:
    unknown = set(kw) - set(NFMConfig.__dataclass_fields__)
    if unknown:
        raise JfigError(f"train_nfm got unknown options {sorted(unknown)}; expected NFMConfig fields")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise JfigError(f"k (the NFM's embedding size K) must be a positive int, got {k!r}")
    if target not in TARGETS:
        raise JfigError(f"target {target!r} is unknown; expected 'error' (the SAE's reconstruction error x - x_hat) "
                        f"or 'next' (the site's activation x, the next component's input)")
    if checkpoint_dir is not None and not resume:
        folder = Path(checkpoint_dir)
        if folder.exists() and checkpoint_dirs(folder):
            raise JfigError(f"{folder} already holds checkpoints and resume=False; pass resume=True to continue that "
                            f"run, or a fresh checkpoint_dir")


def sae_fingerprint(sae: SAE) -> str:
    """A short hash of the SAE's site and arrays (an NFM checkpoint resumes only on the same SAE)."""
    arrays = (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)
    return fingerprint(sae.site.encode() + b"".join(np.asarray(a, np.float32).tobytes() for a in arrays))


def train_nfm(model: Any, sae: SAE, corpus_or_tokens: Any, *, k: int, hidden: int | None = None,
              target: str = "error", steps: int | None = None, batch_size: int = 1024, lr: float = 1e-3,
              seed: int = 0, checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
              stream: bool = False, progress: bool = True, seq_len: int = 64, max_tokens: int | None = None,
              capture_batch_size: int = 32, **kw: Any) -> NFM:
    """Train an NFM on ``sae``'s features at its site of ``model``; returns the :class:`NFM`.

    The NFM reads the SAE's feature activations ``f = sae.encode(x)`` of the activation ``x`` at
    ``sae.site`` and predicts ``target``:

    - "error" (default): the SAE's reconstruction error ``y = x - sae.reconstruct(x)`` at that site, so
      ``x_hat + nfm(f)`` is the corrected reconstruction (the seed's setting);
    - "next": the activation ``y = x`` itself, which is exactly the input of the next component (block
      L+1 reads ``blocks.L.hook_resid_post``); the NFM is then a nonlinear decoder standing in for the
      SAE's, and ``nfm(f)`` replaces ``x_hat``.

    ``corpus_or_tokens``: int tokens ``[n_seq, seq]`` or a corpus (packed to ``seq_len``, at most
    ``max_tokens``). Position 0 is left out. ``stream=False`` captures the site once (one ``[tokens, d]``
    array on the device) and encodes each batch; ``stream=True`` runs the model on each step's sequences
    (memory of one batch). Either way a step's batch is ``batch_size // (seq - 1)`` whole sequences of a
    permutation seeded by ``(seed, pass)``, so batch ``s`` depends only on ``s`` and a run resumed from
    ``checkpoint_dir`` ends with the parameters of an uninterrupted run. ``steps`` defaults to one pass.
    ``k``: the embedding size; ``hidden``: see :class:`NFMConfig`; other keywords set NFMConfig fields.

    Checked before any model run: the SAE's site is a site of the model with the SAE's width (an SAE
    from another site gives ShapeError / SiteError), ``k`` a positive int, the target known, unknown
    options, ``resume=False`` with checkpoints present, an empty corpus; NaN/inf activations raise.
    """
    _check_request(k, hidden, target, checkpoint_dir, resume, kw)
    site = check_sae_site(model, sae)
    NFMConfig(k=int(k), hidden=hidden, steps=1 if steps is None else steps, batch_size=batch_size, lr=lr, seed=seed,
              **kw)
    tokens = nfm_tokens(model, corpus_or_tokens, seq_len=seq_len, max_tokens=max_tokens, seed=seed)
    capture = FeatureCapture(model, sae, tokens, target, stream=stream, capture_batch_size=capture_batch_size)
    batch_at, per_pass = streamed(capture, batch_size, seed)
    cfg = NFMConfig(k=int(k), hidden=hidden, steps=per_pass if steps is None else steps, batch_size=batch_size,
                    lr=lr, seed=seed, **kw)
    nfm, _ = fit_nfm(batch_at, sae.d_sae, sae.d_in, site, cfg, target=target, checkpoint_dir=checkpoint_dir,
                     progress=progress, meta={"sae": sae_fingerprint(sae)})
    return nfm


# ---------------------------------------------------------------------------------- the secondary SAE


def matched_d_sae(n_params: int, d: int, architecture: str = "topk") -> int:
    """The width of an SAE on ``d``-wide inputs with about ``n_params`` parameters: an SAE has ``W_enc``
    and ``W_dec`` (``2 d`` per latent), ``b_enc`` (1 per latent; jumprelu a threshold too) and ``b_dec``
    (``d``), so ``d_sae = round((n_params - d) / (2 d + 1))`` (``2 d + 2`` for jumprelu), at least 1."""
    per_latent = 2 * d + (2 if architecture == "jumprelu" else 1)
    return max(1, int(round((int(n_params) - d) / per_latent)))


def sae_params(sae: SAE) -> int:
    """The number of parameters of an SAE (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, threshold)."""
    return sum(int(np.prod(a.shape)) for a in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold)
               if a is not None)


def train_secondary_sae(model: Any, sae: SAE, corpus_or_tokens: Any, *, n_params: int | None = None,
                        nfm: NFM | None = None, d_sae: int | None = None, k: int | None = None,
                        steps: int | None = None, batch_size: int = 1024, lr: float = 1e-3, seed: int = 0,
                        stream: bool = False, checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
                        seq_len: int = 64, max_tokens: int | None = None, capture_batch_size: int = 32,
                        **kw: Any) -> SAE:
    """The seed's baseline: a TopK SAE trained on ``sae``'s reconstruction error at its site (the same
    stream :func:`train_nfm` trains on, batch ``s`` the same sequences for the same ``seed`` and
    ``batch_size``), with as many parameters as ``nfm`` (or ``n_params``; or ``d_sae`` given):
    ``d_sae = matched_d_sae(...)``. ``k`` defaults to the first SAE's ``k`` (32 if it is not TopK).
    Other keywords set :class:`~jfig.saes.train.TrainConfig` fields. Its ``reconstruct(x - x_hat)`` is
    the correction added to ``x_hat``; its site is ``sae.site`` and its metadata says it reads the error."""
    site = check_sae_site(model, sae, "the secondary SAE")
    given = [v is not None for v in (n_params, nfm, d_sae)]
    if sum(given) != 1:
        raise JfigError("train_secondary_sae needs exactly one of n_params=, nfm= (match its parameter count) or "
                        "d_sae=")
    if nfm is not None:
        n_params = nfm.n_params
    if d_sae is None:
        d_sae = matched_d_sae(n_params, sae.d_in)
    k = k if k is not None else (sae.k if sae.architecture == "topk" else 32)
    k = min(int(k), int(d_sae))
    TrainConfig(d_sae=int(d_sae), architecture="topk", k=k, steps=1 if steps is None else steps,
                batch_size=batch_size, lr=lr, seed=seed, **kw)
    tokens = nfm_tokens(model, corpus_or_tokens, seq_len=seq_len, max_tokens=max_tokens, seed=seed)
    capture = FeatureCapture(model, sae, tokens, "error", stream=stream, capture_batch_size=capture_batch_size)
    pairs_at, per_pass = streamed(capture, batch_size, seed)
    cfg = TrainConfig(d_sae=int(d_sae), architecture="topk", k=k, steps=per_pass if steps is None else steps,
                      batch_size=batch_size, lr=lr, seed=seed, **kw)
    secondary, _ = fit(lambda step: pairs_at(step)[1], sae.d_in, site, cfg, checkpoint_dir=checkpoint_dir,
                       progress=progress)
    meta = {**secondary.meta, "reads": "error", "primary_sae": sae_fingerprint(sae)}
    return dataclasses.replace(secondary, metadata=meta)
