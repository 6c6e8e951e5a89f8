"""Sparse autoencoders: the SAE pytree and its file formats (SAELens, Gemma Scope, jfig's own)."""

from jfig.saes.loaders import load_sae, load_sparsity, save_sae
from jfig.saes.sae import SAE, fold_activation_norm_scaling_factor, fold_W_dec_norm

__all__ = ["SAE", "load_sae", "load_sparsity", "save_sae", "fold_W_dec_norm", "fold_activation_norm_scaling_factor"]
