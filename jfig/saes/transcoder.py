"""Transcoders: dictionaries that read one site and write another.

A :class:`Transcoder` reads its input hook (``read_site``, e.g. ``blocks.3.ln2.hook_normalized``) and
writes its output hook (``write_site``, e.g. ``blocks.3.hook_mlp_out``):

    pre = x_in @ W_enc + b_enc
    f   = relu(pre) | jumprelu(pre) | top-k of pre
    out = f @ W_dec + b_dec (+ x_in @ W_skip for skip transcoders)

As a *target* it is read like an SAE: ``site`` is the jfig site its features are computed from,
and ``encode`` / ``pre_activations`` / ``activation`` / ``d_sae`` / ``d_in`` behave as an SAE's do,
so it can stand wherever jfig reads SAE features. As a *source* its feature is clamped at the write
site (``jfig.edits.ClampTranscoder``), not with an SAE clamp at the read site.

Input hooks that are not jfig sites: ``mlp.hook_in`` (the MLP's input, the block's second norm applied
to ``hook_resid_mid``) and ``ln2.hook_normalized`` (that norm's normalisation alone, before its
weight and bias, as TransformerLens places the hook) are read from ``blocks.{l}.hook_resid_mid``
with the normalisation applied first. The norm's weights belong to the model, so such a transcoder needs
:meth:`Transcoder.with_input_norm` (or :func:`attach_input_norms`) before it encodes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from jfig.errors import JfigError, ShapeError, SiteError
from jfig.models.layers import norm as model_norm
from jfig.saes.sae import freeze_metadata, thaw_metadata
from jfig.sites import parse_site

ARCHITECTURES = ("relu", "jumprelu", "topk")
JUMP_STYLES = ("saelens", "circuit_tracer")     # relu(pre)*(pre > thr)  |  pre*(pre > thr)
INPUT_NORMS = ("identity", "unset", "model")
# Input hooks that are the MLP's input: the block's second norm of hook_resid_mid.
NORMED_INPUTS = ("ln2.hook_normalized", "mlp.hook_in")
# Output hooks that name jfig's hook_mlp_out under another name.
MLP_OUTPUTS = ("hook_mlp_out", "mlp.hook_out")


def _as_array(x):
    return None if x is None else jnp.asarray(x)


def _split(hook: str) -> tuple[int | None, str]:
    """(layer or None, local name) of a TransformerLens hook name."""
    parts = hook.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None, hook


def input_site(hook: str) -> str:
    """The jfig site a transcoder reading ``hook`` is computed from (ln2.hook_normalized and
    mlp.hook_in: the same block's hook_resid_mid)."""
    layer, local = _split(hook)
    if layer is not None and local in NORMED_INPUTS:
        return f"blocks.{layer}.hook_resid_mid"
    try:
        return parse_site(hook).name
    except SiteError as e:
        raise SiteError(f"transcoder input hook {hook!r} is not a site jfig can read: {e}") from e


def output_site(hook: str) -> str:
    """The jfig site a transcoder writing ``hook`` writes (mlp.hook_out: hook_mlp_out)."""
    layer, local = _split(hook)
    if layer is not None and local in MLP_OUTPUTS:
        return f"blocks.{layer}.hook_mlp_out"
    try:
        return parse_site(hook).name
    except SiteError as e:
        raise SiteError(f"transcoder output hook {hook!r} is not a site jfig can edit: {e}") from e


class Transcoder(eqx.Module):
    """A (skip) transcoder from ``read_site`` to ``write_site``.

    Arrays: ``W_enc [d_in, d_tc]``, ``b_enc [d_tc]``, ``W_dec [d_tc, d_out]``, ``b_dec [d_out]``,
    optional ``W_skip [d_in, d_out]`` (jfig's orientation: ``x_in @ W_skip``), ``threshold [d_tc]``
    (jumprelu), ``norm_w`` / ``norm_b [d_in]`` (the model's input norm, see module docstring).

    Static: ``read_site`` / ``write_site`` (TransformerLens hook names as the file gives them),
    ``architecture`` ("relu", "jumprelu", "topk"), ``k`` (topk), ``jump`` ("saelens":
    ``relu(pre)`` where ``pre > threshold``; "circuit_tracer": ``pre`` where ``pre > threshold``, no
    relu), ``input_norm`` ("identity"; "unset": the input needs the model's norm, not yet attached;
    "model": attached, with ``norm_kind`` "rms"/"layer", ``norm_eps``, ``norm_offset``), ``metadata``.

    Cross-layer transcoders: one Transcoder per read layer, whose ``W_dec`` writes its own layer's
    ``write_site`` and ``W_dec_later [d_tc, n_later, d_out]`` the ``later_sites`` (the same output
    hook of each later layer). ``decode`` gives the own-layer write only.

    ``site`` is the jfig site its features are read from; ``out_site`` the jfig site it writes
    (``out_sites``: every site it writes, own layer first).
    """

    W_enc: jax.Array = eqx.field(converter=_as_array)  # [d_in, d_tc]
    b_enc: jax.Array = eqx.field(converter=_as_array)  # [d_tc]
    W_dec: jax.Array = eqx.field(converter=_as_array)  # [d_tc, d_out]
    b_dec: jax.Array = eqx.field(converter=_as_array)  # [d_out]
    read_site: str = eqx.field(static=True)
    write_site: str = eqx.field(static=True)
    W_skip: jax.Array | None = eqx.field(default=None, converter=_as_array)  # [d_in, d_out]
    threshold: jax.Array | None = eqx.field(default=None, converter=_as_array)  # [d_tc]
    norm_w: jax.Array | None = eqx.field(default=None, converter=_as_array)  # [d_in]
    norm_b: jax.Array | None = eqx.field(default=None, converter=_as_array)  # [d_in]
    W_dec_later: jax.Array | None = eqx.field(default=None, converter=_as_array)  # [d_tc, n_later, d_out]
    later_sites: tuple = eqx.field(default=(), static=True, converter=tuple)
    architecture: str = eqx.field(default="relu", static=True)
    k: int | None = eqx.field(default=None, static=True)
    jump: str = eqx.field(default="saelens", static=True)
    input_norm: str | None = eqx.field(default=None, static=True)
    norm_kind: str | None = eqx.field(default=None, static=True)
    norm_eps: float = eqx.field(default=1e-5, static=True)
    norm_offset: float = eqx.field(default=0.0, static=True)
    metadata: tuple = eqx.field(default=(), static=True, converter=freeze_metadata)

    def __post_init__(self):
        if self.input_norm is None:
            object.__setattr__(self, "input_norm", "unset" if self.needs_input_norm else "identity")

    def __check_init__(self):
        self.validate()

    # ------------------------------------------------------------------ configuration

    @property
    def site(self) -> str:
        """The jfig site the features are computed from (where a target is read)."""
        return input_site(self.read_site)

    @property
    def out_site(self) -> str:
        """The jfig site the transcoder writes (where its features are clamped)."""
        return output_site(self.write_site)

    @property
    def out_sites(self) -> tuple[str, ...]:
        """Every jfig site the transcoder writes: ``out_site``, then each of ``later_sites``."""
        return (self.out_site,) + tuple(output_site(s) for s in self.later_sites)

    def decoder_rows(self, out: int = 0) -> jax.Array:
        """The decoder ``[d_tc, d_out]`` into ``out_sites[out]``."""
        return self.W_dec if out == 0 else self.W_dec_later[:, out - 1]

    @property
    def needs_input_norm(self) -> bool:
        return _split(self.read_site)[1] in NORMED_INPUTS

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        """The number of features (``d_tc``), named as an SAE's so SAE-reading code can read it."""
        return self.W_enc.shape[1]

    @property
    def d_tc(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def reshape_hook_z(self) -> bool:
        return False

    @property
    def meta(self) -> dict[str, Any]:
        """The metadata as a fresh dict."""
        return thaw_metadata(self.metadata)

    def validate(self) -> "Transcoder":
        """Check the configuration and that the array shapes agree; raise ShapeError or JfigError."""
        label = f"Transcoder {self.read_site} -> {self.write_site}"
        input_site(self.read_site)
        for hook in (self.write_site, *self.later_sites):
            output_site(hook)
        if self.architecture not in ARCHITECTURES:
            raise JfigError(f"{label}: architecture {self.architecture!r} is unknown; expected one of {ARCHITECTURES}")
        if self.jump not in JUMP_STYLES:
            raise JfigError(f"{label}: jump {self.jump!r} is unknown; expected one of {JUMP_STYLES}")
        if self.input_norm not in INPUT_NORMS:
            raise JfigError(f"{label}: input_norm {self.input_norm!r} is unknown; expected one of {INPUT_NORMS}")
        if self.input_norm == "model" and self.norm_kind not in ("rms", "layer"):
            raise JfigError(f"{label}: norm_kind {self.norm_kind!r}; expected 'rms' or 'layer'")
        shape = getattr(self.W_enc, "shape", None)
        if shape is None:
            return self
        if len(shape) != 2:
            raise ShapeError(f"{label}: W_enc has shape {tuple(shape)}; expected [d_in, d_tc]")
        d_in, d_tc = shape
        if self.W_dec.ndim != 2 or self.W_dec.shape[0] != d_tc:
            raise ShapeError(f"{label}: W_dec has shape {tuple(self.W_dec.shape)}; expected [d_tc={d_tc}, d_out]")
        d_out = self.W_dec.shape[1]
        expected = {"b_enc": (d_tc,), "b_dec": (d_out,)}
        if self.W_skip is not None:
            expected["W_skip"] = (d_in, d_out)
        if self.later_sites or self.W_dec_later is not None:
            expected["W_dec_later"] = (d_tc, len(self.later_sites), d_out)
        if self.architecture == "jumprelu":
            if self.threshold is None:
                raise ShapeError(f"{label}: a jumprelu transcoder needs a threshold [{d_tc}]")
            expected["threshold"] = (d_tc,)
        elif self.threshold is not None:
            raise ShapeError(f"{label}: architecture {self.architecture} takes no threshold")
        if self.input_norm == "model":
            expected["norm_w"] = (d_in,)
            if self.norm_kind == "layer":
                expected["norm_b"] = (d_in,)
        for name, want in expected.items():
            got = getattr(self, name)
            if got is None or tuple(got.shape) != want:
                raise ShapeError(f"{label}: {name} has shape {None if got is None else tuple(got.shape)}; "
                                 f"expected {list(want)}")
        if self.architecture == "topk" and (not isinstance(self.k, int) or not 0 < self.k <= d_tc):
            raise JfigError(f"{label}: topk needs an int k in [1, d_tc={d_tc}], got {self.k!r}")
        return self

    # ------------------------------------------------------------------ input norm

    def with_input_norm(self, model) -> "Transcoder":
        """This transcoder with the model's input norm attached, when its input hook is the MLP's
        input (ln2.hook_normalized, mlp.hook_in); otherwise itself. ``model``: a built-in jfig Model."""
        if not self.needs_input_norm:
            return self
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise JfigError(f"Transcoder reading {self.read_site}: attaching the input norm needs a built-in "
                            f"model (its ln2 weights); a wrapped model does not expose them")
        layer, local = _split(self.read_site)
        blocks = model.params["blocks"]
        w = blocks["ln2_w"][layer]
        b = blocks["ln2_b"][layer] if cfg.norm != "rms" else None
        offset = float(cfg.norm_offset)
        if local == "ln2.hook_normalized":          # TransformerLens: normalised, before the norm's weights
            w, b, offset = jnp.ones_like(w), (None if b is None else jnp.zeros_like(b)), 0.0
        return dataclasses.replace(self, norm_w=w, norm_b=b, input_norm="model",
                                   norm_kind="rms" if cfg.norm == "rms" else "layer",
                                   norm_eps=float(cfg.norm_eps), norm_offset=offset)

    def prepare_input(self, x: jax.Array) -> jax.Array:
        """Activations at :attr:`site` ``[..., d_in]`` -> the transcoder's input ``x_in [..., d_in]``."""
        if x.ndim < 1 or x.shape[-1] != self.d_in:
            raise ShapeError(f"Transcoder at {self.site} takes [..., d_in={self.d_in}]; got shape {tuple(x.shape)}")
        x = x.astype(self.W_enc.dtype)
        if self.input_norm == "unset":
            raise JfigError(f"Transcoder reading {self.read_site} encodes the MLP's input, the model's second "
                            f"norm of {self.site}; attach it first with transcoder.with_input_norm(model) "
                            f"(or jfig.attach_input_norms(transcoders, model))")
        if self.input_norm == "model":
            cfg = _NormConfig(self.norm_kind, self.norm_eps, self.norm_offset)
            x = model_norm(cfg, x, self.norm_w, self.norm_b).astype(self.W_enc.dtype)
        return x

    # ------------------------------------------------------------------ encode / decode

    def pre_activations(self, x: jax.Array) -> jax.Array:
        """Activations at :attr:`site` ``[..., d_in]`` -> encoder output ``[..., d_tc]``."""
        return self.prepare_input(x) @ self.W_enc + self.b_enc

    def activation(self, pre: jax.Array) -> jax.Array:
        """relu; jumprelu (``jump`` style, strict ``>``); topk (the k largest raw values per token
        kept, as circuit-tracer does; lower index wins ties)."""
        if self.architecture == "relu":
            return jax.nn.relu(pre)
        if self.architecture == "jumprelu":
            kept = pre if self.jump == "circuit_tracer" else jax.nn.relu(pre)
            return jnp.where(pre > self.threshold, kept, jnp.zeros_like(pre))
        values, index = jax.lax.top_k(pre, self.k)
        flat_v, flat_i = values.reshape(-1, self.k), index.reshape(-1, self.k)
        rows = jnp.arange(flat_i.shape[0])[:, None]
        out = jnp.zeros((flat_i.shape[0], self.d_tc), pre.dtype).at[rows, flat_i].set(flat_v)
        return out.reshape(pre.shape)

    def encode(self, x: jax.Array) -> jax.Array:
        """Activations at :attr:`site` ``[..., d_in]`` -> features ``[..., d_tc]``."""
        return self.activation(self.pre_activations(x))

    def encode_with_stats(self, x: jax.Array):
        """``(encode(x), None)``: a transcoder keeps no normalisation statistics."""
        return self.encode(x), None

    def decode(self, f: jax.Array, x: jax.Array | None = None) -> jax.Array:
        """Features ``[..., d_tc]`` -> output ``[..., d_out]`` at the write site; a skip transcoder
        adds ``x_in @ W_skip`` and needs ``x`` (the activations at :attr:`site`)."""
        if f.shape[-1:] != (self.d_tc,):
            raise ShapeError(f"Transcoder at {self.site} decodes [..., d_tc={self.d_tc}]; got shape {tuple(f.shape)}")
        y = f @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise JfigError(f"Transcoder {self.read_site} -> {self.write_site} has a skip connection; "
                                f"decode(f, x) needs the input activations x")
            y = y + self.prepare_input(x) @ self.W_skip
        return y

    def forward(self, x: jax.Array) -> jax.Array:
        """The transcoder's output for activations ``x`` at :attr:`site`: ``decode(encode(x), x)``."""
        return self.decode(self.encode(x), x)

    def decode_direction(self, feature, stats=None) -> jax.Array:
        """Refused: a transcoder feature writes at :attr:`out_site`, not in the basis of the site it
        reads; clamp it with ``jfig.ClampTranscoder``."""
        raise JfigError(f"a transcoder feature is read at {self.site} but writes at {self.out_site}; it has no "
                        f"decoder direction at its read site. Use it as a target, or clamp it with "
                        f"ClampTranscoder (which edits {self.out_site})")

    @classmethod
    def init_random(cls, key: jax.Array, d_in: int, d_tc: int, read_site: str, write_site: str,
                    d_out: int | None = None, *, skip: bool = False, architecture: str = "relu",
                    k: int | None = None, **kw) -> "Transcoder":
        """A random transcoder for tests: weights normal / sqrt(fan-in), small random biases."""
        d_out = d_in if d_out is None else d_out
        k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
        threshold = jax.random.uniform(k6, (d_tc,), jnp.float32, 0.0, 0.1) if architecture == "jumprelu" else None
        return cls(W_enc=jax.random.normal(k1, (d_in, d_tc)) / jnp.sqrt(d_in),
                   b_enc=0.1 * jax.random.normal(k2, (d_tc,)),
                   W_dec=jax.random.normal(k3, (d_tc, d_out)) / jnp.sqrt(d_tc),
                   b_dec=0.1 * jax.random.normal(k4, (d_out,)),
                   W_skip=jax.random.normal(k5, (d_in, d_out)) / jnp.sqrt(d_in) if skip else None,
                   threshold=threshold, read_site=read_site, write_site=write_site, architecture=architecture,
                   k=k, **kw)


@dataclasses.dataclass(frozen=True)
class _NormConfig:
    """The fields of a ModelConfig that the model's norm reads."""

    norm: str
    norm_eps: float
    norm_offset: float


def attach_input_norms(transcoders, model) -> list:
    """Each transcoder with the model's input norm attached where it needs one (see
    :meth:`Transcoder.with_input_norm`)."""
    return [t.with_input_norm(model) for t in transcoders]
