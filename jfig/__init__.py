"""jfig: Feature Interaction Graphs for sparse-autoencoder features of transformer models, in JAX.

Curated public API; see docs/ (quickstart, guide, concepts, measure, atlas, graph_format).
"""
from . import data, edits, errors, sites
from .edits import Ablate, Clamp, Compose, Patch, Steer
from .errors import FormatError, JfigError, ShapeError, SiteError
from .measure import Effects, GatingEffects, measure_effects, measure_gating, weight_effects
from .models.config import ModelConfig
from .models.model import Model, Prefix, RunOutput
from .models.registry import DEFAULT_MODEL, load_model
from .models.tokenizer import Tokenizer
from .atlas import Atlas, build_atlas
from .candidates import Candidates, select_candidates
from .graph import InteractionGraph, load_graph
from .pipeline import BuildOptions, build_graph
from .saes import SAE, default_saes, load_sae, sae_metrics, save_sae, train_sae

__version__ = "0.1.0"

__all__ = [
    "Ablate", "Clamp", "Compose", "DEFAULT_MODEL", "Effects", "FormatError", "GatingEffects", "JfigError", "Model",
    "ModelConfig", "Patch", "Prefix", "RunOutput", "SAE", "ShapeError", "SiteError", "Steer", "Tokenizer", "data",
    "edits", "errors", "load_model", "load_sae", "measure_effects", "measure_gating", "save_sae", "sites",
    "weight_effects", "InteractionGraph", "load_graph", "default_saes", "sae_metrics", "train_sae", "Atlas",
    "build_atlas", "Candidates", "select_candidates", "BuildOptions", "build_graph",
]
