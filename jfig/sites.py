"""Site names (TransformerLens hook names), their forward order and shapes.

A site is where activations can be captured or edited. Names are TransformerLens's,
verbatim, because SAELens configs and Neuronpedia use them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import SiteError

# Sites inside a block, in forward order. The index is the site's *stage*.
BLOCK_SITES = (
    "hook_resid_pre",     # [batch, seq, d_model]
    "attn.hook_q",        # [batch, seq, n_heads, d_head]
    "attn.hook_k",        # [batch, seq, n_kv_heads, d_head]
    "attn.hook_v",        # [batch, seq, n_kv_heads, d_head]
    "attn.hook_pattern",  # [batch, n_heads, query, key]
    "attn.hook_z",        # [batch, seq, n_heads, d_head]
    "hook_attn_out",      # [batch, seq, d_model]
    "hook_resid_mid",     # [batch, seq, d_model]
    "mlp.hook_post",      # [batch, seq, d_mlp]
    "hook_mlp_out",       # [batch, seq, d_model]
    "hook_resid_post",    # [batch, seq, d_model]
)
STAGE = {name: i for i, name in enumerate(BLOCK_SITES)}
GLOBAL_SITES = ("hook_embed", "hook_pos_embed")  # [batch, seq, d_model]

# Sites a suffix run can start from, and which residual stream it also needs.
RESIDUAL_STAGES = frozenset({STAGE["hook_resid_pre"], STAGE["hook_resid_mid"], STAGE["hook_resid_post"]})
NEEDS_RESID_PRE = frozenset({STAGE["attn.hook_z"], STAGE["hook_attn_out"]})
NEEDS_RESID_MID = frozenset({STAGE["mlp.hook_post"], STAGE["hook_mlp_out"]})

# Sites whose activations live in the residual basis (d_model wide).
RESIDUAL_BASIS = frozenset({"hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"})

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True, order=True)
class Site:
    """A parsed site: `layer` (-1 for sites before the first block) and `stage` in forward order."""

    layer: int
    stage: int
    name: str

    @property
    def local(self) -> str:
        """The name within its block, e.g. 'hook_resid_post'."""
        return self.name.split(".", 2)[2] if self.layer >= 0 else self.name


def parse_site(name: str) -> Site:
    """Parse a TransformerLens hook name into (layer, stage); raise SiteError if malformed."""
    if not isinstance(name, str):
        raise SiteError(f"site names are strings such as 'blocks.3.hook_resid_post', got {type(name).__name__}")
    if name in GLOBAL_SITES:
        return Site(-1, GLOBAL_SITES.index(name), name)
    m = _BLOCK_RE.match(name)
    if m is None or m.group(2) not in STAGE:
        raise SiteError(
            f"unknown site {name!r}: expected one of {', '.join(GLOBAL_SITES)} or "
            f"'blocks.{{layer}}.{{name}}' with name in {', '.join(BLOCK_SITES)}"
        )
    return Site(int(m.group(1)), STAGE[m.group(2)], name)


def block_site(layer: int, local: str) -> str:
    return f"blocks.{layer}.{local}"


def model_sites(n_layers: int, *, pos_embed: bool = False) -> tuple[str, ...]:
    """All sites of an n_layers transformer, in forward order."""
    head = ("hook_embed", "hook_pos_embed") if pos_embed else ("hook_embed",)
    return head + tuple(block_site(l, s) for l in range(n_layers) for s in BLOCK_SITES)


def site_key(name: str) -> tuple[int, int]:
    """(layer, stage): compares sites in forward order. Names that are not TransformerLens hook names
    (models wrapped with `Model.from_function`) compare equal to each other and after all others."""
    try:
        s = parse_site(name)
    except SiteError:
        return (10**9, 0)
    return (s.layer, s.stage)


def site_layer(name: str, sites: tuple[str, ...] = ()) -> int:
    """The layer of a site: from its TransformerLens name, else its position in `sites` (forward order)."""
    try:
        return parse_site(name).layer
    except SiteError:
        if name in sites:
            return sites.index(name)
        raise


def sort_sites(names) -> tuple[str, ...]:
    """Sites sorted into forward order (TransformerLens names; others after them, by name)."""
    return tuple(sorted(set(names), key=lambda n: (*site_key(n), n)))
