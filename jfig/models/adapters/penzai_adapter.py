"""penzai models as `apply(params, tokens, hook) -> logits` for `Model.from_function`.

Hooks are placed with penzai's selectors: each hooked layer is replaced (`pz.select(...).at_keypaths(...)
.apply(...)`) by a `HookPoint` that runs it and passes its output (or its input) through jfig's hook.
Activations are named arrays; at the hook they become plain arrays [batch, seq, rest...] (the axes
other than "batch" and "seq" in their own order) and are named again afterwards.

The model is called as `model(tokens)` with tokens a named array over ("batch", "seq"), which is how
penzai's `TransformerLM` is called (it derives the token positions itself). Its variables are unbound
and frozen (`pz.unbind_variables(model, freeze=True)`): the parameter pytree is the tuple of frozen
values, bound back into the model inside every run.

Default sites, for penzai's transformers (llama-like: Llama, Mistral, Gemma; GPT-NeoX), built with
separate blocks (not `use_layer_stack`):

  hook_embed                  input of the first TransformerBlock (after any embedding rescale)
  blocks.{l}.hook_resid_pre   input of block l
  blocks.{l}.hook_attn_out    output of the attention branch (after a post-attention norm, if any)
  blocks.{l}.hook_resid_mid   output of the attention residual (sequential blocks only)
  blocks.{l}.mlp.hook_post    input of the feed-forward's output projection (the neurons)
  blocks.{l}.hook_mlp_out     output of the feed-forward branch (after a post-feed-forward norm, if any)
  blocks.{l}.hook_resid_post  output of block l
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
from penzai import pz
from penzai.models.transformer.model_parts import TransformerBlock, TransformerFeedForward

from ...errors import JfigError, ShapeError, SiteError
from ...sites import block_site
from .wrapped import Wrapped, check_site_map, not_one_array, order_sites, probe

BATCH, SEQ = "batch", "seq"
INPUT, OUTPUT = "input", "output"


class Placement(NamedTuple):
    """Where a site is: the keypath of a layer in the model, and which side of it (INPUT or OUTPUT)."""

    keypath: tuple
    side: str


def penzai_parts(model, *, sites=None, site_order=None) -> Wrapped:
    """What `Model.from_function` needs to run a penzai model with hooks at `sites`.

    sites: None (the default sites of penzai's transformers, see the module docstring) or {jfig site name:
    spec}, a spec being a function `model -> pz.Selection` that selects exactly one layer, a keypath
    string as `jax.tree_util.keystr` writes it ('.body.sublayers[2]'), or `(spec, "input")` to hook
    the layer's input instead of its output.
    """
    if not isinstance(model, pz.nn.Layer):
        raise JfigError(f"from_penzai wraps a penzai layer (penzai.nn.Layer, such as a TransformerLM), got "
                        f"{type(model).__name__}")
    if sites is None:
        placements = default_placements(model)
    else:
        placements = {s: resolve(model, s, spec) for s, spec in check_site_map(sites, "from_penzai").items()}
    order = order_sites(placements, site_order)
    where = {s: f"the {p.side} of the layer at {jax.tree_util.keystr(p.keypath)}" for s, p in placements.items()}
    at: dict[tuple, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for s in order:
        p = placements[s]
        before, after = at.get(p.keypath, ((), ()))
        at[p.keypath] = (before + (s,), after) if p.side == INPUT else (before, after + (s,))
    unbound, values = pz.unbind_variables(model, freeze=True)

    def apply(params, tokens, hook):
        m = pz.bind_variables(unbound, params)
        for kp in sorted(at, key=len, reverse=True):      # innermost first: outer keypaths stay valid
            before, after = at[kp]
            m = pz.select(m).at_keypaths([kp]).apply(
                lambda layer, b=before, a=after, k=kp: HookPoint(layer, b, a, jax.tree_util.keystr(k), hook))
        return plain_logits(m(pz.nx.wrap(tokens).tag(BATCH, SEQ)))

    widths, vocab = probe(apply, values, order, where)
    return Wrapped(apply, values, order, widths, vocab)


@pz.pytree_dataclass
class HookPoint(pz.nn.Layer):
    """Runs `inner`, passing its input through the hook at the `before` sites and its output through
    the hook at the `after` sites (as plain arrays [batch, seq, ...])."""

    inner: Any
    before: tuple = dataclasses.field(metadata={"pytree_node": False})
    after: tuple = dataclasses.field(metadata={"pytree_node": False})
    where: str = dataclasses.field(metadata={"pytree_node": False})
    hook: Callable = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, argument, /, **side_inputs):
        if self.before:
            argument = hooked_value(self.hook, self.before, f"the input of the layer at {self.where}", argument)
        out = self.inner(argument, **side_inputs)
        if self.after:
            out = hooked_value(self.hook, self.after, f"the output of the layer at {self.where}", out)
        return out


def hooked_value(hook, names: tuple[str, ...], where: str, value):
    """`value` after the hook at each of `names`, in its own dtype: a named array is unwrapped to
    [batch, seq, rest...] for the hook and named again."""
    if isinstance(value, pz.nx.NamedArrayBase):
        axes = tuple(value.named_shape)
        if value.positional_shape or BATCH not in axes or SEQ not in axes:
            raise ShapeError(f"site {names[0]!r}: {where} is a named array with named axes {dict(value.named_shape)} "
                             f"and positional shape {value.positional_shape}; expected named axes "
                             f"{BATCH!r}, {SEQ!r} and the activation's own axes, and no positional axes")
        rest = tuple(a for a in axes if a not in (BATCH, SEQ))
        x = value.unwrap(BATCH, SEQ, *rest)
        for s in names:
            x = hook(s, x)
        return pz.nx.wrap(x.astype(value.dtype)).tag(BATCH, SEQ, *rest)
    if isinstance(value, jax.Array):
        dtype = value.dtype
        for s in names:
            value = hook(s, value)
        return value.astype(dtype)
    raise not_one_array(names[0], where, value)


def plain_logits(out):
    """The model's output as a plain array [batch, seq, vocab]."""
    if not isinstance(out, pz.nx.NamedArrayBase):
        return out
    rest = [a for a in out.named_shape if a not in (BATCH, SEQ)]
    if out.positional_shape or len(rest) != 1 or len(out.named_shape) != 3:
        raise ShapeError(f"the model returned a named array with named axes {dict(out.named_shape)} and positional "
                         f"shape {out.positional_shape}; expected logits with named axes {BATCH!r}, {SEQ!r} and "
                         f"one vocabulary axis")
    return out.unwrap(BATCH, SEQ, rest[0])


