"""Integration: whether features are combined nonlinearly, not merely co-active. Neural factorization
machines read (2x2 designs by intervention and by stimulus), and model neurons best explained by
feature products, set against the graph's gating hyperedges."""

from .designs import (FourCellFit, InterventionDesign, Readout, feature_readout, four_cell_fit, intervention_design,
                      logit_readout, neuron_readout, site_values)
from .neurons import (GatingEnrichment, IntegrationNeurons, gating_enrichment, gating_pairs,
                      integration_from_activations, integration_neurons)
from .nfm_reading import (Context, DimensionReading, ablate_interaction, dimension_strength, gini, interaction_contexts,
                          read_dimensions)
from .stimulus import StimulusDesign, fit_stimulus_design, load_design_prompts, prompt_features, stimulus_design

__all__: list[str] = ["Context", "DimensionReading", "ablate_interaction", "dimension_strength", "gini",
                      "interaction_contexts", "read_dimensions", "FourCellFit", "GatingEnrichment", "IntegrationNeurons", "InterventionDesign", "Readout",
                      "StimulusDesign", "feature_readout", "fit_stimulus_design", "four_cell_fit", "gating_enrichment",
                      "gating_pairs", "integration_from_activations", "integration_neurons", "intervention_design",
                      "load_design_prompts", "logit_readout", "neuron_readout", "prompt_features", "site_values",
                      "stimulus_design"]
