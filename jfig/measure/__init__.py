"""Causal feature-to-feature measurements: clamping, ablation, Jacobians, gating, weight-only terms."""
from .api import measure_effects
from .gating import GatingEffects, measure_gating
from .types import Effects, FeatureList, feature_list
from .weights import weight_effects

__all__ = ["Effects", "FeatureList", "GatingEffects", "feature_list", "measure_effects", "measure_gating",
           "weight_effects"]
