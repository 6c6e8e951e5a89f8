"""Integration: whether features are combined nonlinearly, not merely co-active. Neural factorization
machines read (2x2 designs by intervention and by stimulus), and model neurons best explained by
feature products, set against the graph's gating hyperedges."""

__all__: list[str] = []
