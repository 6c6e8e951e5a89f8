"""Transcoder training: :func:`fit_transcoder` on pairs, :func:`capture_pairs` and
:func:`train_transcoder` from a model.

A transcoder is trained as an SAE is (the same loss terms, optimiser, schedule, dead-latent
tracking, decoder normalisation, checkpoints and exact resume: :mod:`.loop`, :mod:`.step`), on
pairs ``(x_in, y)``: ``x_in`` the transcoder's input, ``y`` the activations at its write site.

For a read hook at the MLP's input, ``x_in`` is the block's second norm of ``hook_resid_mid``:
its normalisation alone for ``ln2.hook_normalized`` (where TransformerLens places that hook, before
the norm's weight and bias), the whole norm for ``mlp.hook_in``. :func:`capture_pairs` captures
``hook_resid_mid`` and maps it with :meth:`Transcoder.prepare_input` of a transcoder carrying the
model's norm, the very function the trained transcoder's ``encode`` applies, so ``encode`` on
``hook_resid_mid`` activations sees exactly the inputs training saw.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jfig.errors import JfigError, ShapeError, SiteError
from jfig.saes.train.checkpoint import checkpoint_dirs
from jfig.saes.train.config import TrainConfig, TranscoderConfig, config_as
from jfig.saes.train.loop import BatchSource, Part, run_loop, run_meta, start_state
from jfig.saes.train.step import (empty_transcoder_state, init_transcoder_state, transcoder_from_state,
                                  transcoder_train_step)
from jfig.saes.transcoder import NORMED_INPUTS, Transcoder, input_site, output_site
from jfig.sites import parse_site, site_key

PairSource = Any  # (x [n, d_in], y [n, d_out]) | batch_at(step) -> (x, y) | iterable of (x, y)
HEAD_SITES = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z")
DEFAULT_READ = "blocks.{layer}.ln2.hook_normalized"
DEFAULT_WRITE = "blocks.{layer}.hook_mlp_out"


# ---------------------------------------------------------------------------------- sites


def check_transcoder_sites(read_site: str, write_site: str, model: Any = None) -> tuple[str, str]:
    """``(site, out_site)``: the jfig sites a transcoder from ``read_site`` to ``write_site`` reads
    and writes. Raises SiteError for hooks jfig cannot read or edit, sites with head axes, sites the
    model lacks, and a write site that does not come after the read site in the forward pass."""
    for hook, role in ((read_site, "read_site"), (write_site, "write_site")):
        if not isinstance(hook, str) or not hook:
            raise SiteError(f"transcoder {role} must be a hook name such as 'blocks.0.ln2.hook_normalized', "
                            f"got {hook!r}")
    site, out_site = input_site(read_site), output_site(write_site)
    for name, hook in ((site, read_site), (out_site, write_site)):
        if parse_site(name).local in HEAD_SITES:
            raise SiteError(f"transcoder hook {hook!r} has head axes; a transcoder reads and writes "
                            f"[batch, seq, d] sites")
    if site_key(out_site) <= site_key(site):
        raise SiteError(f"transcoder write_site {write_site!r} ({out_site}) does not come after read_site "
                        f"{read_site!r} ({site}) in the forward pass; a transcoder reads a site and writes a later one "
                        f"(e.g. blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out)")
    if model is not None:
        model.check_site(site)
        model.check_site(out_site)
    return site, out_site


def reads_mlp_input(read_site: str) -> bool:
    """Whether ``read_site`` is at the MLP's input (ln2.hook_normalized, mlp.hook_in: read from
    hook_resid_mid through the block's second norm)."""
    parts = read_site.split(".", 2)
    return len(parts) == 3 and parts[0] == "blocks" and parts[2] in NORMED_INPUTS


def input_norm_of(model: Any, read_site: str, write_site: str, d_in: int) -> Transcoder:
    """A zero transcoder reading ``read_site`` with the model's input norm attached: its
    ``prepare_input`` maps activations at its site to the transcoder's input."""
    zero = Transcoder(W_enc=jnp.zeros((d_in, 1)), b_enc=jnp.zeros((1,)), W_dec=jnp.zeros((1, 1)),
                      b_dec=jnp.zeros((1,)), read_site=read_site, write_site=write_site)
    return zero.with_input_norm(model)


@eqx.filter_jit
def prepare_inputs(norm: Transcoder, x: jax.Array) -> jax.Array:
    return norm.prepare_input(x)


