"""Interaction metrics from weights and distributions (docs/interactions.md): how far a layer's
nonlinearities are from distributing over SAE features, at each MLP neuron, at each attention head,
and in the joint distribution of feature activations. Cheap next to jfig's causal measurements:
weights only, or one pass over data."""
from .attention import QKTerms, QueryOverlap, qk_terms, query_overlap
from .distribution import DistributionAccumulator, FeatureDistribution, atlas_edges, feature_distribution
from .dominance import DominanceTest, dominance_test
from .neurons import NeuronInteractions, mlp_read_in, neuron_interactions
from .pairs import all_pairs, check_pairs, coactive_pairs
from .readin import first_reader, norm_map, norm_scale, reading_layer

__all__ = ["DistributionAccumulator", "DominanceTest", "FeatureDistribution", "NeuronInteractions", "QKTerms",
           "QueryOverlap", "all_pairs", "atlas_edges", "check_pairs", "coactive_pairs", "dominance_test",
           "feature_distribution", "first_reader", "mlp_read_in", "neuron_interactions", "norm_map", "norm_scale",
           "qk_terms", "query_overlap", "reading_layer"]
