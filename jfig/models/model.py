"""Model: a transformer (or any JAX function with hooks) as a pure function over params.

`run` captures and edits activations at named sites; `prefix` + `run_suffix` split a run
at a site so many edited suffixes can share one prefix (the measurement engine's cache).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from treescope import repr_lib

from ..edits import Edit
from ..errors import JfigError, ShapeError, SiteError
from ..sites import NEEDS_RESID_MID, NEEDS_RESID_PRE, RESIDUAL_STAGES, block_site, model_sites, parse_site
from .adapters import flax_parts, penzai_parts
from .config import ModelConfig
from .forward import KVCache, StopRun, empty_cache, forward
from .generate import generate
from .hooks import EditHook
from .validation import check_edits, check_saes, check_tokens



class RunOutput(NamedTuple):
    logits: jax.Array | None           # [batch, seq, vocab], None when the run stopped early
    cache: dict[str, jax.Array]        # site -> activations (after edits at that site)


class Prefix(NamedTuple):
    """Activations at `site` and the residual a suffix run from there also needs; with `cache`, the
    clean keys and values of every layer at every position (a position-sparse suffix attends to them)."""

    site: str
    acts: jax.Array                    # activations at `site`
    resid: jax.Array | None            # resid_pre / resid_mid / embed when `site` needs it
    cache: KVCache | None = None       # k, v [n_layers, batch, seq, n_kv_heads, d_head]


def resid_site_for(site: str) -> str | None:
    """The residual a suffix run from `site` needs besides the site's own activations."""
    if site == "hook_pos_embed":
        return "hook_embed"
    s = parse_site(site)
    if s.layer < 0 or s.stage in RESIDUAL_STAGES:
        return None
    if s.stage in NEEDS_RESID_PRE:
        return block_site(s.layer, "hook_resid_pre")
    if s.stage in NEEDS_RESID_MID:
        return block_site(s.layer, "hook_resid_mid")
    raise SiteError(f"a suffix run cannot start at {site!r}: start at a residual, hook_attn_out, "
                    f"attn.hook_z, mlp.hook_post or hook_mlp_out site")


@partial(jax.jit, static_argnames=("cfg", "apply_fn", "capture", "stop", "start", "want_logits", "freeze"))
def _run(params, tokens, edits, start_acts, start_resid, *, cfg, apply_fn, capture, stop, start, want_logits, freeze,
         positions=None, cache=None):
    hook = EditHook(edits, capture, stop)
    out = None
    try:
        if apply_fn is not None:
            out = apply_fn(params, tokens, hook)
        else:
            out = forward(cfg, params, tokens=tokens, hook=hook, stop=stop, start=start, start_acts=start_acts,
                          start_resid=start_resid, logits=want_logits, freeze=freeze, positions=positions,
                          cache=cache)
            out = out[0] if cache is not None else out
    except StopRun:
        out = None
    missing = [s for s in capture if s not in hook.cache]
    if missing:
        raise SiteError(f"the run never reached site(s) {missing}: the model function did not call hook() there"
                        + (f" before stopping at {stop!r}" if stop else ""))
    return RunOutput(logits=out if want_logits else None, cache=hook.cache)


@partial(jax.jit, static_argnames=("cfg", "capture"))
def _cached_prefix(params, tokens, edits, *, cfg, capture):
    """A full clean run (no logits) that captures `capture` and fills a key/value cache of every layer."""
    hook = EditHook(edits, capture, None)
    _, kv = forward(cfg, params, tokens=tokens, hook=hook, logits=False,
                    cache=empty_cache(cfg, tokens.shape[0], tokens.shape[1]))
    return dict(hook.cache), kv


