"""Crosscoder training: :func:`fit_crosscoder` on stacked activations ``[n, L, d]`` and
:func:`train_crosscoder` from a model.

An acausal crosscoder (:class:`~jfig.saes.crosscoder.Crosscoder`) is an SAE on the residual stream
of several layers stacked, ``concat_l x_l``; it trains through the SAE trainer's loss, update, loop,
checkpoints and exact resume (:mod:`.loop`, :mod:`.step`), with one input scale per layer and an
optional interaction penalty (:func:`jfig.saes.train.losses.interaction_penalty`, weighted by
``CrosscoderConfig.interaction_penalty``). Every layer is captured in one model run per batch of
sequences, as the cross-layer transcoder trainer does.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfig.errors import JfigError, ShapeError
from jfig.saes.crosscoder import Crosscoder, check_crosscoder_sites
from jfig.saes.train.config import CrosscoderConfig, TrainConfig, config_as
from jfig.saes.train.loop import BatchSource, Part, run_loop, run_meta, start_state
from jfig.saes.train.step import (crosscoder_from_state, crosscoder_train_step, empty_crosscoder_state,
                                  init_crosscoder_state)
from jfig.saes.train.transcoder import capture_all, capture_tokens, check_train_request, streamed

CROSSCODER_HOOK = "hook_resid_post"


def crosscoder_sites(layers: Any, hook: str = CROSSCODER_HOOK, model: Any = None) -> list[str]:
    """``blocks.l.{hook}`` for each of ``layers`` (non-empty, strictly increasing ints, inside the model
    when given), checked as residual sites in forward order. Raises before any work."""
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = [layers]
    try:
        layers = [int(l) if isinstance(l, (int, np.integer)) and not isinstance(l, bool) and l >= 0 else None
                  for l in layers]
    except TypeError:
        raise JfigError(f"layers must be a list of layer indices, got {layers!r}") from None
    if not layers or None in layers:
        raise JfigError(f"layers must be a non-empty list of non-negative ints, got {layers!r}")
    n_model = getattr(getattr(model, "config", None), "n_layers", None)
    if n_model is not None and max(layers) >= n_model:
        raise JfigError(f"layer {max(layers)} is out of range: the model has {n_model} layers (0..{n_model - 1})")
    sites = [f"blocks.{l}.{hook}" for l in layers]
    check_crosscoder_sites(tuple(sites), len(sites))
    if model is not None:
        for s in sites:
            model.check_site(s)
    return sites


class _StackCapture:
    """Stacked activations ``[n_tokens, L, d]`` of sequences of int tokens: one run per batch of
    sequences capturing every site, stopping at the last; position 0 dropped with ``drop_first``."""

    def __init__(self, model: Any, tokens: Any, sites: list[str], drop_first: bool):
        self.sites, self.model, self.drop_first = list(sites), model, drop_first
        self.tokens = capture_tokens(model, tokens, drop_first)
        widths = {model.site_width(s) for s in sites}
        if None in widths or len(widths) != 1:
            raise JfigError(f"the crosscoder's sites must report one width; the model gives {sorted(map(str, widths))}")
        self.d_in = widths.pop()

    @property
    def rows_per_sequence(self) -> int:
        return self.tokens.shape[1] - (1 if self.drop_first else 0)

    def run(self, batch: np.ndarray, n: int) -> tuple[jax.Array]:
        cache = self.model.run(jnp.asarray(batch, jnp.int32), capture=tuple(self.sites), stop_at=self.sites[-1],
                               logits=False).cache
        start = 1 if self.drop_first else 0
        return (jnp.stack([cache[s][:n, start:].reshape(-1, self.d_in) for s in self.sites], axis=1),)

    def sequences(self, index: np.ndarray) -> jax.Array:
        return self.run(self.tokens[index], len(index))[0]


def capture_stacked(model: Any, tokens: Any, sites: list[str], *, batch_size: int = 32, drop_first: bool = True
                    ) -> jax.Array:
    """Every token's activations at ``sites``, stacked: ``[n_tokens, L, d]`` (position 0 dropped)."""
    return capture_all(_StackCapture(model, tokens, sites, drop_first), batch_size)[0]


def readers_fingerprint(readers: Any) -> str | None:
    """A short hash of the penalty's read directions (a checkpoint resumes only with the same ones)."""
    if readers is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(np.asarray(readers, np.float32)).tobytes()).hexdigest()[:16]


