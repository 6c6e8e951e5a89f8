"""Significance: permutation p-values, random-direction thresholds, multiple-testing corrections,
and the edge decision (docs/concepts.md)."""
from .corrections import CORRECTIONS, adjust, benjamini_hochberg, bonferroni
from .decisions import Decision, decide, edge_kind, null_threshold, significant
from .permutation import (label_permutation_pvalue, normal_pvalues, sign_flip_normal_pvalues, sign_flip_pvalues,
                          t_pvalues)

__all__ = ["CORRECTIONS", "Decision", "adjust", "benjamini_hochberg", "bonferroni", "decide", "edge_kind",
           "label_permutation_pvalue", "normal_pvalues", "null_threshold", "sign_flip_normal_pvalues",
           "sign_flip_pvalues", "significant", "t_pvalues"]
