"""Cross-layer transcoder training: :func:`fit_clt` on ``[n, L, d]`` pairs, :func:`capture_clt_pairs`,
:func:`stream_clt_pairs` and :func:`train_clt` from a model.

A cross-layer transcoder (CLT, as circuit-tracer defines it) has a dictionary at each read layer
``l``, ``f_l = act(x_l W_enc_l + b_enc_l)``, and reconstructs every write layer's output from the
features of that layer and all earlier ones: ``y_hat_m = sum_{l <= m} f_l W_dec_{l->m} + b_dec_m``.
It is trained as a transcoder is (the same loss terms, optimiser, schedule, dead-latent tracking,
checkpoints and exact resume: :mod:`.loop`, :mod:`.step`, :func:`.losses.clt_loss`), on batches of
pairs ``x [n, L, d_in]`` (each read layer's input) and ``y [n, L, d_out]`` (each write layer's
target) captured in one model run per batch of sequences. The result is a list of
:class:`~jfig.saes.Transcoder`, one per read layer, as :func:`jfig.saes.load_transcoders` returns
for a circuit-tracer CLT; :func:`jfig.saes.save_clt` writes that format.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jfig.errors import JfigError, ShapeError
from jfig.saes.train.config import CLTConfig, TrainConfig, config_as
from jfig.saes.train.loop import BatchSource, Part, run_loop, run_meta, start_state
from jfig.saes.train.step import clt_from_state, clt_train_step, empty_clt_state, init_clt_state
from jfig.saes.train.transcoder import (capture_all, capture_tokens, check_train_request, check_transcoder_sites,
                                        input_norm_of,
                                        prepare_inputs, reads_mlp_input, streamed)
from jfig.saes.transcoder import Transcoder, input_site, output_site

CLT_READ = "ln2.hook_normalized"
CLT_WRITE = "hook_mlp_out"


def clt_sites(layers: Any, read_hook: str = CLT_READ, write_hook: str = CLT_WRITE, model: Any = None,
              ) -> tuple[list[int], list[str], list[str]]:
    """``(layers, read_sites, write_sites)`` of a CLT over ``layers`` (non-empty, strictly
    increasing non-negative ints; below the model's layer count when ``model`` is given): layer l
    reads ``blocks.l.{read_hook}`` and writes ``blocks.l.{write_hook}``. Raises JfigError or
    SiteError (through :func:`check_transcoder_sites`) before any work."""
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise JfigError(f"layers must be a list of layer indices, got {layers!r}") from None
    if not layers:
        raise JfigError("layers is empty; a cross-layer transcoder needs at least one layer")
    for layer in layers:
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or layer < 0:
            raise JfigError(f"layers must be non-negative ints, got {layer!r} in {layers!r}")
    layers = [int(layer) for layer in layers]
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise JfigError(f"layers must be strictly increasing (each layer once), got {layers}")
    n_model = getattr(getattr(model, "config", None), "n_layers", None)
    if n_model is not None and layers[-1] >= n_model:
        raise JfigError(f"layer {layers[-1]} is out of range: the model has {n_model} layers (0..{n_model - 1})")
    for hook, role in ((read_hook, "read_hook"), (write_hook, "write_hook")):
        if not isinstance(hook, str) or not hook or hook.startswith("blocks."):
            raise JfigError(f"{role} must be a hook name inside a block such as {CLT_READ!r} or {CLT_WRITE!r}, "
                            f"got {hook!r}")
    reads = [f"blocks.{layer}.{read_hook}" for layer in layers]
    writes = [f"blocks.{layer}.{write_hook}" for layer in layers]
    for read, write in zip(reads, writes):
        check_transcoder_sites(read, write, model)
    return layers, reads, writes


class _CLTCapture:
    """Pairs ``(x [n_tokens, L, d_in], y [n_tokens, L, d_out])`` of sequences of int tokens: one run per
    batch of sequences capturing every read and write site, stopping at the last write site; each
    read layer's input through :meth:`Transcoder.prepare_input` with the model's norm attached."""

    def __init__(self, model: Any, tokens: Any, reads: list[str], writes: list[str], drop_first: bool):
        self.sites = [input_site(r) for r in reads]
        self.out_sites = [output_site(w) for w in writes]
        self.tokens = capture_tokens(model, tokens, drop_first)
        self.model, self.drop_first = model, drop_first
        self.d_in, self.d_out = clt_widths(model, reads, writes)
        self.norms = [input_norm_of(model, r, w, self.d_in) if reads_mlp_input(r) else None
                      for r, w in zip(reads, writes)]

    @property
    def rows_per_sequence(self) -> int:
        return self.tokens.shape[1] - (1 if self.drop_first else 0)

    def run(self, batch: np.ndarray, n: int) -> tuple[jax.Array, jax.Array]:
        """Pairs of the first ``n`` sequences of ``batch`` (the rest pads it to one shape)."""
        cache = self.model.run(jnp.asarray(batch, jnp.int32), capture=tuple(dict.fromkeys(self.sites + self.out_sites)),
                               stop_at=self.out_sites[-1], logits=False).cache
        start = 1 if self.drop_first else 0
        xs = []
        for site, norm in zip(self.sites, self.norms):
            x = cache[site][:n, start:].reshape(-1, self.d_in)
            xs.append(x if norm is None else prepare_inputs(norm, x))
        ys = [cache[site][:n, start:].reshape(-1, self.d_out) for site in self.out_sites]
        return jnp.stack(xs, axis=1), jnp.stack(ys, axis=1)

    def sequences(self, index: np.ndarray) -> tuple[jax.Array, jax.Array]:
        return self.run(self.tokens[index], len(index))


def model_layers(model: Any) -> int:
    """The model's layer count (for ``layers=None``); JfigError when the model does not say."""
    n = getattr(getattr(model, "config", None), "n_layers", None)
    if n is None:
        raise JfigError("the model does not report its layer count; pass layers= explicitly")
    return int(n)


def clt_widths(model: Any, reads: list[str], writes: list[str]) -> tuple[int, int]:
    """``(d_in, d_out)`` the model reports for the CLT's sites (one width for all read sites, one for all
    write sites); JfigError when it reports none."""
    d_in = {model.site_width(input_site(r)) for r in reads}
    d_out = {model.site_width(output_site(w)) for w in writes}
    if None in d_in or None in d_out:
        raise JfigError("the model does not report the widths of the CLT's sites; train on captured pairs instead")
    if len(d_in) > 1 or len(d_out) > 1:
        raise ShapeError(f"a CLT's read sites must share one width and its write sites another; got {sorted(d_in)} "
                         f"and {sorted(d_out)}")
    return d_in.pop(), d_out.pop()


def capture_clt_pairs(model: Any, tokens: Any, layers: Any = None, *, read_hook: str = CLT_READ,
                      write_hook: str = CLT_WRITE, batch_size: int = 32, drop_first: bool = True
                      ) -> tuple[jax.Array, jax.Array]:
    """CLT training pairs for int ``tokens [n_seq, seq]``: ``(x [n_tokens, L, d_in], y [n_tokens, L,
    d_out])`` over ``layers`` (None: every layer), as :func:`jfig.saes.train.capture_pairs` does for
    one layer, every layer captured in the same run of ``batch_size`` sequences."""
    layers = range(model_layers(model)) if layers is None else layers
    _, reads, writes = clt_sites(layers, read_hook, write_hook, model)
    return capture_all(_CLTCapture(model, tokens, reads, writes, drop_first), batch_size)


def stream_clt_pairs(model: Any, tokens: Any, layers: Any = None, *, batch_size: int, seed: int = 0,
                     read_hook: str = CLT_READ, write_hook: str = CLT_WRITE, drop_first: bool = True
                     ) -> tuple[Callable[[int], tuple[jax.Array, jax.Array]], int]:
    """``(batch_at, steps_per_pass)`` as :func:`jfig.saes.train.stream_pairs`, for a CLT: each step
    runs the model on that step's sequences (a permutation per pass seeded by ``(seed, pass)``)."""
    layers = range(model_layers(model)) if layers is None else layers
    _, reads, writes = clt_sites(layers, read_hook, write_hook, model)
    return streamed(_CLTCapture(model, tokens, reads, writes, drop_first), batch_size, seed)



def fit_clt(pairs: Any, read_sites: list[str], write_sites: list[str], d_in: int, d_out: int, cfg: TrainConfig, *,
            model: Any = None, checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
            max_steps: int | None = None, callback: Callable[[int, Any, dict[str, jax.Array]], None] | None = None
            ) -> tuple[list[Transcoder], dict[str, np.ndarray]]:
    """Train a cross-layer transcoder reading ``read_sites`` and writing ``write_sites`` (one of each
    per layer, in forward order) on pairs; returns ``(transcoders, history)``, as
    :func:`jfig.saes.train.fit_transcoder` does for one layer (same batching, checkpoints, exact
    resume, ``max_steps``, ``callback`` and history).

    ``pairs``: arrays ``(x [n, L, d_in], y [n, L, d_out])``, a callable ``batch_at(step) -> (x, y)``
    deterministic in ``step``, or an iterable of such pairs; ``x[:, i]`` is read layer i's input (for
    a read hook at the MLP's input, the norm already applied), ``y[:, i]`` write layer i's target.
    ``cfg``: a :class:`CLTConfig` (a plain :class:`TrainConfig` is taken as one)."""
    for name, value in (("d_in", d_in), ("d_out", d_out)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ShapeError(f"{name} must be a positive int, got {value!r}")
    if len(read_sites) != len(write_sites) or not read_sites:
        raise JfigError(f"fit_clt needs one write site per read site; got {len(read_sites)} and {len(write_sites)}")
    d_in, d_out, n_layers = int(d_in), int(d_out), len(read_sites)
    cfg = config_as(cfg, CLTConfig)
    for read, write in zip(read_sites, write_sites):
        check_transcoder_sites(read, write, model)
    site = f"CLT {read_sites[0]} .. {read_sites[-1]} -> {write_sites[0]} .. {write_sites[-1]}"
    label = f"the cross-layer transcoder over {n_layers} layers"
    batches = BatchSource(pairs, cfg, (Part("inputs", "d_in", d_in, "inputs ", n_layers),
                                       Part("outputs", "d_out", d_out, "outputs ", n_layers)), label)
    meta = {**run_meta(cfg, site, d_in=d_in, d_out=d_out, n_layers=n_layers),
            "read_sites": list(read_sites), "write_sites": list(write_sites)}
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state, history = start_state(batches, folder, meta, template=lambda: empty_clt_state(cfg, n_layers, d_in, d_out),
                                 init=lambda first: init_clt_state(cfg, n_layers, d_in, d_out, *first))
    state, history = run_loop(state, history, batches, lambda s, b: clt_train_step(s, *b), meta, folder,
                              desc=f"CLT {n_layers} layers", progress=progress, max_steps=max_steps,
                              callback=callback)
    last = {key: float(history[key][-1]) for key in ("loss", "fvu", "l0", "dead_fraction") if key in history}
    return clt_from_state(state, list(read_sites), list(write_sites), model=model,
                          metadata={"train_metrics": last}), history


def train_clt(model: Any, tokens_or_data: Any, *, layers: Any = None, d_tc: int, architecture: str | None = None,
              k: int | None = None, read_hook: str = CLT_READ, write_hook: str = CLT_WRITE, steps: int | None = None,
              batch_size: int = 4096, lr: float = 3e-4, seed: int = 0,
              checkpoint_dir: str | os.PathLike | None = None, resume: bool = True, stream: bool = False,
              progress: bool = True, capture_batch_size: int = 32, **kw: Any) -> list[Transcoder]:
    """Train a cross-layer transcoder; returns a list of :class:`~jfig.saes.Transcoder`, one per read
    layer, as :func:`jfig.saes.load_transcoders` returns a circuit-tracer CLT.

    ``layers``: the layers it reads and writes (strictly increasing; None: every layer of the model,
    or of the data); layer l reads ``blocks.l.{read_hook}`` (default ``ln2.hook_normalized``, the
    MLP's normalised input; ``mlp.hook_in`` with the norm's weight) and writes
    ``blocks.l.{write_hook}`` (default ``hook_mlp_out``). Read layer l's features write layer l and
    every later layer in ``layers``.

    ``tokens_or_data``: int tokens ``[n_seq, seq]``, whose pairs are captured from ``model``, every
    layer in one run (position 0 dropped; :func:`capture_clt_pairs`; ``stream=True`` runs each step's
    sequences instead so memory holds one batch: :func:`stream_clt_pairs`); or float pairs ``(x [n, L,
    d_in], y [n, L, d_out])``, or a callable ``batch_at(step) -> (x, y)`` (give ``steps=``; ``model``
    may then be None).

    ``d_tc`` latents per layer; ``architecture`` "jumprelu" (the default without ``k``), "relu" or
    "topk" (the default with ``k``: k per layer, AuxK for dead latents). ``steps`` defaults to one
    pass. Other keywords set :class:`CLTConfig` fields. ``checkpoint_dir`` / ``resume`` as for
    :func:`jfig.train_transcoder` (exact resume). Every argument is checked before any model run.
    Save the result with :func:`jfig.saes.save_clt`.
    """
    check_train_request("train_clt", CLTConfig, kw, d_tc, "latents per layer", checkpoint_dir, resume)
    architecture = architecture or ("topk" if k is not None else "jumprelu")
    CLTConfig(d_sae=int(d_tc), architecture=architecture, k=k, steps=1 if steps is None else steps,
              batch_size=batch_size, lr=lr, seed=seed, **kw)
    data = tokens_or_data
    is_pairs = isinstance(data, (tuple, list)) and len(data) == 2 and all(hasattr(a, "shape") for a in data)
    is_fn = callable(data) and not hasattr(data, "shape")
    if stream and (is_pairs or is_fn):
        raise JfigError("stream=True applies to tokens (the model runs each step's sequences); pairs and "
                        "batch_at are used as given")
    if is_pairs or is_fn:
        if is_fn and steps is None:
            raise JfigError("train_clt on a callable batch_at(step) needs steps=")
        x, y = _pair_of(data if is_pairs else data(0), "tokens_or_data" if is_pairs else "batch_at(0)")
        n_layers, d_in, d_out = int(x.shape[1]), int(x.shape[2]), int(y.shape[2])
        if layers is None:
            layers = range(n_layers) if model is None else range(model_layers(model))
        layers, reads, writes = clt_sites(layers, read_hook, write_hook, model)
        if len(layers) != n_layers or y.shape[1] != n_layers:
            raise ShapeError(f"pairs have {x.shape[1]} input and {y.shape[1]} output layers; layers {layers} "
                             f"needs {len(layers)} of each")
        if model is not None:
            want = clt_widths(model, reads, writes)
            if want != (d_in, d_out):
                raise ShapeError(f"pairs have widths d_in={d_in}, d_out={d_out}; the model's sites have {want}")
        if is_pairs:
            if x.shape[0] != y.shape[0]:
                raise ShapeError(f"pairs must have as many rows: x has {x.shape[0]}, y has {y.shape[0]}")
            for array, name in ((x, "x"), (y, "y")):
                if not bool(jnp.all(jnp.isfinite(array))):
                    raise JfigError(f"{name} for the cross-layer transcoder contains NaN or inf values; expected "
                                    f"finite activations")
            pairs, n_rows = (x, y), int(x.shape[0])
        else:
            pairs, n_rows = data, None
    else:
        tokens = np.asarray(data)
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ShapeError(f"train_clt takes int tokens [n_seq, seq] or float pairs (x [n, L, d_in], y [n, L, "
                             f"d_out]); got an array of dtype {tokens.dtype}")
        if model is None:
            raise JfigError("train_clt needs a model to capture pairs from tokens")
        layers = range(model_layers(model)) if layers is None else layers
        layers, reads, writes = clt_sites(layers, read_hook, write_hook, model)
        d_in, d_out = clt_widths(model, reads, writes)
        if stream:
            pairs, per_pass = stream_clt_pairs(model, tokens, layers, batch_size=batch_size, seed=seed,
                                               read_hook=read_hook, write_hook=write_hook)
            steps = per_pass if steps is None else steps
            n_rows = None
        else:
            pairs = capture_clt_pairs(model, tokens, layers, read_hook=read_hook, write_hook=write_hook,
                                      batch_size=capture_batch_size)
            for array, name in zip(pairs, ("inputs", "outputs")):
                if not bool(jnp.all(jnp.isfinite(array))):
                    raise JfigError(f"the model's {name} for the cross-layer transcoder contain NaN or inf values; "
                                    f"check the model's parameters")
            n_rows = int(pairs[0].shape[0])
    if steps is None:
        steps = max(1, n_rows // batch_size)
    cfg = CLTConfig(d_sae=int(d_tc), architecture=architecture, k=k, steps=steps, batch_size=batch_size, lr=lr,
                    seed=seed, **kw)
    tcs, _ = fit_clt(pairs, reads, writes, d_in, d_out, cfg, model=model, checkpoint_dir=checkpoint_dir,
                     progress=progress)
    return tcs


def _pair_of(item: Any, what: str) -> tuple[jax.Array, jax.Array]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ShapeError(f"{what} must be a pair (x [n, L, d_in], y [n, L, d_out]) of float arrays; got "
                         f"{type(item).__name__}")
    x, y = (jnp.asarray(a) for a in item)
    for array, name in ((x, "x"), (y, "y")):
        if not jnp.issubdtype(array.dtype, jnp.floating) or array.ndim != 3 or array.size == 0:
            raise ShapeError(f"{what}: {name} must be a non-empty float array [n, L, d]; got dtype {array.dtype}, "
                             f"shape {tuple(array.shape)}")
    return x, y
