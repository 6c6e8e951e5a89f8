"""Causal feature-to-feature measurements: clamping, ablation, Jacobians, gating, feature importance,
weight-only terms (the direct residual path and decoder alignment); crosscoder features as sources and
targets."""
from ..saes.geometry import alignment_applies, decoder_alignment
from .api import measure_effects
from .crosscoder import CROSSCODER_METHODS, crosscoder_effects
from .engine import CLAMP_AT, INPUT_MODES, METHODS, POSITION_MODES, READS
from .gating import GATING_METHODS, GatingEffects, measure_gating
from .importance import (IMPORTANCE_KINDS, ablation_effects, attribution_by_site, attribution_effects,
                         feature_importance, feature_importance_by_site)
from .prefix import CleanPrefix, activation_sd, clean_prefix, clean_prefix_bytes
from .select import AUTO_INPUTS, affordable_inputs
from .sources import TranscoderSource, check_dictionaries, prefix_sites
from .types import Effects, FeatureList, feature_list
from .weights import weight_effects

__all__ = ["AUTO_INPUTS", "CLAMP_AT", "CROSSCODER_METHODS", "crosscoder_effects", "CleanPrefix", "Effects", "FeatureList", "GATING_METHODS", "GatingEffects",
           "IMPORTANCE_KINDS", "INPUT_MODES", "METHODS", "POSITION_MODES", "READS", "ablation_effects",
           "activation_sd", "affordable_inputs", "alignment_applies", "attribution_by_site", "attribution_effects", "clean_prefix",
           "clean_prefix_bytes", "decoder_alignment", "feature_importance", "feature_importance_by_site", "feature_list", "measure_effects",
           "measure_gating", "weight_effects", "TranscoderSource", "check_dictionaries", "prefix_sites"]
