"""Hypothesis strategies for property tests of code that runs jfig models and edits.

Every strategy draws small objects from a small set of shapes: JAX compiles a function once per
configuration, token shape and edit structure, so a property test of 15-20 examples spends most of
its time compiling unless its examples share shapes. Random weights come from a drawn integer seed,
so hypothesis can replay and shrink every example (a failing example is reported with its seed).

- `tiny_models(family=None)`: tiny random transformers of each family (llama, gpt2, gemma2);
- `sites(model)`: a site of a model that an SAE can read (residual, attention / MLP output, MLP hidden);
- `saes(site, d_in, architecture=None)`: SAEs of every architecture jfig supports (relu, jumprelu,
  topk, batchtopk), with their input normalisations and options;
- `token_batches(vocab, max_batch, max_seq)`: int32 token arrays [batch, seq];
- `positions(seq_len, batch)`: the `positions` argument of an edit (None, ints, or a bool mask);
- `edits(sae_or_model, seq_len=..., batch=...)`: Clamp / Ablate / SetFeatures of an SAE's features and
  Steer at its site (or Steer at a drawn site of a model), with valid feature ids, values and positions;
- `setups(family=None, architecture=None)`: (model, sae, tokens) together, the usual start of a test.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

try:
    import hypothesis.extra.numpy as hnp
    import hypothesis.strategies as st
except ImportError as err:       # hypothesis is in the test extra, not a runtime dependency
    raise ImportError("jfig.testing's strategies need hypothesis: pip install hypothesis "
                      "(or pip install 'jfig[test]')") from err
import jax
import jax.numpy as jnp
import numpy as np

from ..edits import Ablate, Clamp, Edit, SetFeatures, Steer
from ..errors import SiteError
from ..models.model import Model
from ..saes.sae import ARCHITECTURES, NORMALIZATIONS, SAE
from ..sites import parse_site
from .models import FAMILIES, TINY_MAX_SEQ, TINY_VOCAB, tiny_model

# Sites an SAE usually reads, by their name inside a block (hook_z needs a [n_heads, d_head] SAE).
SAE_STAGES = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "mlp.hook_post", "hook_mlp_out",
              "hook_resid_post")
SAE_EDITS = ("clamp", "ablate", "set_features")
EDIT_KINDS = (*SAE_EDITS, "steer")
SEED = st.integers(0, 2**31 - 1)


def one_of_values(value, default) -> st.SearchStrategy:
    """A strategy for an option given as None (any of `default`), one value, or a sequence of values."""
    if value is None:
        return st.sampled_from(tuple(default))
    if isinstance(value, (str, int, float, bool, np.generic)):
        return st.just(value)
    values = tuple(value)
    if not values:
        raise ValueError(f"expected at least one value to draw from, got {value!r}")
    return st.sampled_from(values)


def small_floats(lo: float, hi: float) -> st.SearchStrategy:
    """float32-representable floats in [lo, hi], no NaN, infinities or subnormals."""
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)


# ------------------------------------------------------------------------------------------ models

def tiny_models(family=None, *, n_layers=2, d_model=16, vocab_size: int = TINY_VOCAB,
                max_seq_len: int = TINY_MAX_SEQ, scale: float = 0.2) -> st.SearchStrategy:
    """Tiny random `jfig.Model`s (real transformers, `Model.from_config`).

    family: None (llama, gpt2 or gemma2), one family name, or a sequence of them. n_layers and
    d_model: an int or a sequence of ints to draw from (d_model a multiple of 4: heads of width 4).
    The weights come from a drawn seed (normal, standard deviation `scale`), so models of one family
    and size share a configuration and reuse compiled code. Every model has `vocab_size` tokens and
    at most `max_seq_len` positions.
    """
    @st.composite
    def draw_model(draw):
        fam = draw(one_of_values(family, FAMILIES))
        if fam not in FAMILIES:
            raise ValueError(f"unknown model family {fam!r}; expected one of {FAMILIES}")
        return tiny_model(fam, seed=draw(SEED), scale=scale, n_layers=draw(one_of_values(n_layers, ())),
                          d_model=draw(one_of_values(d_model, ())), vocab_size=vocab_size, max_seq_len=max_seq_len)

    return draw_model()


def sites(model: Model, stages=SAE_STAGES) -> st.SearchStrategy:
    """A site of `model` that an SAE can read: for built-in models, one whose name inside its block is
    in `stages` (default: residual stream, attention and MLP outputs, MLP hidden units); for models
    wrapped with `Model.from_function`, any site with a known width."""
    names = []
    for site in model.sites:
        if model.site_width(site) is None:
            continue
        try:
            local = parse_site(site).local
        except SiteError:
            local = None                      # a wrapped model's own site name
        if model.config is None or local in stages:
            names.append(site)
    if not names:
        raise ValueError(f"no site of this model is in {stages} with a known width (sites: {model.sites})")
    return st.sampled_from(names)


# -------------------------------------------------------------------------------------------- SAEs

def saes(site: str, d_in: int, architecture=None, *, d_sae=32, k=(1, 4), normalizations=NORMALIZATIONS,
         apply_b_dec_to_input=(False, True), center_input=(False,), tied=None, hook_z_shape=None,
         firing=(0.0, 0.1, 0.5)) -> st.SearchStrategy:
    """`jfig.SAE`s reading `site` (`d_in` wide), built with `SAE.init_random` and then given biases.

    architecture: None (relu, jumprelu, topk or batchtopk), one name, or a sequence of names. d_sae
    and k (topk's k, capped at d_sae): an int or a sequence of ints. normalizations: the
    `normalize_activations` values to draw from ("none", "constant_norm_rescale", "layer_norm");
    apply_b_dec_to_input and center_input: the booleans to draw from; topk SAEs also draw
    `rescale_acts_by_decoder_norm`. tied: True keeps `init_random`'s decoder (the encoder's transpose,
    unit rows, so the decoder row of a feature has unit dot product with its encoder column), False
    draws an independent decoder with unit rows, None draws either. hook_z_shape: (n_heads, d_head)
    for an `attn.hook_z` SAE. Biases b_enc and b_dec are drawn small; jumprelu and batchtopk
    thresholds are uniform in [0, t] with t drawn from `firing`, so some features fire and some do not.
    """
    @st.composite
    def draw_sae(draw):
        arch = draw(one_of_values(architecture, ARCHITECTURES))
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {arch!r}; expected one of {ARCHITECTURES}")
        width = draw(one_of_values(d_sae, ()))
        top = min(draw(one_of_values(k, ())), width) if arch == "topk" else None
        options = dict(normalize_activations=draw(one_of_values(normalizations, ())),
                       apply_b_dec_to_input=draw(one_of_values(apply_b_dec_to_input, ())),
                       center_input=draw(one_of_values(center_input, ())))
        if arch == "topk":
            options["rescale_acts_by_decoder_norm"] = draw(st.booleans())
        if hook_z_shape is not None:
            options.update(reshape_hook_z=True, hook_z_shape=tuple(hook_z_shape))
        untied = not draw(one_of_values(tied, (True, False)))
        t_max = draw(one_of_values(firing, ()))
        keys = jax.random.split(jax.random.PRNGKey(draw(SEED)), 5)
        sae = SAE.init_random(keys[0], d_in, width, site, arch, top, **options)
        W_dec = sae.W_dec
        if untied:
            W_dec = jax.random.normal(keys[1], W_dec.shape)
            W_dec = W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True)
        threshold = None if sae.threshold is None else jax.random.uniform(keys[2], (width,), maxval=t_max)
        return dataclasses.replace(sae, W_dec=W_dec, threshold=threshold,
                                   b_enc=0.1 * jax.random.normal(keys[3], (width,)),
                                   b_dec=0.1 * jax.random.normal(keys[4], (d_in,))).validate()

    return draw_sae()


# ------------------------------------------------------------------------------------------ tokens

def token_batches(vocab: int, max_batch: int = 2, max_seq: int = 8, *, shapes=None) -> st.SearchStrategy:
    """int32 token arrays [batch, seq] with ids in [0, vocab).

    Shapes come from a small set, so compiled code is reused across examples: by default two,
    (1, max_seq // 2) and (max_batch, max_seq), one sequence alone and a batch of full-length ones;
    `shapes` gives the set explicitly as (batch, seq) pairs."""
    if isinstance(vocab, Model):
        vocab = vocab.vocab_size
    if shapes is None:
        shapes = sorted({(1, max(1, max_seq // 2)), (max_batch, max_seq)})
    shapes = [tuple(int(n) for n in shape) for shape in shapes]
    if any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
        raise ValueError(f"token shapes must be (batch >= 1, seq >= 1) pairs, got {shapes}")
    return st.sampled_from(shapes).flatmap(
        lambda shape: hnp.arrays(np.int32, shape, elements=st.integers(0, int(vocab) - 1)))


def positions(seq_len: int | None, batch: int | None = None) -> st.SearchStrategy:
    """An edit's `positions` for a run of `seq_len` tokens: None (every position), an int in
    [-seq_len, seq_len), an int array [n] of positions, a bool mask [seq_len], or a bool mask
    [batch, seq_len] when `batch` is given. With seq_len None only None is drawn."""
    if seq_len is None:
        return st.none()
    forms = [st.none(), st.integers(-seq_len, seq_len - 1),
             hnp.arrays(np.int32, st.integers(1, seq_len), elements=st.integers(0, seq_len - 1), unique=True),
             hnp.arrays(np.bool_, (seq_len,))]
    if batch is not None:
        forms.append(hnp.arrays(np.bool_, (batch, seq_len)))
    return st.one_of(forms)


# ------------------------------------------------------------------------------------------- edits

def features(d_sae: int, max_features: int = 3) -> st.SearchStrategy:
    """Feature ids of an SAE: one int, or an int32 array [n] of distinct ids (n <= max_features)."""
    many = hnp.arrays(np.int32, st.integers(1, min(max_features, d_sae)), elements=st.integers(0, d_sae - 1),
                      unique=True)
    return st.one_of(st.integers(0, d_sae - 1), many)


def clamp_values(feature, seq_len: int | None, batch: int | None) -> st.SearchStrategy:
    """Values for a Clamp of `feature`: a scalar, [n] for n features, [seq] (one feature) or
    [batch, seq] (one feature)."""
    value = small_floats(-2.0, 3.0)
    forms = [value]
    if np.ndim(feature):
        forms.append(hnp.arrays(np.float32, (len(feature),), elements=value))
    elif seq_len is not None:
        forms.append(hnp.arrays(np.float32, (seq_len,), elements=value))
        if batch is not None:
            forms.append(hnp.arrays(np.float32, (batch, seq_len), elements=value))
    return st.one_of(forms)


def edits(target, *, seq_len: int | None = None, batch: int | None = None, kinds=None, site: str | None = None,
          max_features: int = 3) -> st.SearchStrategy:
    """Single-site edits that fit a run of [batch, seq_len] tokens.

    target: an SAE (Clamp, Ablate or SetFeatures of its features, or Steer at its site) or a Model
    (Steer at a drawn SAE-readable site, or at `site`). kinds: a sequence among "clamp", "ablate",
    "set_features" and "steer" (default: every kind the target allows). Feature ids are valid for the
    SAE (one id or up to `max_features` distinct ids); clamp values are in [-2, 3]; SetFeatures draws
    a mask [d_sae] and a scalar or [d_sae] of values; Steer draws a direction of the site's width in
    [-1, 1] and a scale in [-2, 2]. Positions: see `positions` (only None when seq_len is None).
    """
    is_sae = isinstance(target, SAE)
    if not is_sae and not isinstance(target, Model):
        raise TypeError(f"edits draws edits for a jfig.SAE or a jfig.Model, got {type(target).__name__}")
    allowed = EDIT_KINDS if is_sae else ("steer",)
    kinds = tuple(allowed if kinds is None else ([kinds] if isinstance(kinds, str) else kinds))
    bad = [kd for kd in kinds if kd not in allowed]
    if bad or not kinds:
        raise ValueError(f"edit kinds {bad or kinds} are not available for a {type(target).__name__}; "
                         f"expected some of {allowed}")

    @st.composite
    def draw_edit(draw) -> Edit:
        kind = draw(st.sampled_from(kinds))
        where = draw(positions(seq_len, batch))
        if kind == "steer":
            if is_sae:
                at, shape = target.site, (target.hook_z_shape or (target.d_in,))
            else:
                at = site if site is not None else draw(sites(target))
                width = target.site_width(at)
                if width is None:
                    raise ValueError(f"site {at!r} has no known width to steer along")
                shape = (width,)
            direction = draw(hnp.arrays(np.float32, shape, elements=small_floats(-1.0, 1.0)))
            return Steer(at, direction, draw(small_floats(-2.0, 2.0)), positions=where)
        feature = draw(features(target.d_sae, max_features))
        if kind == "clamp":
            return Clamp(target, feature, draw(clamp_values(feature, seq_len, batch)), positions=where)
        if kind == "ablate":
            return Ablate(target, feature, positions=where)
        mask = draw(hnp.arrays(np.bool_, (target.d_sae,)))
        values = draw(st.one_of(small_floats(-2.0, 3.0),
                                hnp.arrays(np.float32, (target.d_sae,), elements=small_floats(-2.0, 3.0))))
        return SetFeatures(target, mask, values, positions=where)

    return draw_edit()


# ------------------------------------------------------------------------------------------ setups

class Setup(NamedTuple):
    """What most property tests start from: a model, an SAE at one of its sites, and tokens."""

    model: Model
    sae: Any
    tokens: np.ndarray


def setups(family=None, architecture=None, *, max_batch: int = 2, max_seq: int = 8, stages=SAE_STAGES,
           model_options: dict | None = None, **sae_options) -> st.SearchStrategy:
    """A `Setup(model, sae, tokens)`: a tiny model (`tiny_models(family, **model_options)`), an SAE of
    `architecture` at a drawn site among `stages` (`saes(site, width, architecture, **sae_options)`),
    and tokens [batch, seq] for it (`token_batches(vocab, max_batch, max_seq)`)."""
    @st.composite
    def draw_setup(draw):
        model = draw(tiny_models(family, **(model_options or {})))
        at = draw(sites(model, stages))
        sae = draw(saes(at, model.site_width(at), architecture, **sae_options))
        return Setup(model, sae, draw(token_batches(model.vocab_size, max_batch, max_seq)))

    return draw_setup()