# ---------------------------------------------------------------- placements

def resolve(model, site: str, spec) -> Placement:
    """The placement a user's spec names (see `penzai_parts`)."""
    side = OUTPUT
    if isinstance(spec, tuple) and len(spec) == 2 and spec[1] in (INPUT, OUTPUT):
        spec, side = spec
    if isinstance(spec, str):
        text = spec if spec.startswith((".", "[")) else "." + spec
        selection = pz.select(model).at_subtrees_where(lambda kp, _: jax.tree_util.keystr(kp) == text,
                                                       with_keypath=True)
        what = f"keypath {spec!r}"
    elif callable(spec):
        selection = spec(model)
        what = "the selector"
        if not isinstance(selection, pz.Selection):
            raise SiteError(f"site {site!r}: the selector returned {type(selection).__name__}; expected a "
                            f"pz.Selection of one layer, e.g. lambda m: pz.select(m).at_instances_of(Block)"
                            f".pick_nth_selected(0)")
    else:
        raise SiteError(f"site {site!r}: expected a selector function model -> pz.Selection, a keypath string "
                        f"('.body.sublayers[2]') or (either, 'input'), got {type(spec).__name__}")
    found = selection.get_by_path()
    if len(found) != 1:
        listed = f" {[jax.tree_util.keystr(k) for k in list(found)[:8]]}" if found else ""
        raise SiteError(f"site {site!r}: {what} selects {len(found)} layers{listed}; it must select exactly one. "
                        f"The model's outer layers are {layer_paths(model)}")
    kp, layer = next(iter(found.items()))
    if not isinstance(layer, pz.nn.Layer):
        raise SiteError(f"site {site!r}: {what} selects a {type(layer).__name__} at {jax.tree_util.keystr(kp)}, "
                        f"not a layer (penzai.nn.Layer)")
    return Placement(tuple(kp), side)


