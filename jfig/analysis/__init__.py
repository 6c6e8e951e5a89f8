"""Analyses built on measured effects, their statistics and graphs: agreement between estimators; the
degree-, sign- and layer-order-preserving rewiring null; network statistics, communities, layer
decay, hubs, signed motifs and the three predictions against it (`analyze`); feature manifolds and
feature lineage (chains through depth, emergence, splitting)."""
from .analyze import Analysis, analyze
from .compare import EstimatorComparison, PairAgreement, compare_estimators, effect_pvalues, relative_error
from .degrees import degree_fits, degree_sequence
from .hubs import firing_rates, hub_ablation, hubs
from .lineage import (FeatureChains, FeatureSplitting, causal_similarity, feature_chains, feature_splitting,
                      match_layers)
from .manifolds import (FeatureManifold, coactivation_clusters, decoder_clusters, feature_manifolds, group_manifold,
                        manifold_table, participation_ratio, plot_manifold, plot_manifolds, top_token_labels,
                        two_nn_dimension)
from .motifs import MOTIFS, MotifCensus, motif_census, motif_counts
from .rewire import PRESERVE, SignedEdges, rewire, signed_edges

__all__ = ["Analysis", "EstimatorComparison", "MOTIFS", "MotifCensus", "PRESERVE", "PairAgreement", "SignedEdges",
           "analyze", "compare_estimators", "degree_fits", "degree_sequence", "effect_pvalues", "firing_rates",
           "hub_ablation", "hubs", "motif_census", "motif_counts", "relative_error", "rewire", "signed_edges",
           "FeatureChains", "FeatureManifold", "FeatureSplitting", "causal_similarity", "coactivation_clusters",
           "decoder_clusters", "feature_chains", "feature_manifolds", "feature_splitting", "group_manifold",
           "manifold_table", "match_layers", "participation_ratio", "plot_manifold", "plot_manifolds",
           "top_token_labels", "two_nn_dimension"]
