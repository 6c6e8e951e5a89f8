"""Sparse autoencoders: the SAE pytree and its file formats (SAELens, Gemma Scope, jfig's own);
transcoders (SAELens, circuit-tracer) and crosscoders over several layers: loading, training, measuring
and saving."""

from jfig.saes.loaders import (load_sae, load_sae_ref, load_sparsity, load_transcoders, save_clt, save_sae,
                               save_transcoder)
from jfig.saes.sae import SAE, fold_activation_norm_scaling_factor, fold_W_dec_norm
from jfig.saes.transcoder import Transcoder, attach_input_norms
from jfig.saes.crosscoder import Crosscoder, load_crosscoder, save_crosscoder
from jfig.saes.metrics import activation_metrics, sae_metrics, transcoder_metrics, transcoder_pair_metrics
from jfig.saes.train import (CLTConfig, CrosscoderConfig, TrainConfig, TranscoderConfig, fit, fit_clt,
                             fit_crosscoder, fit_transcoder, train_clt, train_crosscoder, train_nfm, train_sae,
                             train_transcoder)
from jfig.saes.defaults import DefaultSAESettings, default_saes
from jfig.saes.matching import (ACROSS_METHODS, CrossMatching, FeatureMatching, feature_correlation, match_across,
                                match_features, match_sae_sets)
from jfig.saes.nfm import NFM, bi_interaction, load_nfm, nfm_params, save_nfm
from jfig.saes.nfm_metrics import nfm_metrics

__all__ = ["SAE", "DefaultSAESettings", "TrainConfig", "activation_metrics", "default_saes", "fit", "load_sae", "load_sae_ref",
           "load_sparsity", "sae_metrics", "save_sae", "train_sae", "fold_W_dec_norm",
           "fold_activation_norm_scaling_factor", "Transcoder", "attach_input_norms", "load_transcoders",
           "TranscoderConfig", "fit_transcoder", "save_transcoder", "train_transcoder", "transcoder_metrics",
           "transcoder_pair_metrics", "FeatureMatching", "feature_correlation", "match_features", "match_sae_sets",
           "CLTConfig", "fit_clt", "save_clt", "train_clt", "Crosscoder", "CrosscoderConfig", "fit_crosscoder",
           "load_crosscoder", "save_crosscoder", "train_crosscoder", "NFM", "bi_interaction", "load_nfm",
           "nfm_metrics", "nfm_params", "save_nfm", "train_nfm", "ACROSS_METHODS", "CrossMatching", "match_across"]
