"""Candidate feature pairs: the pruning filters (layer window, importance, co-activation, decoder
alignment) applied to an atlas, and their report. Pure selection over data: runs no model."""
from .report import Candidates, Report
from .select import PAIR_SCHEMA, select_candidates

__all__ = ["Candidates", "PAIR_SCHEMA", "Report", "select_candidates"]
