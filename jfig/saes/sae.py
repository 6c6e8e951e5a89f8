"""The SAE pytree: encode, decode and the error term, as pure functions of the weights.

An :class:`SAE` is an immutable ``equinox.Module``. Its arrays are traced leaves; its configuration
(site, architecture, normalisation, ...) is static. Every method accepts any number of leading batch
dimensions ``...`` and works under ``jax.jit`` and ``jax.vmap``.

The computation follows SAELens v6 (see FORMATS.md section (a)):

    x_in = reshape_in(x) -> centre (jfig) -> norm_in -> minus b_dec if apply_b_dec_to_input
    pre  = x_in @ W_enc + b_enc                          (topk: times ||W_dec||_row if rescaling)
    f    = relu(pre) | relu(pre)*(pre > threshold) | top-k of pre, relu'd
    out  = (f / ||W_dec||_row if rescaling) @ W_dec + b_dec -> norm_out -> uncentre -> reshape_out

Unlike SAELens, the per-token normalisation statistics are not stored on the object: ``normalize``
and ``encode_with_stats`` return them and ``decode`` takes them back.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from treescope import repr_lib

from jfig.errors import JfigError, ShapeError

ARCHITECTURES = ("relu", "jumprelu", "topk", "batchtopk")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5  # SAELens's layer_norm: xc / (std + 1e-5)

Stats = dict[str, jax.Array] | None  # keys among center, mean, std, scale; each [..., 1]


def _as_array(x):
    return None if x is None else jnp.asarray(x)


def freeze_metadata(meta: Any) -> tuple[tuple[str, str], ...]:
    """A dict (or already-frozen tuple) of JSON-able metadata as a hashable sorted tuple of
    ``(key, json_string)`` pairs."""
    if isinstance(meta, tuple):
        return meta
    if meta is None:
        return ()
    return tuple(sorted((str(k), json.dumps(v, sort_keys=True)) for k, v in dict(meta).items()))


def thaw_metadata(frozen: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The dict `freeze_metadata` froze (a fresh one each call)."""
    return {key: json.loads(value) for key, value in frozen}


def _row_norms(W_dec: jax.Array) -> jax.Array:
    return jnp.linalg.norm(W_dec, axis=-1)  # [d_sae]


JumpFn = Callable[[jax.Array, jax.Array], jax.Array]  # (pre [..., d_sae], threshold [d_sae]) -> f


def jump_relu(pre: jax.Array, threshold: jax.Array) -> jax.Array:
    """``relu(pre)`` where ``pre > threshold`` (strict), else 0; ``[..., d_sae]``."""
    return jnp.where(pre > threshold, jax.nn.relu(pre), jnp.zeros_like(pre))