def check_readers(readers: Any, n_layers: int, d_in: int) -> jax.Array:
    """``readers [L, d, F]`` or ``[L, d, F, c]`` as float32 ``[L, d, F, c]`` with unit columns (each
    neuron's read direction normalised over d); ShapeError or JfigError before any work."""
    r = np.asarray(readers, np.float32)
    if r.ndim == 3:
        r = r[..., None]
    if r.ndim != 4 or r.shape[:2] != (n_layers, d_in):
        raise ShapeError(f"readers have shape {tuple(np.shape(readers))}; expected [L={n_layers}, d={d_in}, F] or "
                         f"[L, d, F, c] (jfig.interactions.mlp_readers)")
    if not np.isfinite(r).all():
        raise JfigError("readers contain NaN or inf values")
    norms = np.linalg.norm(r, axis=1, keepdims=True)
    return jnp.asarray(r / np.maximum(norms, 1e-12))



def fit_crosscoder(data: Any, sites: list[str], d_in: int, cfg: TrainConfig, *, readers: Any = None,
                   checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
                   max_steps: int | None = None, callback: Callable[[int, Any, dict], None] | None = None
                   ) -> tuple[Crosscoder, dict[str, np.ndarray]]:
    """Train a crosscoder over ``sites`` on stacked activations; returns ``(crosscoder, history)``.

    ``data``: an array ``[n, L, d_in]``, a callable ``batch_at(step) -> [batch, L, d_in]``
    deterministic in ``step``, or an iterable of such arrays. ``cfg``: a :class:`CrosscoderConfig`
    (a :class:`TrainConfig` is taken as one). ``readers [L, d_in, F(, c)]``: the neurons' read
    directions for the interaction penalty (needed when ``cfg.interaction_penalty > 0``). Batching,
    checkpoints in ``checkpoint_dir``, exact resume, ``max_steps`` and ``callback`` as :func:`fit`."""
    if not isinstance(d_in, (int, np.integer)) or isinstance(d_in, bool) or d_in < 1:
        raise ShapeError(f"d_in must be a positive int, got {d_in!r}")
    cfg = config_as(cfg, CrosscoderConfig)
    sites = list(sites)
    n_layers = len(sites)
    check_crosscoder_sites(tuple(sites), n_layers)
    if cfg.interaction_penalty > 0 and readers is None:
        raise JfigError("interaction_penalty > 0 needs readers= (each layer's MLP read directions, "
                        "jfig.interactions.mlp_readers(model, sites))")
    r = None if readers is None or cfg.interaction_penalty == 0 else check_readers(readers, n_layers, int(d_in))
    label = f"the crosscoder over {n_layers} layers"
    batches = BatchSource(data, cfg, (Part("activations", "d_in", int(d_in), "", n_layers),), label)
    meta = {**run_meta(cfg, " + ".join(sites), d_in=int(d_in), n_layers=n_layers),
            "sites": sites, "readers": readers_fingerprint(r)}
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state, history = start_state(batches, folder, meta, template=lambda: empty_crosscoder_state(cfg, n_layers, d_in),
                                 init=lambda first: init_crosscoder_state(cfg, n_layers, d_in, first[0]))
    state, history = run_loop(state, history, batches, lambda s, b: crosscoder_train_step(s, b, r), meta, folder,
                              desc=f"crosscoder {n_layers} layers", progress=progress, max_steps=max_steps,
                              callback=callback)
    last = {key: float(history[key][-1]) for key in ("loss", "fvu", "l0", "dead_fraction", "interaction")
            if key in history}
    return crosscoder_from_state(state, sites, metadata={"train_metrics": last}), history


