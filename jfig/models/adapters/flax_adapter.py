"""flax modules (NNX and Linen) as `apply(params, tokens, hook) -> logits` for `Model.from_function`.

A site is the output of one submodule's `__call__`: the hook replaces it. `sites` maps jfig site
names to submodules, by path or by predicate:

- a path: NNX paths are the attribute / index keys from the root, as `nnx.iter_modules` gives
  them (`"layers.3"`, `"layers[3].mlp"` or `("layers", 3, "mlp")`); Linen paths are the scope
  names (`"layers_3"`, `"Block_0.Dense_1"`, `"Block_0/Dense_1"` or a tuple).
- a predicate `(path, module) -> bool` that holds for exactly one submodule.

Linen: the call goes through `flax.linen.intercept_methods`, flax's method interception, keyed on
the intercepted module's scope path. NNX has no interceptor, so it is done as `nnx.capture`
records method outputs: the state is split from the graph (`nnx.split`) and merged back inside
every run (`nnx.merge`), and for the length of one call the `__call__` of each hooked submodule's
class is wrapped; the wrapper acts only on the hooked instances of that exact class (found by
identity in the merged copy) and the classes are restored afterwards, also when the run stops
early. The module is called as `module(tokens, **call_kwargs)` (Linen:
`module.apply(variables, tokens, **call_kwargs)`).
"""
from __future__ import annotations

import contextlib
import functools
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from ...errors import JfigError, SiteError
from .wrapped import Wrapped, check_site_map, not_one_array, order_sites, probe

_MISSING = object()


def flax_parts(module, params_or_state=None, *, sites, site_order=None,
               call_kwargs: Mapping[str, Any] | None = None) -> Wrapped:
    """What `Model.from_function` needs to run a flax NNX or Linen module with hooks at `sites`.

    NNX: `params_or_state` is None (the module's own state) or an `nnx.State` of the same structure
    (`nnx.state(module)` of a trained copy). Linen: the variables (`module.init(...)`'s
    `{"params": ...}`, plus any other collections), or the bare params collection.
    """
    sites = check_site_map(sites, "from_flax")
    kwargs = dict(call_kwargs or {})
    if isinstance(module, nnx.Module):
        return nnx_parts(module, params_or_state, sites, site_order, kwargs)
    if isinstance(module, nn.Module):
        return linen_parts(module, params_or_state, sites, site_order, kwargs)
    raise JfigError(f"from_flax wraps a flax.nnx.Module or a flax.linen.Module, got {type(module).__name__}")


# ---------------------------------------------------------------- paths

def path_text(path: tuple) -> str:
    """A module path as text: its keys joined by dots ('' for the root)."""
    return ".".join(str(k) for k in path)


def normalize_path(spec) -> str:
    """A user's path (text with '.', '/' or [i] separators, or a tuple of keys) as `path_text` gives it."""
    if isinstance(spec, (tuple, list)):
        return path_text(tuple(spec))
    text = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", spec.replace("/", "."))
    return ".".join(part for part in text.split(".") if part)


def resolve(sites: dict, modules: dict[tuple, Any], kind: str) -> dict[str, tuple]:
    """{site: path} from each site's spec (a path or a predicate) against `modules` {path: module}."""
    by_text = {path_text(p): p for p in modules if p != ()}
    out = {}
    for site, spec in sites.items():
        if callable(spec) and not isinstance(spec, (str, tuple, list)):
            hits = [p for p, m in modules.items() if p != () and spec(p, m)]
            if len(hits) != 1:
                raise SiteError(f"site {site!r}: the predicate holds for {len(hits)} submodules "
                                f"{[path_text(p) for p in hits][:8]}; it must select exactly one")
            out[site] = hits[0]
        elif isinstance(spec, (str, tuple, list)):
            text = normalize_path(spec)
            if text not in by_text:
                raise SiteError(f"site {site!r}: this {kind} module has no submodule at path {spec!r}; expected one of "
                                f"{_listing(by_text)}")
            out[site] = by_text[text]
        else:
            raise SiteError(f"site {site!r}: expected a submodule path (str or tuple) or a predicate "
                            f"(path, module) -> bool, got {type(spec).__name__}")
    return out


def _listing(by_text: dict) -> str:
    names = sorted(by_text)
    return repr(names) if len(names) <= 24 else repr(names[:24])[:-1] + f", ... ({len(names)} in all)]"


def sites_by_path(paths: dict[str, tuple], order: tuple[str, ...]) -> dict[tuple, tuple[str, ...]]:
    """{path: the sites at that submodule's output, in forward order}."""
    out: dict[tuple, tuple[str, ...]] = {}
    for s in order:
        out[paths[s]] = out.get(paths[s], ()) + (s,)
    return out