def layer_paths(model, limit: int = 16) -> list[str]:
    """Keypaths of the model's layers, outermost first (breadth-first), for error messages."""
    found, level = [], [((), model)]
    while level and len(found) < limit:
        below = []
        for kp, layer in level:
            leaves = jax.tree_util.tree_flatten_with_path(
                layer, is_leaf=lambda x, root=layer: x is not root and isinstance(x, pz.nn.Layer))[0]
            below += [(kp + tuple(k), x) for k, x in leaves if isinstance(x, pz.nn.Layer)]
        found += [jax.tree_util.keystr(kp) for kp, _ in below]
        level = below
    return found[:limit] + (["..."] if len(found) > limit else [])


def relative(tree, accessor) -> tuple:
    return tuple(pz.select(tree).at(accessor).get_keypaths()[0])


def contains(tree, kind: type) -> bool:
    return pz.select(tree).at_instances_of(kind).count() > 0


def default_placements(model) -> dict[str, Placement]:
    """The TransformerLens sites of one of penzai's transformers (see the module docstring)."""
    if contains(model, pz.nn.LayerStack):
        raise SiteError("this model stacks its blocks in a pz.nn.LayerStack (use_layer_stack=True), which runs "
                        "every block as one scanned layer, so no block has a place of its own for a hook; build "
                        "it with use_layer_stack=False, or give sites= for layers outside the stack")
    blocks = pz.select(model).at_instances_of(TransformerBlock).get_by_path()
    if not blocks:
        raise SiteError(f"from_penzai found no TransformerBlock in this {type(model).__name__}, so it has no "
                        f"default sites; pass sites={{jfig site name: selector}} (see docs/adapters.md)")
    out: dict[str, Placement] = {}
    for layer, (kp, block) in enumerate(blocks.items()):
        kp = tuple(kp)

        def at(accessor, side=OUTPUT):
            return Placement(kp + relative(block, accessor), side)

        if layer == 0:
            out["hook_embed"] = Placement(kp, INPUT)
        out[block_site(layer, "hook_resid_pre")] = Placement(kp, INPUT)
        subs = list(block.sublayers)
        if (len(subs) == 2 and all(isinstance(s, pz.nn.Residual) for s in subs)
                and contains(subs[0], pz.nn.Attention) and contains(subs[1], TransformerFeedForward)):
            out[block_site(layer, "hook_attn_out")] = at(lambda b: b.sublayers[0].delta)
            out[block_site(layer, "hook_resid_mid")] = at(lambda b: b.sublayers[0])
            out[block_site(layer, "hook_mlp_out")] = at(lambda b: b.sublayers[1].delta)
        elif (len(subs) == 1 and isinstance(subs[0], pz.nn.BranchAndAddTogether) and len(subs[0].branches) == 3
              and isinstance(subs[0].branches[0], pz.nn.Identity) and contains(subs[0].branches[1], pz.nn.Attention)
              and contains(subs[0].branches[2], TransformerFeedForward)):
            out[block_site(layer, "hook_attn_out")] = at(lambda b: b.sublayers[0].branches[1])
            out[block_site(layer, "hook_mlp_out")] = at(lambda b: b.sublayers[0].branches[2])
        ffw = pz.select(block).at_instances_of(TransformerFeedForward).get_by_path()
        if len(ffw) == 1:
            fkp, f = next(iter(ffw.items()))
            if len(f.sublayers) >= 2:
                last = len(f.sublayers) - 1
                out[block_site(layer, "mlp.hook_post")] = Placement(
                    kp + tuple(fkp) + relative(f, lambda x: x.sublayers[last]), INPUT)
        out[block_site(layer, "hook_resid_post")] = Placement(kp, OUTPUT)
    return out
