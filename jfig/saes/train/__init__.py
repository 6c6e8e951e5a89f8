"""Train sparse autoencoders and transcoders on activations: TopK (+AuxK), JumpReLU (straight-through)
and ReLU+L1.

- :mod:`.config`: :class:`TrainConfig` (and :class:`TranscoderConfig`) and their validation.
- :mod:`.losses`: the losses, on top of the SAE's own encoder (:mod:`jfig.saes.sae`); the
  transcoder loss shares their sparsity terms (:func:`dictionary_loss`).
- :mod:`.step`: :class:`TrainState`, initialisation, optimiser and schedule, the jitted
  :func:`train_step` / :func:`transcoder_train_step`, :func:`sae_from_state` and
  :func:`transcoder_from_state`.
- :mod:`.checkpoint`: atomic checkpoints (equinox-serialised state plus a JSON record).
- :mod:`.loop`: the loop both share (batches by step, resume, progress, checkpoints).
- :mod:`.fit`: :func:`fit`, :func:`capture_activations` and :func:`train_sae`.
- :mod:`.transcoder`: :func:`fit_transcoder`, :func:`capture_pairs` and :func:`train_transcoder`.
- :mod:`.clt`: cross-layer transcoders: :func:`fit_clt`, :func:`capture_clt_pairs`,
  :func:`stream_clt_pairs` and :func:`train_clt`.
- :mod:`.crosscoder`: acausal crosscoders over several layers' residual streams, with an optional
  interaction penalty: :func:`fit_crosscoder`, :func:`capture_stacked` and :func:`train_crosscoder`.
- :mod:`.nfm`: neural factorization machines on an SAE's features (:func:`fit_nfm`, :func:`train_nfm`)
  and the matched-parameter secondary SAE on its error (:func:`train_secondary_sae`).
"""

from jfig.saes.train.checkpoint import load_checkpoint, save_checkpoint
from jfig.saes.train.clt import capture_clt_pairs, fit_clt, stream_clt_pairs, train_clt
from jfig.saes.train.config import (B_DEC_INITS, DECAYS, TRAIN_ARCHITECTURES, CLTConfig, CrosscoderConfig, TrainConfig,
                                   TranscoderConfig)
from jfig.saes.train.crosscoder import capture_stacked, crosscoder_sites, fit_crosscoder, train_crosscoder
from jfig.saes.train.fit import capture_activations, fit, train_sae
from jfig.saes.train.nfm import (NFMConfig, NFMState, fit_nfm, init_nfm_state, matched_d_sae, nfm_from_state,
                                 nfm_train_step, train_nfm, train_secondary_sae)
from jfig.saes.train.losses import (auxk_loss, clt_loss, crosscoder_loss, interaction_penalty, dead_latent_fvu, dictionary_loss, heaviside_step, jumprelu, sae_loss,
                                    sparse_decode, training_sae, transcoder_loss)
from jfig.saes.train.step import (TrainState, clt_from_state, clt_train_step, crosscoder_from_state,
                                  crosscoder_train_step, empty_crosscoder_state, init_crosscoder_state, empty_clt_state, empty_transcoder_state, geometric_median, init_train_state,
                                  init_clt_state, init_transcoder_state, make_optimizer, make_schedule, sae_from_state,
                                  train_step, transcoder_from_state, transcoder_train_step)
from jfig.saes.train.transcoder import (capture_pairs, check_transcoder_sites, fit_transcoder, stream_pairs,
                                        train_transcoder)

__all__ = [
    "NFMConfig", "NFMState", "fit_nfm", "init_nfm_state", "matched_d_sae", "nfm_from_state", "nfm_train_step",
    "train_nfm", "train_secondary_sae",
    "CrosscoderConfig", "capture_stacked", "crosscoder_from_state", "crosscoder_loss", "crosscoder_sites",
    "crosscoder_train_step", "empty_crosscoder_state", "fit_crosscoder", "init_crosscoder_state",
    "interaction_penalty", "train_crosscoder",
    "CLTConfig", "capture_clt_pairs", "clt_from_state", "clt_loss", "clt_train_step", "empty_clt_state", "fit_clt",
    "init_clt_state", "stream_clt_pairs", "train_clt",
    "B_DEC_INITS", "DECAYS", "TRAIN_ARCHITECTURES", "TrainConfig", "TrainState", "TranscoderConfig", "auxk_loss",
    "capture_activations", "capture_pairs", "check_transcoder_sites", "dead_latent_fvu", "dictionary_loss",
    "empty_transcoder_state", "fit", "fit_transcoder", "geometric_median", "heaviside_step", "init_train_state",
    "init_transcoder_state", "jumprelu", "load_checkpoint", "make_optimizer", "make_schedule", "sae_from_state",
    "sae_loss", "save_checkpoint", "sparse_decode", "stream_pairs", "train_sae", "train_step", "train_transcoder",
    "training_sae", "transcoder_from_state", "transcoder_loss", "transcoder_train_step",
]
