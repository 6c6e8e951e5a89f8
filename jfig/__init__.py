"""jfig: Feature Interaction Graphs for sparse-autoencoder features of transformer models, in JAX.

Curated public API; see docs/ (quickstart, guide, concepts, measure, atlas, graph_format).
The packages follow the pipeline, each importing only those before it:
models -> data -> saes -> atlas -> measure | interactions -> candidates / stats -> graph -> analysis | behaviors | steering
| attribution -> explorer -> pipeline -> cli.
"""
from . import data, edits, errors, sites
from .analysis import (Analysis, EstimatorComparison, analyze, compare_estimators, feature_chains, feature_manifolds,
                       feature_splitting)
from .atlas import Atlas, build_atlas
from .attribution import AttributionGraph, attribution_graph
from .behaviors import (BehaviorCircuit, BehaviorSuite, FeatureCircuit, behavior_subgraph, behavior_suite,
                        compare_circuits, feature_circuit, load_suite)
from .candidates import Candidates, select_candidates
from .edits import Ablate, Clamp, ClampTranscoder, Compose, Patch, PatchHeads, SetFeatures, ShiftFeatures, Steer
from .errors import FormatError, JfigError, OptionError, ShapeError, SiteError
from .explorer import attribution_json, explorer_payload, render_page
from .graph import GraphDiff, InteractionGraph, diff_graphs, load_graph
from .integration import integration_neurons, intervention_design, stimulus_design
from .interactions import (adversarial_pairs, dominance_test, feature_distribution, metric_predictions,
                           neuron_interactions, qk_terms, query_overlap, rank_interactions, search_pair)
from .measure import (Effects, GatingEffects, crosscoder_effects, feature_importance, measure_effects, measure_gating,
                      weight_effects)
from .models.config import ModelConfig
from .models.model import Model, Prefix, RunOutput
from .models.registry import DEFAULT_MODEL, load_model
from .models.tokenizer import Tokenizer
from .pipeline import BuildOptions, build_graph, crosscoder_graph
from .saes import (SAE, Crosscoder, FeatureMatching, Transcoder, default_saes, load_crosscoder, save_crosscoder,
                   NFM, load_nfm, match_across, nfm_metrics, save_nfm, train_crosscoder, train_nfm, load_sae, load_transcoders, match_features,
                   sae_metrics, save_clt, save_sae, save_transcoder, train_clt, train_sae, train_transcoder,
                   transcoder_metrics)
from .steering import observe_cascade, predict_cascade

__version__ = "0.1.0"

__all__ = [
    "Ablate", "Analysis", "Atlas", "AttributionGraph", "BehaviorCircuit", "BehaviorSuite", "BuildOptions", "Candidates", "Clamp",
    "ClampTranscoder", "Transcoder",
    "Compose", "DEFAULT_MODEL", "Effects",
    "EstimatorComparison", "FormatError", "GatingEffects", "GraphDiff", "InteractionGraph", "JfigError", "Model", "ModelConfig",
    "OptionError", "Patch", "PatchHeads", "Prefix", "RunOutput", "SAE", "SetFeatures", "ShapeError", "ShiftFeatures", "SiteError",
    "Steer", "Tokenizer",
    "__version__", "analyze", "attribution_graph", "attribution_json", "behavior_subgraph", "behavior_suite", "build_atlas", "build_graph", "compare_estimators", "data", "default_saes", "diff_graphs", "edits", "errors", "explorer_payload",
    "feature_importance", "load_graph", "load_model", "load_sae", "load_suite", "load_transcoders", "measure_effects", "measure_gating",
    "observe_cascade", "predict_cascade", "render_page",
    "sae_metrics", "save_sae", "select_candidates", "sites", "train_sae", "weight_effects",
    "save_transcoder", "train_transcoder", "transcoder_metrics",
    "dominance_test", "feature_distribution", "neuron_interactions", "qk_terms", "query_overlap",
    "metric_predictions", "rank_interactions", "adversarial_pairs", "search_pair",
    "FeatureMatching", "match_features",
    "save_clt", "train_clt",
    "NFM", "load_nfm", "nfm_metrics", "save_nfm", "train_nfm",
    "integration_neurons", "intervention_design", "stimulus_design",
    "FeatureCircuit", "compare_circuits", "feature_circuit",
    "feature_chains", "feature_manifolds", "feature_splitting", "match_across",
    "Crosscoder", "load_crosscoder", "save_crosscoder", "train_crosscoder", "crosscoder_effects", "crosscoder_graph",
]