class Model(eqx.Module):
    """A language model as a pure function of its parameter pytree.

    Attributes: `params` (pytree), `config` (frozen ModelConfig, None for wrapped
    functions), `tokenizer` (or None), `sites` (site names in forward order).
    """

    params: Any
    config: ModelConfig | None = eqx.field(static=True)
    tokenizer: Any = eqx.field(static=True, default=None)
    sites: tuple[str, ...] = eqx.field(static=True, default=())
    apply_fn: Callable | None = eqx.field(static=True, default=None)
    site_widths: tuple = eqx.field(static=True, default=())
    n_vocab: int | None = eqx.field(static=True, default=None)

    @classmethod
    def from_config(cls, config: ModelConfig, params, tokenizer=None) -> "Model":
        sites = model_sites(config.n_layers, pos_embed=config.positional == "learned")
        return cls(params=params, config=config, tokenizer=tokenizer, sites=sites, apply_fn=None,
                   site_widths=tuple((s, _builtin_width(config, s)) for s in sites))

    @classmethod
    def from_function(cls, apply: Callable, params, *, sites, tokenizer=None, vocab_size: int | None = None,
                      site_widths: dict | None = None) -> "Model":
        """Wrap any JAX model: `apply(params, tokens, hook) -> logits`, calling `hook(site, x) -> x`
        at every site in `sites` (in forward order) and using what it returns.

        Edits and capture work as for built-in models. Prefix caching (`prefix` /
        `run_suffix`) is not available: jfig cannot restart an opaque function mid-way.
        `site_widths` (site -> last-axis width) lets jfig check SAE/site mismatches up front.
        """
        if not sites:
            raise SiteError("from_function needs the tuple of site names the function calls hook() at")
        return cls(params=params, config=None, tokenizer=tokenizer, sites=tuple(sites), apply_fn=apply,
                   site_widths=tuple(sorted((site_widths or {}).items())), n_vocab=vocab_size)

    @classmethod
    def from_flax(cls, module, params_or_state=None, *, sites, site_order=None, tokenizer=None,
                  call_kwargs=None) -> "Model":
        """Wrap a flax NNX or Linen module `module(tokens) -> logits [batch, seq, vocab]`.

        sites: {jfig site name: submodule path or predicate (path, module) -> bool}; the hook replaces
        that submodule's `__call__` output, e.g. {"blocks.3.hook_resid_post": "layers.3"} (NNX) or
        "layers_3" (Linen). params_or_state: NNX, None (the module's own state) or an nnx.State like
        it; Linen, the variables from `module.init`. Names that are not TransformerLens names need
        `site_order` (forward order). Runs as a `from_function` model (no prefix / run_suffix /
        generate). See docs/adapters.md.
        """
        w = flax_parts(module, params_or_state, sites=sites, site_order=site_order, call_kwargs=call_kwargs)
        return cls.from_function(w.apply, w.params, sites=w.sites, tokenizer=tokenizer, vocab_size=w.vocab_size,
                                 site_widths=w.site_widths)

    @classmethod
    def from_penzai(cls, model, *, sites=None, site_order=None, tokenizer=None) -> "Model":
        """Wrap a penzai model called as `model(tokens)` on named tokens ("batch", "seq"), such as a
        `TransformerLM`.

        sites: None (for penzai's transformers: hook_embed and each block's resid_pre, attn_out,
        resid_mid, mlp.hook_post, mlp_out, resid_post) or {jfig site name: selector function
        model -> pz.Selection of one layer, or a keypath string; `(spec, "input")` hooks the layer's
        input}. Runs as a `from_function` model. See docs/adapters.md.
        """
        w = penzai_parts(model, sites=sites, site_order=site_order)
        return cls.from_function(w.apply, w.params, sites=w.sites, tokenizer=tokenizer, vocab_size=w.vocab_size,
                                 site_widths=w.site_widths)

    def __treescope_repr__(self, path, subtree_renderer):
        """Notebook display (treescope): what the model is and where it can be edited, then its parameters."""
        cfg = self.config
        head = ({"name": cfg.name, "family": cfg.family, "n_layers": cfg.n_layers, "d_model": cfg.d_model,
                 "n_heads": cfg.n_heads, "vocab_size": cfg.vocab_size} if cfg is not None
                else {"wraps": getattr(self.apply_fn, "__qualname__", type(self.apply_fn).__name__),
                      "vocab_size": self.n_vocab})
        sites = (f"{len(self.sites)} sites, {self.sites[0]} ... {self.sites[-1]}" if len(self.sites) > 2
                 else list(self.sites))
        tokenizer = None if self.tokenizer is None else type(self.tokenizer).__name__
        return repr_lib.render_object_constructor(
            type(self), {**head, "sites": sites, "tokenizer": tokenizer, "params": self.params}, path=None,
            subtree_renderer=subtree_renderer)

    # ---------------------------------------------------------------- checks
    @property
    def vocab_size(self) -> int | None:
        return self.config.vocab_size if self.config is not None else self.n_vocab

    def check_site(self, site: str) -> str:
        if not isinstance(site, str) or site not in self.sites:
            hint = f"sites run from {self.sites[0]!r} to {self.sites[-1]!r}" if self.sites else "no sites"
            raise SiteError(f"unknown site {site!r}: this model has {len(self.sites)} sites ({hint})")
        return site

    def site_width(self, site: str) -> int | None:
        return dict(self.site_widths).get(site)

    def check_tokens(self, tokens) -> jax.Array:
        """tokens as int32 [batch, seq] (a [seq] array gets a batch axis); clear errors otherwise."""
        max_len = None
        if self.config is not None and self.config.positional == "learned":
            max_len = self.config.max_seq_len
        return check_tokens(tokens, self.vocab_size, max_len=max_len)

    def check_saes(self, saes) -> dict:
        """{site: SAE} in forward order; each SAE must read a site of this model and be as wide as it."""
        return check_saes(self, saes)

    def _check_edits(self, edits, batch: int, seq: int | None) -> tuple[Edit, ...]:
        return check_edits(self, edits, batch, seq)

    def _check_capture(self, capture) -> tuple[str, ...]:
        if capture is None:
            return ()
        if isinstance(capture, str):
            capture = (capture,)
        return tuple(dict.fromkeys(self.check_site(s) for s in capture))

    # ---------------------------------------------------------------- runs
    def run(self, tokens, *, edits=(), capture=(), stop_at: str | None = None, logits: bool = True,
            freeze: bool = False) -> RunOutput:
        """Run on tokens [batch, seq] (or [seq]); returns RunOutput(logits, cache).

        edits: Edit objects (or Compose); capture: site names to return in `cache`;
        stop_at: stop after this site (no logits); freeze: stop gradients through norm
        scales and attention patterns (direct effects).
        """
        tokens = self.check_tokens(tokens)
        flat = self._check_edits(edits, *tokens.shape)
        capture = self._check_capture(capture)
        if stop_at is not None:
            self.check_site(stop_at)
        return _run(self.params, tokens, flat, None, None, cfg=self.config, apply_fn=self.apply_fn,
                    capture=capture, stop=stop_at, start=None, want_logits=logits and stop_at is None,
                    freeze=freeze)

    def prefix(self, tokens, site: str, *, edits=(), cache: bool = False) -> Prefix:
        """Run up to `site` and return what a suffix run from there needs. With `cache=True` the run
        goes through every layer and also returns the clean keys/values of every position (a suffix
        from one position on then only recomputes that position and later ones)."""
        self._require_builtin("prefix")
        self.check_site(site)
        need = resid_site_for(site)
        cap = (site,) + ((need,) if need else ())
        if not cache:
            out = self.run(tokens, edits=edits, capture=cap, stop_at=site, logits=False)
            return Prefix(site, out.cache[site], out.cache.get(need) if need else None)
        tokens = self.check_tokens(tokens)
        flat = self._check_edits(edits, *tokens.shape)
        acts, kv = _cached_prefix(self.params, tokens, flat, cfg=self.config, capture=cap)
        return Prefix(site, acts[site], acts.get(need) if need else None, kv)

    def clean_prefixes(self, tokens, sites) -> tuple[dict[str, Prefix], KVCache]:
        """One clean run through every layer: {site: Prefix} for each site (its activations and the
        residual a suffix from there needs; no cache in them) and the keys/values of every layer and
        position, shared by all of them (a position-sparse suffix from any site reads it)."""
        self._require_builtin("clean_prefixes")
        sites = tuple(self.check_site(s) for s in sites)
        need = {s: resid_site_for(s) for s in sites}
        cap = tuple(dict.fromkeys([*sites, *(n for n in need.values() if n)]))
        tokens = self.check_tokens(tokens)
        acts, kv = _cached_prefix(self.params, tokens, (), cfg=self.config, capture=cap)
        return {s: Prefix(s, acts[s], acts[need[s]] if need[s] else None) for s in sites}, kv

    def run_suffix(self, prefix: Prefix, *, edits=(), capture=(), stop_at: str | None = None,
                   logits: bool = False, freeze: bool = False, positions=None) -> RunOutput:
        """Continue a run from `prefix.site` with its activations; edits at that site apply first.

        Equals the matching part of a full run. No unembedding unless `logits=True`.
        Position-sparse: with `prefix.cache` (the clean keys/values of every position) and
        `positions` (int [batch, s], the absolute positions of the s rows of `prefix.acts`), only
        those positions run; they attend to the cached keys/values of earlier positions. With
        causal attention this equals the full suffix at those positions when every position the
        edits change is among them.
        """
        self._require_builtin("run_suffix")
        start = self.check_site(prefix.site)
        flat = self._check_edits(edits, *jnp.shape(prefix.acts)[:2])
        capture = self._check_capture(capture)
        order = {s: i for i, s in enumerate(self.sites)}
        for s in list(capture) + [e.site for e in flat] + ([stop_at] if stop_at else []):
            self.check_site(s)
            if order[s] < order[start]:
                raise SiteError(f"site {s!r} comes before the suffix start {start!r}")
        if resid_site_for(start) is not None and prefix.resid is None:
            raise ShapeError(f"a suffix run from {start!r} also needs the residual {resid_site_for(start)!r}")
        if (positions is None) != (prefix.cache is None):
            raise ShapeError("a position-sparse suffix needs both prefix.cache (from model.prefix(..., cache=True)) "
                             "and the positions of its rows")
        return _run(self.params, None, flat, jnp.asarray(prefix.acts), prefix.resid, cfg=self.config,
                    apply_fn=None, capture=capture, stop=stop_at, start=start,
                    want_logits=logits and stop_at is None, freeze=freeze,
                    positions=None if positions is None else jnp.asarray(positions, jnp.int32), cache=prefix.cache)

    def generate(self, tokens, max_new_tokens: int, *, edits=(), temperature: float = 0.0, top_k: int | None = None,
                 seed: int = 0) -> np.ndarray:
        """Prompts [batch, seq] (or [seq], or a list of token lists of any lengths) continued by
        `max_new_tokens` tokens: int32 [batch, longest prompt + max_new_tokens].

        Edits apply at every step (prompt and new tokens; `positions` are absolute positions).
        temperature=0 is greedy; top_k keeps the k likeliest tokens. Ragged prompts are
        right-aligned, preceded by -1. Built-in models only; see jfig.models.generate.
        """
        if self.apply_fn is not None:
            raise JfigError("generate needs a built-in model: a model wrapped with Model.from_function is an opaque "
                            "function that jfig cannot run position by position on a key/value cache; re-run "
                            "model.run on the whole sequence for each new token instead")
        # positions are absolute in each row's growing sequence (a mask edits nothing past its length),
        # so only sites, widths, feature indices and values are checked here, not position ranges
        rows = [tokens] if np.ndim(tokens[0]) == 0 else tokens
        flat = self._check_edits(edits, len(rows), None)
        return generate(self, tokens, max_new_tokens, edits=flat, temperature=temperature, top_k=top_k,
                        seed=seed).tokens

    def _require_builtin(self, what: str):
        if self.apply_fn is not None:
            raise JfigError(f"{what} needs a built-in model: a model wrapped with Model.from_function "
                            f"cannot be restarted mid-way; use run(..., edits=...) instead")


def _builtin_width(cfg: ModelConfig, site: str) -> int | None:
    """Width an SAE at `site` must have (heads flattened for q/k/v/z); None for patterns."""
    local = parse_site(site).local
    if local == "mlp.hook_post":
        return cfg.d_mlp
    if local in ("attn.hook_q", "attn.hook_z"):
        return cfg.n_heads * cfg.d_head      # SAEs on these sites see the heads flattened
    if local in ("attn.hook_k", "attn.hook_v"):
        return cfg.n_kv_heads * cfg.d_head
    if local == "attn.hook_pattern":
        return None
    return cfg.d_model
