"""Interaction metrics from weights and distributions (docs/interactions.md): how far a layer's
nonlinearities are from distributing over SAE features, at each MLP neuron, at each attention head,
and in the joint distribution of feature activations. Cheap next to jfig's causal measurements:
weights only, or one pass over data. The metrics ranked as (feature, feature, location) triples (rank.py)
and scored against a measured graph's edges (predict.py); pairs that rarely co-occur but interact
strongly, the inputs that make them co-occur, and what that does to the output (adversarial.py)."""
from .adversarial import (ADVERSARIAL_SCHEMA, OutputEffect, SearchResult, adversarial_pairs, output_effects,
                          search_pair, special_token_ids)
from .attention import QKTerms, QueryOverlap, qk_terms, query_overlap
from .distribution import DistributionAccumulator, FeatureDistribution, atlas_edges, feature_distribution
from .dominance import DominanceTest, dominance_test
from .neurons import NeuronInteractions, mlp_read_in, mlp_readers, neuron_interactions
from .pairs import all_pairs, check_pairs, coactive_pairs
from .predict import (EDGE_KINDS, PREDICTION_SCHEMA, edge_labels, metric_predictions, precision_at_k,
                      predictions_markdown, roc_auc)
from .rank import RANK_SCHEMA, canonical_pairs, pair_frequency, pair_summary, plot_interactions, rank_interactions
from .readin import first_reader, norm_map, norm_scale, reading_layer

__all__ = ["ADVERSARIAL_SCHEMA", "DistributionAccumulator", "DominanceTest", "EDGE_KINDS", "FeatureDistribution",
           "NeuronInteractions", "OutputEffect", "PREDICTION_SCHEMA", "QKTerms", "QueryOverlap", "RANK_SCHEMA",
           "SearchResult", "adversarial_pairs", "all_pairs", "atlas_edges", "canonical_pairs", "check_pairs",
           "coactive_pairs", "dominance_test", "edge_labels", "feature_distribution", "first_reader",
           "metric_predictions", "mlp_read_in", "mlp_readers", "neuron_interactions", "norm_map", "norm_scale", "output_effects",
           "pair_frequency", "pair_summary", "plot_interactions", "precision_at_k", "predictions_markdown", "qk_terms",
           "query_overlap", "rank_interactions", "reading_layer", "roc_auc", "search_pair", "special_token_ids"]