def hooked_output(hook, names: tuple[str, ...], where: str, out):
    """The submodule's output after the hook at each of `names` (in its own dtype); it must be one array."""
    if not isinstance(out, jax.Array):
        raise not_one_array(names[0], where, out)
    dtype = out.dtype
    for s in names:
        out = hook(s, out)
    return out.astype(dtype)


# ---------------------------------------------------------------- NNX

def nnx_parts(module, state, sites: dict, site_order, call_kwargs: dict) -> Wrapped:
    graphdef, own = nnx.split(module)
    if state is None:
        state = own
    elif jax.tree_util.tree_structure(state) != jax.tree_util.tree_structure(own):
        raise JfigError("the state given to from_flax does not match the module: expected an nnx.State with the "
                        "structure of nnx.state(module) (every variable of the module, as nnx.split returns it)")
    modules = dict(nnx.iter_modules(module))
    paths = resolve(sites, modules, "NNX")
    order = order_sites(sites, site_order)
    at = sites_by_path(paths, order)

    def apply(params, tokens, hook):
        merged = nnx.merge(graphdef, params)
        found = dict(nnx.iter_modules(merged))
        hooked = {id(found[p]): (found[p], names, f"submodule {path_text(p)!r}") for p, names in at.items()}
        with wrapped_calls(hooked, hook):
            return merged(tokens, **call_kwargs)

    widths, vocab = probe(apply, state, order, {s: f"submodule {path_text(paths[s])!r}" for s in order})
    return Wrapped(apply, state, order, widths, vocab)


@contextlib.contextmanager
def wrapped_calls(hooked: dict[int, tuple], hook):
    """While open, `__call__` of each hooked instance's class passes that instance's output through the
    hook; other instances (and subclasses reaching it through super()) are untouched."""
    classes = list(dict.fromkeys(type(obj) for obj, _, _ in hooked.values()))
    saved = [(cls, cls.__dict__.get("__call__", _MISSING)) for cls in classes]
    try:
        for cls in classes:
            cls.__call__ = hooked_call(cls, cls.__call__, hooked, hook)
        yield
    finally:
        for cls, original in reversed(saved):
            if original is _MISSING:
                if "__call__" in cls.__dict__:
                    delattr(cls, "__call__")
            else:
                cls.__call__ = original


def hooked_call(cls: type, call: Callable, hooked: dict[int, tuple], hook) -> Callable:
    @functools.wraps(call)
    def call_with_hook(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        entry = hooked.get(id(self))
        if entry is None or entry[0] is not self or type(self) is not cls:
            return out
        return hooked_output(hook, entry[1], entry[2], out)

    return call_with_hook


# ---------------------------------------------------------------- Linen

def linen_parts(module, variables, sites: dict, site_order, call_kwargs: dict) -> Wrapped:
    if variables is None:
        raise JfigError("a flax.linen module holds no weights: pass its variables, from_flax(module, "
                        "module.init(key, tokens), sites=...)")
    if not isinstance(variables, Mapping):
        raise JfigError(f"Linen variables must be a dict such as module.init(...) returns, got "
                        f"{type(variables).__name__}")
    if "params" not in variables:
        variables = {"params": variables}
    modules = called_modules(module, variables, call_kwargs)
    paths = resolve(sites, modules, "Linen")
    order = order_sites(sites, site_order)
    at = sites_by_path(paths, order)

    def interceptor(hook):
        def intercept(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name != "__call__":
                return out
            names = at.get(tuple(context.module.path))
            if names is None:
                return out
            return hooked_output(hook, names, f"submodule {path_text(context.module.path)!r}", out)
        return intercept

    def apply(params, tokens, hook):
        with nn.intercept_methods(interceptor(hook)):
            return module.apply(params, tokens, **call_kwargs)

    widths, vocab = probe(apply, variables, order, {s: f"submodule {path_text(paths[s])!r}" for s in order})
    return Wrapped(apply, variables, order, widths, vocab)


def called_modules(module, variables, call_kwargs: dict) -> dict[tuple, Any]:
    """{scope path: module} of every submodule whose __call__ runs in one (abstract) forward pass."""
    seen: dict[tuple, Any] = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            seen.setdefault(tuple(context.module.path), context.module)
        return next_fun(*args, **kwargs)

    def run(v, tokens):
        with nn.intercept_methods(record):
            return module.apply(v, tokens, **call_kwargs)

    jax.eval_shape(run, variables, jax.ShapeDtypeStruct((1, 2), jnp.int32))
    return seen
