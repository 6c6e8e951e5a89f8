"""The training loop: batches, :func:`fit` with progress and checkpoints, and :func:`train_sae`.

:func:`fit` drives :func:`~jfig.saes.train.step.train_step` with a progress bar and atomic
checkpoints; a run resumed from its checkpoint folder ends with exactly the parameters of an
uninterrupted run. :func:`train_sae` captures activations from a model and returns an inference
:class:`SAE` with its metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jfig.errors import JfigError, ShapeError
from jfig.saes.metrics import activation_metrics, sae_metrics
from jfig.saes.sae import SAE
from jfig.saes.train.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from jfig.saes.train.config import TrainConfig
from jfig.saes.train.step import TrainState, empty_state, init_train_state, sae_from_state, train_step

logger = logging.getLogger(__name__)

ActivationSource = jax.Array | np.ndarray | Callable[[int], Any] | Iterable[Any]


class _Batches:
    """Batch ``step`` of a run, from an array, a callable ``batch_at(step)`` or an iterable."""

    def __init__(self, source: ActivationSource, cfg: TrainConfig, d_in: int, site: str):
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

    def _check(self, batch: Any, what: str) -> None:
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

    def _draw(self) -> Any:
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


def _nonfinite(step: int, site: str) -> JfigError:
    return JfigError(f"activation batch {step} for the SAE at {site} contains NaN or inf values; "
                     f"expected finite activations")


def _start_state(batches: _Batches, cfg: TrainConfig, d_in: int, site: str, meta: dict[str, Any],
                 folder: Path | None) -> tuple[TrainState, dict[str, list]]:
    """The latest checkpoint in ``folder`` (batches positioned after it), or a fresh state."""
    existing = checkpoint_dirs(folder) if folder is not None and folder.exists() else []
    if existing:
        state, history = load_checkpoint(existing[-1], empty_state(cfg, d_in), meta)
        logger.info("resuming the SAE at %s from %s (step %d)", site, existing[-1], int(state.step))
        batches.skip_to(int(state.step))
        return state, history
    first = [b.reshape(-1, d_in).astype(jnp.float32) for b in batches.first(cfg.init_batches)]
    for i, b in enumerate(first):
        if not bool(jnp.all(jnp.isfinite(b))):
            raise _nonfinite(i, site)
    return init_train_state(cfg, d_in, jnp.concatenate(first)), {}


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
    batches = _Batches(activation_batches, cfg, int(d_in), site)
    meta = {"config": dataclasses.asdict(cfg), "d_in": int(d_in), "site": site}
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state, history = _start_state(batches, cfg, int(d_in), site, meta, folder)
    start = int(state.step)
    stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    pending: list[tuple[int, dict]] = []
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=f"SAE {site}", dynamic_ncols=True)
    clock = [time.perf_counter(), 0]  # time of the last flush, tokens since then

    def flush() -> None:
        if not pending:
            return
        values = jax.device_get([m for _, m in pending])
        for (step, _), m in zip(pending, values):
            if not bool(m["finite"]):
                raise _nonfinite(step, site)
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
                save_checkpoint(folder, state, history, meta)
            if callback is not None:
                callback(done, state, metrics)
        flush()
        if folder is not None and int(state.step) > start and (
                not cfg.checkpoint_every or int(state.step) % cfg.checkpoint_every != 0):
            save_checkpoint(folder, state, history, meta)
    finally:
        bar.close()
    if history:
        logger.info("SAE at %s: %d steps, loss %.4g, L0 %.1f, explained variance %.3f", site, int(state.step),
                    float(history["loss"][-1]), float(history["l0"][-1]), float(history["explained_variance"][-1]))
    return sae_from_state(state, site), {key: np.asarray(value) for key, value in history.items()}


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
