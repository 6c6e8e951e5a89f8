"""Significance: permutation p-values, random-direction thresholds, multiple-testing corrections,
and the edge decision (docs/concepts.md)."""
from .corrections import CORRECTIONS, adjust, benjamini_hochberg, bonferroni
from .decisions import (Decision, StreamedFamily, decide, edge_kind, null_threshold, pair_thresholds, significant,
                        site_thresholds)
from .permutation import label_permutation_pvalue, sign_flip_normal_pvalues, sign_flip_pvalues, t_pvalues
from .skewness import robust_pvalues, skew_corrected_t_pvalues
from .tails import (min_attainable_pvalue, min_inputs_for_pvalue, sign_flip_exact_pvalues,
                    sign_flip_saddlepoint_pvalues)

__all__ = ["CORRECTIONS", "Decision", "StreamedFamily", "adjust", "benjamini_hochberg", "bonferroni", "decide", "edge_kind",
           "label_permutation_pvalue", "min_attainable_pvalue", "min_inputs_for_pvalue", "null_threshold", "pair_thresholds",
           "robust_pvalues",
           "sign_flip_exact_pvalues", "sign_flip_normal_pvalues", "sign_flip_pvalues", "sign_flip_saddlepoint_pvalues",
           "significant", "site_thresholds", "skew_corrected_t_pvalues", "t_pvalues"]
