"""The layered layout: sites are columns in forward order; within a column, features are ordered by
the barycentre of their neighbours in other columns (a few sweeps of the classic Sugiyama heuristic),
so that edges run mostly level rather than crossing the whole column."""
from __future__ import annotations

import numpy as np


def barycentre_order(column: np.ndarray, source: np.ndarray, target: np.ndarray, *, sweeps: int = 3) -> np.ndarray:
    """y in (0, 1) of every node. column [N] (the node's column, 0..C-1), source/target [E] node
    indices of the first-order edges. Each sweep visits the columns forward then backward and sorts a
    column's nodes by the mean position of their neighbours in columns already visited; nodes with no
    such neighbour keep their place. The first order is by node index (feature id within a column)."""
    column = np.asarray(column, np.int64)
    n = len(column)
    y = np.zeros(n)
    members = [np.flatnonzero(column == c) for c in range(int(column.max(initial=-1)) + 1)]
    for idx in members:
        y[idx] = (np.arange(len(idx)) + 0.5) / max(len(idx), 1)
    if not len(source) or not n:
        return y
    a = np.concatenate([source, target]).astype(np.int64)      # each edge seen from both ends
    b = np.concatenate([target, source]).astype(np.int64)
    for _ in range(sweeps):
        for forward in (True, False):
            visited = np.zeros(len(members), bool)
            for c in (range(len(members)) if forward else range(len(members) - 1, -1, -1)):
                idx = members[c]
                if not len(idx):
                    visited[c] = True
                    continue
                use = visited[column[b]] & (column[a] == c)
                total = np.bincount(a[use], weights=y[b[use]], minlength=n)[idx]
                count = np.bincount(a[use], minlength=n)[idx]
                key = np.where(count > 0, total / np.maximum(count, 1), y[idx])
                order = idx[np.lexsort((y[idx], key))]
                y[order] = (np.arange(len(idx)) + 0.5) / len(idx)
                visited[c] = True
    return y
