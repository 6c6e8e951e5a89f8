"""Analyses built on measured effects, their statistics and graphs: agreement between estimators; the
degree-, sign- and layer-order-preserving rewiring null; signed three-node motifs against it; degree-distribution fits."""
from .compare import EstimatorComparison, PairAgreement, compare_estimators, effect_pvalues, relative_error
from .degrees import degree_fits, degree_sequence
from .motifs import MOTIFS, MotifCensus, motif_census, motif_counts
from .rewire import PRESERVE, SignedEdges, rewire, signed_edges

__all__ = ["EstimatorComparison", "MOTIFS", "MotifCensus", "PRESERVE", "PairAgreement", "SignedEdges",
           "compare_estimators", "degree_fits", "degree_sequence", "effect_pvalues", "motif_census", "motif_counts", "relative_error", "rewire",
           "signed_edges"]
