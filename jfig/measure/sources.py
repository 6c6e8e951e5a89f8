"""What a sweep clamps: an SAE feature at the SAE's site, or a transcoder feature where it writes.

An SAE feature i is read and clamped at one site: x' = x + (α − f_i)·d_i there. A transcoder feature
is read at its input site (``Transcoder.site``, e.g. ``blocks.3.hook_resid_mid``) and clamped at its
output site (``Transcoder.out_site``, e.g. ``blocks.3.hook_mlp_out``): x' = x + (α − f_i)·W_dec[i]
there, and for a cross-layer transcoder also x'_k = x_k + (α − f_i)·W_dec_later[i, k] at each later
output site. Editing the output site leaves the input site untouched (it comes first), so f_i is the
clean run's value, as ``ClampTranscoder`` computes it.

:class:`TranscoderSource` presents a transcoder to the sweep engine as an SAE would: ``site`` is where
the suffix starts (the output site), ``value_site`` where the feature's values are read, and
``decode_direction`` its decoder row into the output site.
"""
from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from ..errors import JfigError
from ..models.validation import check_saes
from ..saes.transcoder import Transcoder
from ..sites import site_key


class TranscoderSource(eqx.Module):
    """A transcoder as a clamp source (see module docstring).

    ``site``: the output site (the suffix starts there); ``value_site``: the input site (the features'
    values); ``later_sites``: the further output sites of a cross-layer transcoder that lie at or
    before ``stop_site`` (static, so the sweep that stops earlier does not write past its end)."""

    transcoder: Transcoder
    later_sites: tuple = eqx.field(static=True)

    def __init__(self, transcoder: Transcoder, stop_site: str | None = None):
        self.transcoder = transcoder
        later = transcoder.out_sites[1:]
        if stop_site is not None:
            later = tuple(s for s in later if site_key(s) <= site_key(stop_site))
        self.later_sites = tuple(later)

    @property
    def site(self) -> str:
        return self.transcoder.out_site

    @property
    def value_site(self) -> str:
        return self.transcoder.site

    @property
    def d_sae(self) -> int:
        return self.transcoder.d_tc

    @property
    def d_in(self) -> int:
        """The width of the site the clamp edits (the transcoder's output)."""
        return self.transcoder.d_out

    def encode(self, x: jax.Array) -> jax.Array:
        """Activations at ``value_site`` [..., d_in] -> features [..., d_tc]."""
        return self.transcoder.encode(x)

    def encode_with_stats(self, x: jax.Array):
        """(None, None): the features are not read at the site the clamp edits, and a transcoder keeps no
        normalisation statistics; only the second element (the statistics) is read by the engine."""
        return None, None

    def decode_direction(self, feature, stats=None) -> jax.Array:
        """The decoder row [d_out] feature i writes into ``site``."""
        return jnp.take(self.transcoder.W_dec, feature, axis=0)

    def later_directions(self, feature) -> tuple[jax.Array, ...]:
        """The decoder rows [d_out] feature i writes into each of ``later_sites``."""
        return tuple(jnp.take(self.transcoder.decoder_rows(k + 1), feature, axis=0)
                     for k in range(len(self.later_sites)))


def value_site(source) -> str:
    """Where a source's feature values are read: its own site, or a transcoder's input site."""
    return getattr(source, "value_site", source.site)


def later_sites(source) -> tuple[str, ...]:
    """Further sites a source writes (a cross-layer transcoder's later outputs), else ()."""
    return getattr(source, "later_sites", ())


def clamp_source(dictionary, stop_site: str | None = None):
    """The object a sweep clamps for a dictionary: an SAE itself, a Transcoder as a TranscoderSource."""
    return TranscoderSource(dictionary, stop_site) if isinstance(dictionary, Transcoder) else dictionary


def edit_site(dictionary) -> str:
    """The site a clamp of this dictionary's features edits (an SAE's site; a transcoder's output)."""
    return dictionary.out_site if isinstance(dictionary, Transcoder) else dictionary.site


def prefix_sites(saes: dict) -> tuple[str, ...]:
    """Every site a clean prefix must hold to start sweeps of these dictionaries: each SAE's site, each
    transcoder's input and output site (forward order, no repeats)."""
    sites = []
    for d in saes.values():
        sites += [d.site] + ([d.out_site] if isinstance(d, Transcoder) else [])
    return tuple(sorted(dict.fromkeys(sites), key=site_key))


def check_dictionaries(model, saes) -> dict:
    """``check_saes`` for SAEs and transcoders: {site: dictionary} in forward order. A transcoder that
    encodes the MLP's input gets the model's norm attached here (a built-in model), else a clear error;
    a transcoder's output site must be a site of the model and as wide as it writes."""
    by_site = check_saes(model, saes)
    out = {}
    for site, d in by_site.items():
        if isinstance(d, Transcoder):
            if d.input_norm == "unset":
                if getattr(model, "config", None) is None:
                    raise JfigError(f"the transcoder at {site} reads {d.read_site}, the MLP's normalised input; a "
                                    f"wrapped model does not expose that norm: attach it with "
                                    f"transcoder.with_input_norm(...) on the built-in model, or use a transcoder "
                                    f"that reads a site directly")
                d = d.with_input_norm(model)
            for s in d.out_sites:
                model.check_site(s)
                width = model.site_width(s)
                if width is not None and width != d.d_out:
                    raise JfigError(f"the transcoder at {site} writes width {d.d_out} into {s}, which is "
                                    f"{width} wide")
        out[site] = d
    return out
