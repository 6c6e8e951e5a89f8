"""The pruning report (pairs before and after each filter) and the selected candidate pairs."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa


@dataclass
class Report:
    """Pairs before and after each filter; `str(report)` is a table."""

    rows: list[dict] = field(default_factory=list)  # step, before, after, note

    def add(self, step: str, before: int, after: int, note: str = "") -> None:
        self.rows.append(dict(step=step, before=int(before), after=int(after), note=note))

    def as_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=pa.schema(
            [("step", pa.string()), ("before", pa.int64()), ("after", pa.int64()), ("note", pa.string())]))

    def __str__(self) -> str:
        w = max([len(r["step"]) for r in self.rows] + [4])
        lines = [f"{'step':{w}s} {'before':>14s} {'after':>14s} {'kept':>8s}  note"]
        for r in self.rows:
            kept = f"{100 * r['after'] / r['before']:.3g}%" if r["before"] else "-"
            lines.append(f"{r['step']:{w}s} {r['before']:14,d} {r['after']:14,d} {kept:>8s}  {r['note']}".rstrip())
        return "\n".join(lines)

    __repr__ = __str__


@dataclass
class Candidates:
    """Selected (source_site, source, target_site, target) pairs with their statistics (`pairs`),
    the per-feature importance table (`features`) and the pruning `report`."""

    pairs: pa.Table
    features: pa.Table
    report: Report
    settings: dict

    def __len__(self) -> int:
        return self.pairs.num_rows

    def _col(self, name):
        return self.pairs.column(name).to_numpy(zero_copy_only=False)

    @property
    def source_site(self) -> np.ndarray:
        return self._col("source_site")

    @property
    def source(self) -> np.ndarray:
        return self._col("source")

    @property
    def target_site(self) -> np.ndarray:
        return self._col("target_site")

    @property
    def target(self) -> np.ndarray:
        return self._col("target")


@dataclass
class SourceCandidates:
    """The dense selection (`targets="all"`): each source feature is measured against every feature of
    every later site in the layer window. Stored as sources and target sites, never as a pair list.

    sources: site -> source feature ids, most important first; target_sites: source site -> the sites
    whose every feature is a target; d_sae: site -> SAE width."""

    sources: dict[str, np.ndarray]
    target_sites: dict[str, tuple[str, ...]]
    d_sae: dict[str, int]
    features: pa.Table
    report: Report
    settings: dict

    @property
    def n_sources(self) -> int:
        return sum(len(v) for v in self.sources.values())

    @property
    def n_pairs(self) -> int:
        return sum(len(f) * sum(self.d_sae[t] for t in self.target_sites[s]) for s, f in self.sources.items())

    def to_json(self) -> dict:
        """A compact, JSON-ready form (what a build saves as candidates.json)."""
        return {"sources": {s: [int(f) for f in v] for s, v in self.sources.items()},
                "target_sites": {s: list(v) for s, v in self.target_sites.items()}, "d_sae": dict(self.d_sae)}