class SAE(eqx.Module):
    """A sparse autoencoder at one model site.

    Arrays: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``,
    ``threshold [d_sae]`` (jumprelu and batchtopk only, else None).

    Static: ``site`` (TransformerLens hook name), ``architecture`` ("relu", "jumprelu", "topk",
    "batchtopk"; batchtopk encodes as jumprelu with its stored threshold), ``k`` (topk),
    ``apply_b_dec_to_input``, ``normalize_activations`` ("none", "constant_norm_rescale",
    "layer_norm"), ``rescale_acts_by_decoder_norm`` (topk), ``center_input`` (subtract the per-token
    mean over d_in before encoding and add it back after decoding: GPT-2 SAEs trained on
    TransformerLens's centred residual stream), ``reshape_hook_z`` with ``hook_z_shape``
    ``(n_heads, d_head)`` (hook_z sites take ``[..., n_heads, d_head]``), and ``metadata``
    (hashable; read it as a dict through :attr:`meta`).

    >>> sae = SAE.init_random(jax.random.key(0), 8, 32, "blocks.0.hook_resid_post")
    >>> x = jnp.ones((2, 5, 8))
    >>> sae.encode(x).shape, sae.reconstruct(x).shape
    ((2, 5, 32), (2, 5, 8))
    """

    W_enc: jax.Array = eqx.field(converter=_as_array)  # [d_in, d_sae]
    b_enc: jax.Array = eqx.field(converter=_as_array)  # [d_sae]
    W_dec: jax.Array = eqx.field(converter=_as_array)  # [d_sae, d_in]
    b_dec: jax.Array = eqx.field(converter=_as_array)  # [d_in]
    site: str = eqx.field(static=True)
    threshold: jax.Array | None = eqx.field(default=None, converter=_as_array)  # [d_sae]
    architecture: str = eqx.field(default="relu", static=True)
    k: int | None = eqx.field(default=None, static=True)
    apply_b_dec_to_input: bool = eqx.field(default=True, static=True)
    normalize_activations: str = eqx.field(default="none", static=True)
    rescale_acts_by_decoder_norm: bool = eqx.field(default=False, static=True)
    center_input: bool = eqx.field(default=False, static=True)
    reshape_hook_z: bool = eqx.field(default=False, static=True)
    hook_z_shape: tuple[int, int] | None = eqx.field(default=None, static=True)
    metadata: tuple = eqx.field(default=(), static=True, converter=freeze_metadata)

    def __check_init__(self):
        self.validate()

    # ------------------------------------------------------------------ configuration

    def __treescope_repr__(self, path, subtree_renderer):
        """Notebook display (treescope): site, architecture and width first, then the arrays."""
        head = {"site": self.site, "architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae}
        if self.k is not None:
            head["k"] = self.k
        arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("site", "architecture", "k")}
        return repr_lib.render_object_constructor(type(self), {**head, **arrays}, path=None,
                                                  subtree_renderer=subtree_renderer)

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def meta(self) -> dict[str, Any]:
        """The metadata as a fresh dict (SAELens cfg ``metadata``: model_name, hook_name, ...)."""
        return thaw_metadata(self.metadata)

    @property
    def needs_stats(self) -> bool:
        """Whether ``decode`` needs the statistics returned by ``encode_with_stats``."""
        return self.center_input or self.normalize_activations != "none"

    def validate(self) -> "SAE":
        """Check the configuration and that the array shapes agree; raise ShapeError or JfigError.

        Called on construction. Call it again after editing arrays with ``eqx.tree_at``."""
        if not isinstance(self.site, str) or not self.site:
            raise JfigError(f"SAE site must be a non-empty hook name string, got {self.site!r}")
        if self.architecture not in ARCHITECTURES:
            raise JfigError(f"SAE architecture {self.architecture!r} is unknown; expected one of {ARCHITECTURES}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise JfigError(
                f"SAE normalize_activations {self.normalize_activations!r} is unknown; expected one of "
                f"{NORMALIZATIONS} (fold 'expected_average_only_in' with fold_activation_norm_scaling_factor)")
        shape = getattr(self.W_enc, "shape", None)
        if shape is None:
            return self
        if len(shape) != 2:
            raise ShapeError(f"SAE at {self.site}: W_enc has shape {tuple(shape)}; expected [d_in, d_sae]")
        d_in, d_sae = shape
        expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        if self.architecture in ("jumprelu", "batchtopk"):
            if self.threshold is None:
                raise ShapeError(f"SAE at {self.site}: architecture {self.architecture} needs a threshold [{d_sae}]")
            expected["threshold"] = (d_sae,)
        elif self.threshold is not None:
            raise ShapeError(f"SAE at {self.site}: architecture {self.architecture} takes no threshold")
        dtype = self.W_enc.dtype
        for name, want in expected.items():
            got = getattr(self, name)
            if tuple(got.shape) != want:
                raise ShapeError(f"SAE at {self.site}: {name} has shape {tuple(got.shape)}; expected {list(want)} "
                                 f"from W_enc [d_in={d_in}, d_sae={d_sae}]")
            if got.dtype != dtype:
                raise ShapeError(f"SAE at {self.site}: {name} has dtype {got.dtype}; expected {dtype} like W_enc")
        if self.architecture == "topk":
            if not isinstance(self.k, int) or not 0 < self.k <= d_sae:
                raise JfigError(f"SAE at {self.site}: topk needs an int k in [1, d_sae={d_sae}], got {self.k!r}")
        if self.rescale_acts_by_decoder_norm and self.architecture != "topk":
            raise JfigError(f"SAE at {self.site}: rescale_acts_by_decoder_norm applies to topk only")
        if self.hook_z_shape is not None:
            if not self.reshape_hook_z:
                raise JfigError(f"SAE at {self.site}: hook_z_shape is set but reshape_hook_z is False")
            if len(self.hook_z_shape) != 2 or math.prod(self.hook_z_shape) != d_in:
                raise ShapeError(f"SAE at {self.site}: hook_z_shape {self.hook_z_shape} must be "
                                 f"(n_heads, d_head) with n_heads * d_head == d_in {d_in}")
        return self

    # ------------------------------------------------------------------ encode

    def _flatten_in(self, x: jax.Array) -> jax.Array:
        """[..., d_in] (or [..., n_heads, d_head] for hook_z) -> [..., d_in]."""
        if self.reshape_hook_z:
            ok = x.ndim >= 2 and (tuple(x.shape[-2:]) == tuple(self.hook_z_shape) if self.hook_z_shape
                                  else x.shape[-2] * x.shape[-1] == self.d_in)
            if not ok:
                want = list(self.hook_z_shape) if self.hook_z_shape else f"n_heads * d_head = {self.d_in}"
                raise ShapeError(f"SAE at {self.site} takes [..., n_heads, d_head] ({want}); "
                                 f"got input shape {tuple(x.shape)}")
            return x.reshape(*x.shape[:-2], self.d_in)
        if x.ndim < 1 or x.shape[-1] != self.d_in:
            raise ShapeError(f"SAE at {self.site} takes [..., d_in={self.d_in}]; got input shape {tuple(x.shape)}")
        return x

    def _unflatten_out(self, y: jax.Array) -> jax.Array:
        if self.reshape_hook_z and self.hook_z_shape is not None:
            return y.reshape(*y.shape[:-1], *self.hook_z_shape)
        return y

    def normalize(self, x: jax.Array) -> tuple[jax.Array, Stats]:
        """Input preprocessing: ``x [..., d_in] -> (x_in [..., d_in], stats)``.

        Reshapes hook_z input, centres (``center_input``), normalises, and subtracts ``b_dec`` when
        ``apply_b_dec_to_input``. ``stats`` holds what ``decode`` needs to undo this (each entry
        ``[..., 1]``), or is None when nothing is needed.

        layer_norm uses torch's unbiased std (N-1) and ``xc / (std + 1e-5)``;
        constant_norm_rescale multiplies by ``c = sqrt(d_in) / ||x||``.
        """
        x = self._flatten_in(x).astype(self.W_enc.dtype)
        stats = {}
        if self.center_input:
            stats["center"] = jnp.mean(x, axis=-1, keepdims=True)
            x = x - stats["center"]
        if self.normalize_activations == "layer_norm":
            mean = jnp.mean(x, axis=-1, keepdims=True)
            xc = x - mean
            std = jnp.std(xc, axis=-1, keepdims=True, ddof=1)
            x = xc / (std + LAYER_NORM_EPS)
            stats["mean"], stats["std"] = mean, std
        elif self.normalize_activations == "constant_norm_rescale":
            stats["scale"] = math.sqrt(self.d_in) / jnp.linalg.norm(x, axis=-1, keepdims=True)
            x = x * stats["scale"]
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x, (stats or None)

    def _pre_from_normalized(self, x_in: jax.Array) -> jax.Array:
        pre = x_in @ self.W_enc + self.b_enc
        if self.rescale_acts_by_decoder_norm:
            pre = pre * _row_norms(self.W_dec)
        return pre

    def pre_activations(self, x: jax.Array) -> jax.Array:
        """``x [..., d_in] -> [..., d_sae]``: encoder output before the activation function
        (times ``||W_dec||_row`` for topk with ``rescale_acts_by_decoder_norm``)."""
        return self._pre_from_normalized(self.normalize(x)[0])

    def topk(self, pre: jax.Array, k: int | None = None) -> tuple[jax.Array, jax.Array]:
        """The ``k`` (default ``self.k``) largest pre-activations per token, relu'd, and their latent
        indices: ``[..., d_sae] -> (values [..., k], index [..., k])``; on ties the lower index wins."""
        values, index = jax.lax.top_k(pre, self.k if k is None else k)
        return jax.nn.relu(values), index

    def activation(self, pre: jax.Array, jump: JumpFn | None = None) -> jax.Array:
        """The activation function on pre-activations ``[..., d_sae]``.

        jumprelu/batchtopk: ``jump(pre, threshold)``, by default :func:`jump_relu` (``relu(pre)``
        where ``pre > threshold``, strictly, else 0); training passes a straight-through version.
        topk: exactly ``k`` entries kept per token (see :meth:`topk`), all others 0.
        """
        if self.architecture == "relu":
            return jax.nn.relu(pre)
        if self.architecture in ("jumprelu", "batchtopk"):
            return (jump_relu if jump is None else jump)(pre, self.threshold)
        values, index = self.topk(pre)  # [..., k] each
        flat_values = values.reshape(-1, self.k)
        flat_index = index.reshape(-1, self.k)
        rows = jnp.arange(flat_index.shape[0])[:, None]
        out = jnp.zeros((flat_index.shape[0], self.d_sae), pre.dtype).at[rows, flat_index].set(flat_values)
        return out.reshape(pre.shape)

    def encode_with_stats(self, x: jax.Array) -> tuple[jax.Array, Stats]:
        """``x [..., d_in] -> (f [..., d_sae], stats)``; pass ``stats`` to ``decode``."""
        x_in, stats = self.normalize(x)
        return self.activation(self._pre_from_normalized(x_in)), stats

    def encode(self, x: jax.Array) -> jax.Array:
        """``x [..., d_in] -> f [..., d_sae]``, the feature activations."""
        return self.encode_with_stats(x)[0]

    # ------------------------------------------------------------------ decode

    def _check_stats(self, stats: Stats, what: str) -> None:
        need = ["center"] if self.center_input else []
        need += {"layer_norm": ["mean", "std"], "constant_norm_rescale": ["scale"]}.get(
            self.normalize_activations, [])
        if need and (stats is None or any(key not in stats for key in need)):
            raise JfigError(
                f"SAE at {self.site} (normalize_activations={self.normalize_activations!r}, "
                f"center_input={self.center_input}) needs the stats from encode_with_stats for {what}; "
                f"got {None if stats is None else sorted(stats)}, expected keys {need}")

    def decode(self, f: jax.Array, stats: Stats = None) -> jax.Array:
        """``f [..., d_sae] -> x_hat [..., d_in]`` (``[..., n_heads, d_head]`` for hook_z with a
        known ``hook_z_shape``): ``f @ W_dec + b_dec`` with the input normalisation undone by
        ``stats``. Raises JfigError if this SAE normalises and ``stats`` is missing."""
        if f.shape[-1:] != (self.d_sae,):
            raise ShapeError(f"SAE at {self.site} decodes [..., d_sae={self.d_sae}]; got shape {tuple(f.shape)}")
        self._check_stats(stats, "decode")
        if self.rescale_acts_by_decoder_norm:
            f = f / _row_norms(self.W_dec)
        y = f @ self.W_dec + self.b_dec
        if self.normalize_activations == "constant_norm_rescale":
            y = y / stats["scale"]
        elif self.normalize_activations == "layer_norm":
            y = y * stats["std"] + stats["mean"]
        if self.center_input:
            y = y + stats["center"]
        return self._unflatten_out(y)

    def decode_direction(self, feature, stats: Stats = None) -> jax.Array:
        """d decode(f, stats) / d f[feature]: ``W_dec[feature]`` scaled by the normalisation.

        ``feature`` is an int or (traced) int array; the result is ``[..., d_in]`` where ``...``
        is the broadcast of ``feature``'s shape and the leading dims of ``stats``. It is what an
        error-preserving clamp adds: ``x' = x + (value - f_i) * decode_direction(i, stats)``.
        """
        row = self.W_dec[feature]  # [..., d_in]
        if self.rescale_acts_by_decoder_norm:
            row = row / jnp.linalg.norm(row, axis=-1, keepdims=True)
        if self.normalize_activations != "none":
            self._check_stats(stats, "decode_direction")
        if self.normalize_activations == "constant_norm_rescale":
            row = row / stats["scale"]
        elif self.normalize_activations == "layer_norm":
            row = row * stats["std"]
        return self._unflatten_out(row)

    def reconstruct(self, x: jax.Array) -> jax.Array:
        """``decode(encode(x))`` with the statistics of ``x``; same shape as ``x``."""
        f, stats = self.encode_with_stats(x)
        return self.decode(f, stats).reshape(x.shape)

    def error(self, x: jax.Array) -> jax.Array:
        """``x - reconstruct(x)``, so ``reconstruct(x) + error(x) == x`` (SAELens's error term)."""
        return x.astype(self.W_enc.dtype) - self.reconstruct(x)

    # ------------------------------------------------------------------ transformations

    def fold_W_dec_norm(self) -> "SAE":
        """Same SAE function with unit-norm decoder rows; see :func:`fold_W_dec_norm`."""
        return fold_W_dec_norm(self)

    def fold_activation_norm_scaling_factor(self, scale) -> "SAE":
        """SAE for raw inputs when this one expects ``x * scale``; see the module function."""
        return fold_activation_norm_scaling_factor(self, scale)

    @classmethod
    def init_random(cls, key: jax.Array, d_in: int, d_sae: int, site: str, architecture: str = "relu",
                    k: int | None = None, *, dtype=jnp.float32, **kw) -> "SAE":
        """A fresh SAE for tests and training.

        ``W_enc [d_in, d_sae]`` is drawn uniform in ``+-1/sqrt(d_in)`` (Kaiming-uniform style), its
        columns are normalised, and ``W_dec = W_enc.T`` has unit rows. Biases are zero; jumprelu and
        batchtopk thresholds are zero. ``kw`` sets the other static fields.
        """
        bound = 1.0 / math.sqrt(d_in)
        W_enc = jax.random.uniform(key, (d_in, d_sae), jnp.float32, -bound, bound)
        W_enc = W_enc / jnp.linalg.norm(W_enc, axis=0, keepdims=True)
        threshold = jnp.zeros((d_sae,), dtype) if architecture in ("jumprelu", "batchtopk") else None
        return cls(W_enc=W_enc.astype(dtype), b_enc=jnp.zeros((d_sae,), dtype), W_dec=W_enc.T.astype(dtype),
                   b_dec=jnp.zeros((d_in,), dtype), site=site, threshold=threshold,
                   architecture=architecture, k=k, **kw)


