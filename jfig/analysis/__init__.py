"""Analyses built on measured effects, their statistics and graphs: agreement between estimators; the
degree-, sign- and layer-order-preserving rewiring null."""
from .compare import EstimatorComparison, PairAgreement, compare_estimators, effect_pvalues, relative_error
from .rewire import PRESERVE, SignedEdges, rewire, signed_edges

__all__ = ["EstimatorComparison", "PRESERVE", "PairAgreement", "SignedEdges", "compare_estimators",
           "effect_pvalues", "relative_error", "rewire", "signed_edges"]
