"""SAE training: :func:`fit` with progress and checkpoints, and :func:`train_sae`.

:func:`fit` drives :func:`~jfig.saes.train.step.train_step` through the shared loop
(:mod:`jfig.saes.train.loop`) with a progress bar and atomic checkpoints; a run resumed from its checkpoint folder ends with exactly the parameters of an
uninterrupted run. :func:`train_sae` captures activations from a model and returns an inference
:class:`SAE` with its metrics.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfig.errors import JfigError, ShapeError
from jfig.saes.metrics import activation_metrics, sae_metrics
from jfig.saes.sae import SAE
from jfig.saes.train.config import TrainConfig
from jfig.saes.train.loop import BatchSource, Part, run_loop, run_meta, start_state
from jfig.saes.train.step import TrainState, empty_state, init_train_state, sae_from_state, train_step

ActivationSource = jax.Array | np.ndarray | Callable[[int], Any] | Iterable[Any]


def fit(activation_batches: ActivationSource, d_in: int, site: str, cfg: TrainConfig, *,
        checkpoint_dir: str | os.PathLike | None = None, progress: bool = True, max_steps: int | None = None,
        callback: Callable[[int, TrainState, dict[str, jax.Array]], None] | None = None
        ) -> tuple[SAE, dict[str, np.ndarray]]:
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

    Raises ShapeError when a batch is not ``[..., d_in]``, JfigError on NaN/inf activations and
    FormatError when the latest checkpoint is truncated or corrupt.
    """
    if not isinstance(d_in, (int, np.integer)) or isinstance(d_in, bool) or d_in < 1:
        raise ShapeError(f"d_in must be a positive int, got {d_in!r}")
    d_in = int(d_in)
    batches = BatchSource(activation_batches, cfg, (Part("activations", "d_in", d_in),), f"the SAE at {site}")
    meta = run_meta(cfg, site, d_in=d_in)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state, history = start_state(batches, folder, meta, template=lambda: empty_state(cfg, d_in),
                                 init=lambda first: init_train_state(cfg, d_in, first[0]))
    state, history = run_loop(state, history, batches, train_step, meta, folder, desc=f"SAE {site}",
                              progress=progress, max_steps=max_steps, callback=callback)
    return sae_from_state(state, site), history


def capture_activations(model: Any, tokens: Any, site: str, *, batch_size: int = 32,
                        drop_first: bool = True) -> jax.Array:
    """Activations at ``site`` for int ``tokens [n_seq, seq]``, as rows ``[n_tokens, d_in]``.

    Runs ``batch_size`` sequences at a time, stopping at ``site``; head axes are flattened.
    ``drop_first`` leaves out position 0 (BOS), whose activations are outliers."""
    model.check_site(site)
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        raise ShapeError(f"tokens must be a non-empty int array [n_seq, seq]; got shape {tokens.shape}")
    tokens = np.asarray(model.check_tokens(tokens))
    if drop_first and tokens.shape[1] < 2:
        raise ShapeError(f"tokens of length {tokens.shape[1]} leave nothing once position 0 is dropped")
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


def train_sae(model: Any, tokens_or_activations: Any, site: str, *, d_sae: int, k: int | None = None,
              architecture: str | None = None, steps: int | None = None, batch_size: int = 4096, lr: float = 3e-4,
              seed: int = 0, checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
              **kw: Any) -> tuple[SAE, dict[str, float]]:
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