def fold_W_dec_norm(sae: SAE) -> SAE:
    """Rescale so decoder rows have unit norm without changing encode-then-decode (SAELens formulas):
    ``W_dec /= n``, ``W_enc *= n``, ``b_enc *= n``, jumprelu/batchtopk ``threshold *= n``, with
    ``n = ||W_dec||_row [d_sae]`` (zero rows are left alone). Feature activations scale by ``n``.

    topk is refused unless ``rescale_acts_by_decoder_norm``, since scaling would change which k win.
    """
    if sae.architecture == "topk" and not sae.rescale_acts_by_decoder_norm:
        raise JfigError(f"SAE at {sae.site}: cannot fold W_dec norms into a topk SAE without "
                        "rescale_acts_by_decoder_norm (it would change which features are in the top k)")
    n = _row_norms(sae.W_dec)
    n = jnp.where(n > 0, n, jnp.ones_like(n))
    threshold = None if sae.threshold is None else sae.threshold * n
    return dataclasses.replace(sae, W_dec=sae.W_dec / n[:, None], W_enc=sae.W_enc * n, b_enc=sae.b_enc * n,
                               threshold=threshold)


def fold_activation_norm_scaling_factor(sae: SAE, scale) -> SAE:
    """Fold a constant input scale ``s`` (the SAE was trained on ``x * s``) into the weights:
    ``W_enc *= s; W_dec /= s; b_dec /= s``. The new SAE takes raw ``x`` and decodes to raw scale;
    feature activations are unchanged. This is how "expected_average_only_in" is removed."""
    s = jnp.asarray(scale, sae.W_enc.dtype)
    return dataclasses.replace(sae, W_enc=sae.W_enc * s, W_dec=sae.W_dec / s, b_dec=sae.b_dec / s)
