"""Adapters: flax (NNX, Linen) and penzai models as functions `Model.from_function` wraps.

Each adapter returns a `Wrapped` (apply function, parameter pytree, sites in forward order, site
widths, vocabulary size); `Model.from_flax` and `Model.from_penzai` hand it to `Model.from_function`.
"""
from .flax_adapter import flax_parts
from .penzai_adapter import penzai_parts
from .wrapped import Wrapped

__all__ = ["Wrapped", "flax_parts", "penzai_parts"]
