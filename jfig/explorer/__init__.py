"""The Feature Interaction Explorer: one self-contained HTML page per graph (`jfig view`) and a local
server with a live model behind the same page (`jfig serve`, for the steering simulator)."""
from ..graph.labels import load_labels
from .attribution import attribution_json
from .page import render_page
from .payload import explorer_payload
from .simulate import simulate_steering

__all__ = ["attribution_json", "explorer_payload", "load_labels", "render_page", "simulate_steering"]
