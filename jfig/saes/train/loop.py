"""The training loop that SAEs and transcoders share: batches by step, resume or start, progress and
checkpoints.

A batch has one part (an SAE's activations) or two (a transcoder's inputs and target outputs).
:class:`BatchSource` serves batch ``s`` of a run from arrays, a callable ``batch_at(step)`` or an
iterable, the same batch for the same ``s`` (an iterable's by drawing and dropping on resume), so a
run resumed from its checkpoint folder ends with exactly the parameters of an uninterrupted run.
:func:`start_state` resumes from the latest checkpoint or initialises from the first batches;
:func:`run_loop` drives a step function with a progress bar and atomic checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jfig.errors import JfigError, ShapeError
from jfig.saes.train.checkpoint import checkpoint_dirs, load_checkpoint, save_checkpoint
from jfig.saes.train.config import TrainConfig
from jfig.saes.train.step import TrainState

logger = logging.getLogger(__name__)


class Part(NamedTuple):
    """One array of a batch: ``name`` in messages ("activations", "inputs", "outputs"), the width's
    name and value (``d_in`` 512), ``takes``, how the trained dictionary's expectation is worded
    ("" for an SAE's only part, "inputs " for a transcoder's first), and ``layers``: None for rows
    ``[width]``, L for rows ``[L, width]`` (a cross-layer transcoder's, one per layer)."""

    name: str
    width_name: str
    width: int
    takes: str = ""
    layers: int | None = None

    @property
    def row_shape(self) -> tuple[int, ...]:
        return (self.width,) if self.layers is None else (self.layers, self.width)

    @property
    def row_size(self) -> int:
        return self.width * (self.layers or 1)

    @property
    def expected(self) -> str:
        return (f"[..., {self.width_name}={self.width}]" if self.layers is None else
                f"[..., L={self.layers}, {self.width_name}={self.width}]")


def nonfinite(step: int, label: str) -> JfigError:
    """The error for a batch with NaN or inf values (``label``: "the SAE at SITE")."""
    return JfigError(f"activation batch {step} for {label} contains NaN or inf values; expected finite activations")


class BatchSource:
    """Batch ``step`` of a run, from arrays, a callable ``batch_at(step)`` or an iterable.

    With one part, a batch is an array; with two, a tuple ``(x, y)``, and the source is a pair of
    arrays (rows paired; shuffled together), a callable returning pairs, or an iterable of pairs.
    Arrays are checked for NaN/inf up front; each served batch for its shape and dtype."""

    def __init__(self, source: Any, cfg: TrainConfig, parts: tuple[Part, ...], label: str):
        self.cfg, self.parts, self.label = cfg, parts, label
        self.arrays = self.fn = self.iterator = None
        self.buffer: list = []
        self.next_step = 0
        paired = len(parts) > 1
        if callable(source) and not hasattr(source, "shape"):
            self.fn = source
        elif self._is_arrays(source):
            items = tuple(source) if paired else (source,)
            arrays = []
            for part, item in zip(parts, items):
                array = jnp.asarray(item)
                self._check_part(array, part, part.name)
                array = array.reshape(-1, *part.row_shape)
                if not bool(jnp.all(jnp.isfinite(array))):
                    raise JfigError(f"{part.name} for {label} contain NaN or inf values; expected finite values")
                arrays.append(array)
            self._check_rows(arrays, "the arrays")
            self.arrays = tuple(arrays)
            n = self.arrays[0].shape[0]
            self.size = min(cfg.batch_size, n)
            self.per_epoch = n // self.size
            self.epoch, self.perm = -1, None
        elif isinstance(source, Iterable):
            self.iterator = iter(source)
        else:
            what = "a pair of arrays (x [n, d_in], y [n, d_out]), a callable batch_at(step) -> (x, y) or an " \
                   "iterable of such pairs" if paired else \
                   "an array [n, d_in], a callable batch_at(step) or an iterable of arrays"
            raise JfigError(f"activation batches must be {what}; got {type(source).__name__}")

    def _is_arrays(self, source: Any) -> bool:
        if len(self.parts) == 1:
            return hasattr(source, "shape") and hasattr(source, "dtype")
        return (isinstance(source, (tuple, list)) and len(source) == len(self.parts)
                and all(hasattr(a, "shape") and hasattr(a, "dtype") for a in source))

    def _check_part(self, batch: Any, part: Part, what: str) -> None:
        rank = len(part.row_shape)
        if not hasattr(batch, "shape") or batch.ndim < rank or tuple(batch.shape[-rank:]) != part.row_shape:
            shape = tuple(getattr(batch, "shape", ())) or type(batch).__name__
            raise ShapeError(f"{what} have shape {shape}; {self.label} takes {part.takes}{part.expected}")
        if not jnp.issubdtype(batch.dtype, jnp.floating):
            raise ShapeError(f"{what} have dtype {batch.dtype}; expected floating-point activations")
        if batch.size == 0:
            raise ShapeError(f"{what} are empty; {self.label} needs tokens to train on")

    def _check_rows(self, arrays: list, what: str) -> None:
        rows = [a.size // part.row_size for a, part in zip(arrays, self.parts)]
        if len(set(rows)) > 1:
            raise ShapeError(f"{what} for {self.label} pair {rows[0]} input rows with {rows[1]} output rows; "
                             f"expected one output row per input row")

    def _check(self, batch: Any, what: str) -> Any:
        """``batch`` (an array, or a pair) checked; returned as arrays."""
        if len(self.parts) == 1:
            batch = jnp.asarray(batch)
            self._check_part(batch, self.parts[0], what)
            return batch
        if not isinstance(batch, (tuple, list)) or len(batch) != len(self.parts):
            raise ShapeError(f"{what} is a {type(batch).__name__}; {self.label} trains on pairs (x, y)")
        arrays = [jnp.asarray(b) for b in batch]
        for part, array in zip(self.parts, arrays):
            self._check_part(array, part, f"{part.name} of {what}")
        self._check_rows(arrays, what)
        return tuple(arrays)

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

    def __call__(self, step: int) -> Any:
        if self.arrays is not None:
            epoch, i = divmod(step, self.per_epoch)
            if epoch != self.epoch:
                rng = np.random.default_rng([self.cfg.seed, epoch])
                self.epoch, self.perm = epoch, jnp.asarray(rng.permutation(self.arrays[0].shape[0]))
            rows = self.perm[i * self.size:(i + 1) * self.size]
            batch = tuple(a[rows] for a in self.arrays)
            batch = batch[0] if len(batch) == 1 else batch
        elif self.fn is not None:
            batch = self.fn(step)
        else:
            if step != self.next_step:
                raise JfigError(f"an iterable of batches is read in order; asked for step {step} at {self.next_step}")
            batch = self.buffer.pop(0) if self.buffer else self._draw()
            self.next_step += 1
        return self._check(batch, f"activation batch {step}")

    def first(self, n: int) -> list[Any]:
        """The first ``n`` batches (an iterable's are kept and served again at steps 0..n-1)."""
        n = min(n, self.cfg.steps)
        if self.iterator is None:
            return [self(s) for s in range(n)]
        while len(self.buffer) < n:
            batch = self._check(self._draw(), f"activation batch {len(self.buffer)}")
            self.buffer.append(batch)
        return list(self.buffer)


def start_state(batches: BatchSource, folder: Path | None, meta: dict[str, Any], *,
                template: Callable[[], TrainState], init: Callable[[list], TrainState]
                ) -> tuple[TrainState, dict[str, list]]:
    """The latest checkpoint in ``folder`` (batches positioned after it), or ``init(first)`` on the
    first ``cfg.init_batches`` batches, each part as float32 rows, after checking they are finite.
    ``template()`` is a state of the right structure for reading a checkpoint."""
    existing = checkpoint_dirs(folder) if folder is not None and folder.exists() else []
    if existing:
        state, history = load_checkpoint(existing[-1], template(), meta)
        logger.info("resuming %s from %s (step %d)", batches.label, existing[-1], int(state.step))
        batches.skip_to(int(state.step))
        return state, history
    first = []
    for i, batch in enumerate(batches.first(batches.cfg.init_batches)):
        parts = (batch,) if len(batches.parts) == 1 else batch
        rows = tuple(b.reshape(-1, *part.row_shape).astype(jnp.float32) for b, part in zip(parts, batches.parts))
        if not all(bool(jnp.all(jnp.isfinite(b))) for b in rows):
            raise nonfinite(i, batches.label)
        first.append(rows)
    return init([jnp.concatenate(column) for column in zip(*first)]), {}


def run_loop(state: TrainState, history: dict[str, list], batches: BatchSource,
             step_fn: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]], meta: dict[str, Any],
             folder: Path | None, *, desc: str, progress: bool, max_steps: int | None,
             callback: Callable[[int, TrainState, dict[str, jax.Array]], None] | None
             ) -> tuple[TrainState, dict[str, np.ndarray]]:
    """Run ``step_fn(state, batch)`` from ``state.step`` to ``cfg.steps`` (or ``max_steps`` in total),
    checkpointing into ``folder`` every ``cfg.checkpoint_every`` steps and at the end; metrics are
    fetched from the device every ``cfg.log_every`` steps. Raises JfigError on a non-finite batch."""
    cfg = state.cfg
    start = int(state.step)
    stop = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
    pending: list[tuple[int, dict]] = []
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=desc, dynamic_ncols=True)
    clock = [time.perf_counter(), 0]  # time of the last flush, tokens since then

    def flush() -> None:
        if not pending:
            return
        values = jax.device_get([m for _, m in pending])
        for (step, _), m in zip(pending, values):
            if not bool(m["finite"]):
                raise nonfinite(step, batches.label)
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
            state, metrics = step_fn(state, batches(step))
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
        logger.info("%s: %d steps, loss %.4g, L0 %.1f, explained variance %.3f", batches.label, int(state.step),
                    float(history["loss"][-1]), float(history["l0"][-1]), float(history["explained_variance"][-1]))
    return state, {key: np.asarray(value) for key, value in history.items()}


def run_meta(cfg: TrainConfig, site: str, **widths: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the config, the widths and the site."""
    return {"config": dataclasses.asdict(cfg), **{k: int(v) for k, v in widths.items()}, "site": site}
