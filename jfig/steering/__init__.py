"""Steering on the interaction graph: predicted cascades of clamped features, the observed cascade of an
edit on the model, and compensated steering (more clamps that cancel the off-target part)."""
from .cascade import cascade_nodes, predict_cascade
from .compensate import Compensation, compensate
from .observe import CascadeFit, ObservedCascade, compare_cascade, observe_cascade

__all__ = ["CascadeFit", "Compensation", "ObservedCascade", "cascade_nodes", "compare_cascade", "compensate",
           "observe_cascade", "predict_cascade"]
