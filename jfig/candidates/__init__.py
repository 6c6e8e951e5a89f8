"""Candidate feature pairs: the pruning filters (layer window, importance, co-activation, decoder
alignment) applied to an atlas, and their report. Pure selection over data: runs no model."""
from .report import Candidates, Report, SourceCandidates
from .select import PAIR_SCHEMA, select_candidates, select_sources, window_targets

__all__ = ["Candidates", "PAIR_SCHEMA", "Report", "SourceCandidates", "select_candidates", "select_sources",
           "window_targets"]
