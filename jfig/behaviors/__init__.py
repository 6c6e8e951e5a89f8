"""Behaviours: prompt suites with a metric, seed features, k-hop subgraphs of the interaction graph,
and the tests that make a subgraph a circuit (sufficiency, necessity, self-containment, heads)."""
from .circuit import HEAD_CIRCUITS, BehaviorCircuit, behavior_subgraph, circuit_report
from .circuit_faithfulness import (CircuitComparison, CircuitEdge, FeatureCircuit, compare_circuits,
                                   direct_circuit_metric, random_circuits, set_faithfulness)
from .circuit_search import feature_circuit
from .heads import EdgeHeads, HeadEffects, can_carry, edge_heads, head_patching
from .metric import Baseline, logit_diff, suite_baseline
from .modularity import overlap, self_containment
from .seeds import FeatureScores, Seed, ablation_effects, feature_scores, find_seeds
from .subgraph import Subgraph, internal_fraction, khop_subgraph
from .suite import BehaviorSuite, SuiteTokens, as_suite, behavior_suite, load_suite, tokenize_suite
from .validate import CircuitTest, circuit_test, matched_controls, set_metrics

__all__ = [
    "Baseline", "BehaviorCircuit", "BehaviorSuite", "CircuitComparison", "CircuitEdge", "CircuitTest", "EdgeHeads", "FeatureScores", "HEAD_CIRCUITS",
    "HeadEffects", "Seed", "Subgraph", "SuiteTokens", "ablation_effects", "as_suite", "behavior_subgraph",
    "behavior_suite", "can_carry", "circuit_report", "circuit_test", "compare_circuits", "direct_circuit_metric", "edge_heads",
    "feature_circuit", "FeatureCircuit", "feature_scores", "find_seeds", "head_patching",
    "internal_fraction", "khop_subgraph", "load_suite", "logit_diff", "matched_controls", "overlap", "random_circuits",
    "self_containment", "set_faithfulness", "set_metrics", "suite_baseline", "tokenize_suite",
]
