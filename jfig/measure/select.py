"""Which inputs each source is measured on, its clamp levels, and chunk sizes.

Sources are measured on inputs where they are naturally active above the median of their
non-zero activations (docs/measure.md); α_lo / α_hi default to the 10th / 90th percentiles
of the non-zero activations (from an atlas when given, else from these inputs).
"""
from __future__ import annotations

import numpy as np


def nonzero_quantiles(vals: np.ndarray, qs=(0.1, 0.5, 0.9)) -> np.ndarray:
    """Quantiles of the non-zero entries of each column of vals [tokens, n]; NaN for dead columns."""
    out = np.full((vals.shape[1], len(qs)), np.nan, np.float32)
    for c in range(vals.shape[1]):  # host-side bookkeeping over sources, not the hot path
        nz = vals[:, c][vals[:, c] > 0]
        if nz.size:
            out[c] = np.quantile(nz, qs)
    return out


def choose_inputs(max_act: np.ndarray, threshold: np.ndarray, m: int, seed: int):
    """Per source, up to m input indices whose max activation reaches its threshold (the median).

    max_act [N, n_src]; threshold [n_src]. Returns idx [n_src, m] (padded with 0) and
    weight [n_src, m] (1 real, 0 padding). The choice is deterministic given the seed.
    """
    n, n_src = max_act.shape
    idx = np.zeros((n_src, m), np.int32)
    w = np.zeros((n_src, m), np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    for c in range(n_src):
        ok = order[(max_act[order, c] >= threshold[c]) & (max_act[order, c] > 0)][:m]
        idx[c, : len(ok)] = np.sort(ok)
        w[c, : len(ok)] = 1.0
    return idx, w


AUTO_INPUTS = 100        # inputs per source when the memory budget allows them (the definitions' M ≈ 100)


def bytes_per_source(config, method: str, m: int, seq: int, target_widths, sparse: bool = False) -> float:
    """Working set of one source's sweep in bytes: m inputs × seq positions × the float32 widths kept
    per position (suffix activations of `config`, 4096 when unknown, plus 2 per target SAE feature),
    for each run level the method makes (2 for finite differences, 3 for a jvp). Position-sparse
    (one position runs): one position's widths per level plus the input's cached keys/values."""
    width = (config.d_model * 10 + config.d_mlp * 3 + config.n_heads * seq) if config is not None else 4096
    width += 2 * sum(int(w) for w in target_widths)
    levels = 2 if method in ("clamp", "ablate", "mean_ablate") else 3
    if sparse and config is not None:
        kv = 2 * config.n_layers * seq * config.n_kv_heads * config.d_head
        return 4.0 * m * (levels * width + kv)
    return 4.0 * levels * m * seq * width


def affordable_inputs(config, method: str, seq: int, target_widths, memory_budget: float,
                      cap: int = AUTO_INPUTS) -> int:
    """The most inputs per source (at most `cap`, at least 1) whose sweep of one source fits
    `memory_budget` bytes."""
    one = bytes_per_source(config, method, 1, seq, target_widths)
    return int(max(1, min(cap, memory_budget // max(one, 1.0))))


def auto_chunk(bytes_per_source: float, budget_bytes: float, n_sources: int, n_devices: int = 1) -> int:
    """Largest chunk of sources (a multiple of n_devices) whose working set fits the budget."""
    c = max(1, int(budget_bytes // max(bytes_per_source, 1.0)))
    c = min(c, max(n_sources, 1))
    if n_devices > 1:
        c = max(n_devices, (c // n_devices) * n_devices)
    return c