def train_crosscoder(model: Any, tokens_or_data: Any, *, layers: Any = None, sites: Any = None, d_cc: int,
                     architecture: str | None = None, k: int | None = None, hook: str = CROSSCODER_HOOK,
                     readers: Any = None, steps: int | None = None, batch_size: int = 4096, lr: float = 3e-4,
                     seed: int = 0, checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
                     stream: bool = False, progress: bool = True, capture_batch_size: int = 32,
                     **kw: Any) -> Crosscoder:
    """Train an acausal crosscoder over the residual stream at several layers; returns a
    :class:`~jfig.saes.crosscoder.Crosscoder` (save it with :func:`jfig.saes.save_crosscoder`).

    ``layers`` (strictly increasing; each reads ``blocks.l.{hook}``, default ``hook_resid_post``) or
    ``sites`` (residual sites in forward order). ``tokens_or_data``: int tokens ``[n_seq, seq]``,
    whose activations are captured from ``model``, every layer in one run (position 0 dropped;
    ``stream=True`` runs each step's sequences instead); or float activations ``[n, L, d]``, or a
    callable ``batch_at(step)`` (give ``steps=``; ``model`` may then be None).

    ``d_cc`` latents; ``architecture`` "topk" (the default with ``k``), "jumprelu" (without ``k``) or
    "relu". ``interaction_penalty=`` (a :class:`CrosscoderConfig` field, default 0) with ``readers``
    (``jfig.interactions.mlp_readers(model, sites)``) adds the interaction penalty. ``steps`` defaults
    to one pass. Other keywords set :class:`CrosscoderConfig` fields; ``checkpoint_dir`` / ``resume``
    as for :func:`jfig.train_sae` (exact resume). Every argument is checked before any model run.
    """
    check_train_request("train_crosscoder", CrosscoderConfig, kw, d_cc, "latents", checkpoint_dir, resume)
    architecture = architecture or ("topk" if k is not None else "jumprelu")
    CrosscoderConfig(d_sae=int(d_cc), architecture=architecture, k=k, steps=1 if steps is None else steps,
                     batch_size=batch_size, lr=lr, seed=seed, **kw)
    if kw.get("interaction_penalty", 0) > 0 and readers is None:
        raise JfigError("interaction_penalty > 0 needs readers= (each layer's MLP read directions, "
                        "jfig.interactions.mlp_readers(model, sites))")
    if (layers is None) == (sites is None):
        raise JfigError("train_crosscoder needs exactly one of layers= or sites=")
    if sites is None:
        sites = crosscoder_sites(layers, hook, model)
    else:
        sites = [str(s) for s in sites]
        check_crosscoder_sites(tuple(sites), len(sites))
        if model is not None:
            for s in sites:
                model.check_site(s)
    data = tokens_or_data
    is_fn = callable(data) and not hasattr(data, "shape")
    arr = None if is_fn else np.asarray(data) if not hasattr(data, "dtype") else data
    is_float = arr is not None and jnp.issubdtype(arr.dtype, jnp.floating)
    if stream and (is_fn or is_float):
        raise JfigError("stream=True applies to tokens (the model runs each step's sequences); activations and "
                        "batch_at are used as given")
    if is_fn or is_float:
        if is_fn and steps is None:
            raise JfigError("train_crosscoder on a callable batch_at(step) needs steps=")
        sample = jnp.asarray(data(0) if is_fn else arr)
        if sample.ndim != 3 or sample.shape[1] != len(sites) or sample.size == 0:
            raise ShapeError(f"activations must be [n, L={len(sites)}, d] (one row per site of {sites}); got shape "
                             f"{tuple(sample.shape)}")
        d_in = int(sample.shape[2])
        if model is not None and model.site_width(sites[0]) not in (None, d_in):
            raise ShapeError(f"activations have width {d_in}; the model's {sites[0]} is {model.site_width(sites[0])}")
        n_rows = None if is_fn else int(sample.shape[0])
        source = data if is_fn else sample
    else:
        if model is None:
            raise JfigError("train_crosscoder needs a model to capture activations from tokens")
        capture = _StackCapture(model, data, sites, drop_first=True)
        d_in = capture.d_in
        if stream:
            source, per_pass = streamed(capture, batch_size, seed)
            steps = per_pass if steps is None else steps
            n_rows = None
        else:
            source = capture_all(capture, capture_batch_size)[0]
            if not bool(jnp.all(jnp.isfinite(source))):
                raise JfigError("the model's activations at the crosscoder's sites contain NaN or inf values; "
                                "check the model's parameters")
            n_rows = int(source.shape[0])
    if steps is None:
        steps = max(1, n_rows // batch_size)
    cfg = CrosscoderConfig(d_sae=int(d_cc), architecture=architecture, k=k, steps=steps, batch_size=batch_size,
                           lr=lr, seed=seed, **kw)
    cc, _ = fit_crosscoder(source, sites, d_in, cfg, readers=readers, checkpoint_dir=checkpoint_dir,
                           progress=progress)
    return cc