def check_train_request(caller: str, config_cls: type, kw: dict, d_tc: Any, what: str,
                        checkpoint_dir: Any, resume: bool) -> None:
    """The checks every transcoder trainer makes before any work: no unknown config options, ``d_tc`` a
    positive int, and (``resume=False``) no checkpoints already in ``checkpoint_dir``."""
    unknown = set(kw) - set(config_cls.__dataclass_fields__)
    if unknown:
        raise JfigError(f"{caller} got unknown options {sorted(unknown)}; expected {config_cls.__name__} fields")
    if not isinstance(d_tc, (int, np.integer)) or isinstance(d_tc, bool) or d_tc < 1:
        raise JfigError(f"d_tc must be a positive int ({what}), got {d_tc!r}")
    if checkpoint_dir is not None and not resume:
        folder = Path(checkpoint_dir)
        if folder.exists() and checkpoint_dirs(folder):
            raise JfigError(f"{folder} already holds checkpoints and resume=False; pass resume=True to continue "
                            f"that run, or a fresh checkpoint_dir")


# ---------------------------------------------------------------------------------- capture


def capture_tokens(model: Any, tokens: Any, drop_first: bool) -> np.ndarray:
    """int tokens [n_seq, seq] checked for a capture (a 1-D array is one sequence); ShapeError when empty,
    not integers, or (with ``drop_first``) too short to keep a position."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.size == 0 or tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ShapeError(f"tokens must be a non-empty int array [n_seq, seq]; got dtype {tokens.dtype}, shape "
                         f"{tokens.shape}")
    tokens = np.asarray(model.check_tokens(tokens))
    if drop_first and tokens.shape[1] < 2:
        raise ShapeError(f"tokens of length {tokens.shape[1]} leave nothing once position 0 is dropped")
    return tokens


def capture_all(capture: Any, batch_size: int) -> tuple[jax.Array, ...]:
    """Every sequence's rows from a capture (``.tokens``, ``.run(batch, n)`` returning a tuple of arrays:
    a transcoder's pairs, a crosscoder's stacked activations), ``batch_size`` sequences a run, the last
    batch padded to the same shape so the run compiles once."""
    n_seq = capture.tokens.shape[0]
    bs = max(1, min(batch_size, n_seq))
    parts = []
    for start in range(0, n_seq, bs):
        batch = capture.tokens[start:start + bs]
        n = batch.shape[0]
        if n < bs:
            batch = np.concatenate([batch, np.repeat(batch[:1], bs - n, axis=0)])
        parts.append(capture.run(batch, n))
    return tuple(jnp.concatenate(column) for column in zip(*parts))


def streamed(capture: Any, batch_size: int, seed: int) -> tuple[Callable[[int], tuple[jax.Array, jax.Array]], int]:
    """``(batch_at, steps_per_pass)`` over a capture: each step runs ``max(1, batch_size //
    rows_per_sequence)`` whole sequences of a permutation seeded by ``(seed, pass)``, so batch ``s``
    depends only on ``s`` (what an exact resume needs)."""
    n_seq = capture.tokens.shape[0]
    per_step = max(1, min(n_seq, batch_size // capture.rows_per_sequence))
    per_pass = n_seq // per_step
    cache: dict[int, np.ndarray] = {}

    def batch_at(step: int) -> tuple[jax.Array, jax.Array]:
        epoch, i = divmod(int(step), per_pass)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n_seq)
        return capture.sequences(cache[epoch][i * per_step:(i + 1) * per_step])

    return batch_at, per_pass


class _PairCapture:
    """Pairs ``(x_in, y)`` of sequences of int tokens: one run per batch of sequences, stopping at the
    write site; position 0 dropped with ``drop_first``; rows ``[n_tokens, d]``."""

    def __init__(self, model: Any, tokens: Any, read_site: str, write_site: str, drop_first: bool):
        self.site, self.out_site = check_transcoder_sites(read_site, write_site, model)
        self.tokens = capture_tokens(model, tokens, drop_first)
        self.model, self.drop_first = model, drop_first
        self.d_in, self.d_out = model.site_width(self.site), model.site_width(self.out_site)
        if self.d_in is None or self.d_out is None:
            raise JfigError(f"the model does not report the widths of {self.site} and {self.out_site}; train on "
                            f"captured pairs (x_in, y) instead")
        self.norm = input_norm_of(model, read_site, write_site, self.d_in) if reads_mlp_input(read_site) else None

    @property
    def rows_per_sequence(self) -> int:
        return self.tokens.shape[1] - (1 if self.drop_first else 0)

    def run(self, batch: np.ndarray, n: int) -> tuple[jax.Array, jax.Array]:
        """Pairs of the first ``n`` sequences of ``batch`` (the rest pads it to one shape)."""
        cache = self.model.run(jnp.asarray(batch, jnp.int32), capture=(self.site, self.out_site),
                               stop_at=self.out_site, logits=False).cache
        x, y = cache[self.site][:n], cache[self.out_site][:n]
        if self.drop_first:
            x, y = x[:, 1:], y[:, 1:]
        x = x.reshape(-1, self.d_in)
        if self.norm is not None:
            x = prepare_inputs(self.norm, x)
        return x, y.reshape(-1, self.d_out)

    def sequences(self, index: np.ndarray) -> tuple[jax.Array, jax.Array]:
        return self.run(self.tokens[index], len(index))


def capture_pairs(model: Any, tokens: Any, read_site: str, write_site: str, *, batch_size: int = 32,
                  drop_first: bool = True) -> tuple[jax.Array, jax.Array]:
    """Transcoder training pairs for int ``tokens [n_seq, seq]``: ``(x_in [n_tokens, d_in], y
    [n_tokens, d_out])``, ``x_in`` the transcoder's input at ``read_site`` (for ``ln2.hook_normalized`` /
    ``mlp.hook_in``, ``hook_resid_mid`` through :meth:`Transcoder.prepare_input` with the model's norm
    attached), ``y`` the activations at ``write_site``.

    Runs ``batch_size`` sequences at a time, each run capturing both sites and stopping at the write
    site; ``drop_first`` leaves out position 0 (BOS), whose activations are outliers."""
    return capture_all(_PairCapture(model, tokens, read_site, write_site, drop_first), batch_size)


def stream_pairs(model: Any, tokens: Any, read_site: str, write_site: str, *, batch_size: int, seed: int = 0,
                 drop_first: bool = True) -> tuple[Callable[[int], tuple[jax.Array, jax.Array]], int]:
    """``(batch_at, steps_per_pass)``: ``batch_at(step)`` runs the model on that step's sequences and
    returns their pairs (as :func:`capture_pairs`), so memory holds one batch, not the corpus.

    A step takes ``max(1, batch_size // tokens_per_sequence)`` whole sequences; every pass visits the
    sequences in a permutation seeded by ``(seed, pass)``, so batch ``s`` depends only on ``s`` (what
    an exact resume needs)."""
    return streamed(_PairCapture(model, tokens, read_site, write_site, drop_first), batch_size, seed)


# ---------------------------------------------------------------------------------- fit


def fit_transcoder(pairs: PairSource, d_in: int, d_out: int, read_site: str, write_site: str,
                   cfg: TrainConfig, *, model: Any = None, checkpoint_dir: str | os.PathLike | None = None,
                   progress: bool = True, max_steps: int | None = None,
                   callback: Callable[[int, Any, dict[str, jax.Array]], None] | None = None
                   ) -> tuple[Transcoder, dict[str, np.ndarray]]:
    """Train a transcoder from ``read_site`` to ``write_site`` on pairs; returns ``(transcoder,
    history)``, as :func:`jfig.saes.train.fit` does for an SAE (same batching, checkpoints, exact
    resume, ``max_steps``, ``callback`` and history).

    ``pairs`` is one of: a pair of arrays ``(x_in [n, d_in], y [n, d_out])`` (rows paired; each step
    takes ``cfg.batch_size`` rows of a per-epoch permutation seeded by ``(cfg.seed, epoch)``); a
    callable ``batch_at(step) -> (x_in, y)``, deterministic in ``step``; an iterable of such pairs.
    ``x_in`` is the transcoder's input (for a read hook at the MLP's input, what the hook holds, the
    norm already applied: see :func:`capture_pairs`), ``y`` its target output.

    ``cfg``: a :class:`TranscoderConfig` (a plain :class:`TrainConfig` is taken as one without skip).
    ``model``: when the read hook is at the MLP's input, the model whose norm the returned transcoder
    applies to ``hook_resid_mid`` activations (without it, attach the norm later with
    :meth:`Transcoder.with_input_norm`). The transcoder's metadata records the hooks, the config, the
    steps and the last training metrics.

    Raises ShapeError when a batch is not ``[..., d_in]`` / ``[..., d_out]`` or the rows do not pair,
    JfigError on NaN/inf and FormatError when the latest checkpoint is truncated or corrupt.
    """
    for name, value in (("d_in", d_in), ("d_out", d_out)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ShapeError(f"{name} must be a positive int, got {value!r}")
    d_in, d_out = int(d_in), int(d_out)
    cfg = config_as(cfg, TranscoderConfig)
    check_transcoder_sites(read_site, write_site, model)
    site = f"{read_site} -> {write_site}"
    label = f"the transcoder {site}"
    batches = BatchSource(pairs, cfg, (Part("inputs", "d_in", d_in, "inputs "),
                                       Part("outputs", "d_out", d_out, "outputs ")), label)
    meta = run_meta(cfg, site, d_in=d_in, d_out=d_out)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state, history = start_state(batches, folder, meta, template=lambda: empty_transcoder_state(cfg, d_in, d_out),
                                 init=lambda first: init_transcoder_state(cfg, d_in, d_out, *first))
    state, history = run_loop(state, history, batches, lambda s, b: transcoder_train_step(s, *b), meta, folder,
                              desc=f"transcoder {site}", progress=progress, max_steps=max_steps, callback=callback)
    last = {key: float(history[key][-1]) for key in ("loss", "fvu", "l0", "dead_fraction") if key in history}
    tc = transcoder_from_state(state, read_site, write_site, metadata={"train_metrics": last})
    if model is not None and tc.needs_input_norm:
        tc = tc.with_input_norm(model)
    return tc, history



def train_transcoder(model: Any, tokens_or_pairs: Any, read_site: str | None = None, write_site: str | None = None,
                     *, layer: int | None = None, d_tc: int, architecture: str | None = None, k: int | None = None,
                     skip: bool = False, steps: int | None = None, batch_size: int = 4096, lr: float = 3e-4,
                     seed: int = 0, checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
                     progress: bool = True, stream: bool = False, capture_batch_size: int = 32,
                     **kw: Any) -> Transcoder:
    """Train a transcoder that reads ``read_site`` and writes ``write_site``; returns the
    :class:`~jfig.saes.Transcoder`.

    Sites: ``layer=L`` alone means ``blocks.L.ln2.hook_normalized`` (the MLP's normalised input, as
    TransformerLens hooks it, before the norm's weight; encoded from ``blocks.L.hook_resid_mid``)
    -> ``blocks.L.hook_mlp_out``; either hook
    may be given instead. The write site must come after the read site.

    ``tokens_or_pairs``: int tokens ``[n_seq, seq]``, whose pairs are captured from ``model`` (position
    0 dropped; :func:`capture_pairs`, ``capture_batch_size`` sequences per run; with ``stream=True`` the
    model runs each step's sequences instead, so memory holds one batch: :func:`stream_pairs`); or
    pairs ``(x_in [n, d_in], y [n, d_out])`` of float arrays, or a callable ``batch_at(step) -> (x_in,
    y)`` (see :func:`fit_transcoder`; ``model`` may then be None, and if given its site widths are
    checked and its norm attached to a transcoder reading at the MLP's input).

    ``d_tc`` latents; ``architecture`` "relu" (L1 weighted by decoder norms), "jumprelu" (L0 through
    the straight-through estimator) or "topk" (needs ``k``; AuxK for dead latents), by default "topk"
    when ``k`` is given, else "relu". ``skip`` adds a linear skip connection. ``steps`` defaults to
    one pass over the data (at least 1; needed for a callable). Other keywords set
    :class:`TranscoderConfig` fields (``l1_coeff``, ``warmup_steps``, ``checkpoint_every`` ...).

    ``checkpoint_dir``: checkpoints are written there; with ``resume`` (the default) a run finds the
    latest and continues from it, ending with exactly the parameters of an uninterrupted run; with
    ``resume=False`` a folder that already holds checkpoints is refused.

    Every argument is checked before any model run: unknown or misordered sites, ``d_tc < 1``, topk
    without ``k``, unknown options, widths that do not match the model, NaN/inf in given pairs.
    Measure the result with :func:`jfig.saes.transcoder_metrics`; save it with
    :func:`jfig.saes.save_transcoder`.
    """
    if layer is not None:
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or layer < 0:
            raise JfigError(f"layer must be a non-negative int, got {layer!r}")
        read_site = read_site or DEFAULT_READ.format(layer=int(layer))
        write_site = write_site or DEFAULT_WRITE.format(layer=int(layer))
    if read_site is None or write_site is None:
        raise JfigError("train_transcoder needs read_site and write_site, or layer= for blocks.L.ln2.hook_normalized "
                        "-> blocks.L.hook_mlp_out")
    check_train_request("train_transcoder", TranscoderConfig, kw, d_tc, "the number of transcoder latents",
                        checkpoint_dir, resume)
    architecture = architecture or ("topk" if k is not None else "relu")
    check_transcoder_sites(read_site, write_site, model)
    # A config now, so that bad options fail before any model run; steps are set once the data is known.
    TranscoderConfig(d_sae=int(d_tc), architecture=architecture, k=k, steps=1 if steps is None else steps,
                     batch_size=batch_size, lr=lr, seed=seed, skip=skip, **kw)

    data = tokens_or_pairs
    is_pairs = isinstance(data, (tuple, list)) and len(data) == 2 and all(hasattr(a, "shape") for a in data)
    if stream and (is_pairs or callable(data)):
        raise JfigError("stream=True applies to tokens (the model runs each step's sequences); pairs and "
                        "batch_at are used as given")
    if callable(data) and not hasattr(data, "shape"):
        if steps is None:
            raise JfigError("train_transcoder on a callable batch_at(step) needs steps=")
        x0, y0 = _pair_of(data(0), "batch_at(0)")
        d_in, d_out = int(x0.shape[-1]), int(y0.shape[-1])
        _check_widths(model, read_site, write_site, d_in, d_out)
        pairs, n_rows = data, None
    elif is_pairs:
        x, y = _pair_of(data, "tokens_or_pairs")
        if x.ndim != 2 or y.ndim != 2:
            raise ShapeError(f"pairs must be x_in [n, d_in] and y [n, d_out]; got shapes {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ShapeError(f"pairs must have as many rows: x_in has {x.shape[0]}, y has {y.shape[0]}")
        for array, name in ((x, "x_in"), (y, "y")):
            if not bool(jnp.all(jnp.isfinite(array))):
                raise JfigError(f"{name} for the transcoder {read_site} -> {write_site} contains NaN or inf values; "
                                f"expected finite activations")
        d_in, d_out = int(x.shape[1]), int(y.shape[1])
        _check_widths(model, read_site, write_site, d_in, d_out)
        pairs, n_rows = (x, y), int(x.shape[0])
    else:
        tokens = np.asarray(data)
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ShapeError(f"train_transcoder takes int tokens [n_seq, seq] or float pairs (x_in, y); got an "
                             f"array of dtype {tokens.dtype}")
        if model is None:
            raise JfigError("train_transcoder needs a model to capture pairs from tokens")
        if stream:
            pairs, per_pass = stream_pairs(model, tokens, read_site, write_site, batch_size=batch_size, seed=seed)
            steps = per_pass if steps is None else steps
            n_rows = None
        else:
            pairs = capture_pairs(model, tokens, read_site, write_site, batch_size=capture_batch_size)
            for array, name in zip(pairs, ("inputs", "outputs")):
                if not bool(jnp.all(jnp.isfinite(array))):
                    raise JfigError(f"the model's {name} for the transcoder {read_site} -> {write_site} contain NaN "
                                    f"or inf values; check the model's parameters")
            n_rows = int(pairs[0].shape[0])
        d_in, d_out = model.site_width(input_site(read_site)), model.site_width(output_site(write_site))
    if steps is None:
        steps = max(1, n_rows // batch_size)
    cfg = TranscoderConfig(d_sae=int(d_tc), architecture=architecture, k=k, steps=steps, batch_size=batch_size,
                           lr=lr, seed=seed, skip=skip, **kw)
    tc, _ = fit_transcoder(pairs, d_in, d_out, read_site, write_site, cfg, model=model,
                           checkpoint_dir=checkpoint_dir, progress=progress)
    return tc


def _pair_of(item: Any, what: str) -> tuple[jax.Array, jax.Array]:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ShapeError(f"{what} must be a pair (x_in, y) of float arrays; got {type(item).__name__}")
    x, y = (jnp.asarray(a) for a in item)
    for array, name in ((x, "x_in"), (y, "y")):
        if not jnp.issubdtype(array.dtype, jnp.floating) or array.ndim < 1 or array.size == 0:
            raise ShapeError(f"{what}: {name} must be a non-empty float array; got dtype {array.dtype}, shape "
                             f"{tuple(array.shape)}")
    return x, y


def _check_widths(model: Any, read_site: str, write_site: str, d_in: int, d_out: int) -> None:
    if model is None:
        return
    for hook, site, width, name in ((read_site, input_site(read_site), d_in, "x_in"),
                                    (write_site, output_site(write_site), d_out, "y")):
        want = model.site_width(site)
        if want is not None and want != width:
            raise ShapeError(f"{name} has width {width} but {hook} of the model has width {want}")
