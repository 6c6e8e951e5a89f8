"""Options of a graph build."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import JfigError
from ..measure import CLAMP_AT, GATING_METHODS, IMPORTANCE_KINDS, METHODS, POSITION_MODES, READS
from ..stats import CORRECTIONS


@dataclass(frozen=True)
class BuildOptions:
    """Every option of a graph build (all have defaults sized for a small CPU run)."""

    seq_len: int = 64
    max_sequences: int = 256            # corpus sequences used (atlas, candidates, measurement)
    window: int = 5                     # layer window for pairs
    position_window: int = 0
    top_k: int = 32                     # important features per site kept as candidates
    importance: str = "loss"            # "loss" (ablation), "kl", "attribution" (first-order, fast) or "rate"
    importance_pool: int | None = None
    importance_sequences: int | None = None   # sequences used for importance (None: all)
    min_coact: float = 0.01
    keep_low_coact: bool = True
    min_alignment: float | None = None
    max_sources: int | None = None      # cap on measured source features (most candidate pairs first)
    method: str = "clamp"
    positions: str = "same"
    clamp_at: str = "single"            # "single" (the source's strongest position) or "all_active"
    read: str = "post"                  # targets read after their activation ("post") or before it ("pre")
    inputs_per_source: int = 32
    block_size: int = 8                 # source features per resumable block
    null_every: int = 2                 # run the random-direction control on every n-th block
    alpha: float = 0.01
    correction: str = "bonferroni"
    tau_quantile: float = 0.99
    pvalue: str = "normal"              # "normal" (sign-flip, normal approx.) or "permutation" (Monte-Carlo)
    n_perm: int = 1000
    gating: bool = True
    gating_max_targets: int = 16        # targets with >= 2 significant inputs tested for gating
    gating_max_pairs: int = 15          # (i, k) pairs tested per gating target
    gating_method: str = "factorial"
    batch_size: int = 16
    memory_budget: float = 2e9
    seed: int = 0

    def __post_init__(self):
        choices = {"method": METHODS, "positions": POSITION_MODES, "clamp_at": CLAMP_AT, "read": READS,
                   "correction": CORRECTIONS,
                   "pvalue": ("normal", "permutation"), "gating_method": ("mixed", "factorial"),
                   "importance": IMPORTANCE_KINDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise JfigError(f"build option {name}={getattr(self, name)!r}; expected one of {list(allowed)}")
        for name in ("max_sequences", "inputs_per_source", "block_size", "seq_len", "top_k", "batch_size"):
            if getattr(self, name) < 1:
                raise JfigError(f"build option {name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict) -> "BuildOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise JfigError(f"unknown build option(s) {unknown}; known options: {sorted(names)}")
        return cls(**d)
