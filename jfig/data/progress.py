"""One progress helper for long jobs: a bar with rate and ETA on a terminal, log lines otherwise.

    with progress_bar(total=n, desc="measure blocks", unit="block", enabled=True) as bar:
        bar.update(1)

The bar writes to stderr through tqdm (rate and ETA included). When disabled, nothing is shown;
the job still logs its stages through `logging`.
"""
from __future__ import annotations

from typing import Iterable

from tqdm.auto import tqdm


def progress_bar(total: int | None = None, *, desc: str, unit: str = "it", enabled: bool = True,
                 initial: int = 0) -> tqdm:
    """A tqdm bar (a context manager with `.update(n)`); disabled bars cost nothing."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


def progress_iter(items: Iterable, *, total: int | None = None, desc: str, unit: str = "it",
                  enabled: bool = True) -> Iterable:
    """Iterate `items` with a progress bar when `enabled`."""
    return tqdm(items, total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)
