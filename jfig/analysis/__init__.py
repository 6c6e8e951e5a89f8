"""Analyses built on measured effects and their statistics: agreement between estimators."""
from .compare import EstimatorComparison, PairAgreement, compare_estimators, effect_pvalues, relative_error

__all__ = ["EstimatorComparison", "PairAgreement", "compare_estimators", "effect_pvalues", "relative_error"]
