"""Train sparse autoencoders on activations: TopK (+AuxK), JumpReLU (straight-through) and ReLU+L1.

- :mod:`.config`: :class:`TrainConfig` and its validation.
- :mod:`.losses`: the losses, on top of the SAE's own encoder (:mod:`jfig.saes.sae`).
- :mod:`.step`: :class:`TrainState`, initialisation, optimiser and schedule, the jitted
  :func:`train_step`, and :func:`sae_from_state`.
- :mod:`.checkpoint`: atomic checkpoints (equinox-serialised state plus a JSON record).
- :mod:`.fit`: the loop (:func:`fit`), :func:`capture_activations` and :func:`train_sae`.
"""

from jfig.saes.train.checkpoint import load_checkpoint, save_checkpoint
from jfig.saes.train.config import B_DEC_INITS, DECAYS, TRAIN_ARCHITECTURES, TrainConfig
from jfig.saes.train.fit import capture_activations, fit, train_sae
from jfig.saes.train.losses import auxk_loss, heaviside_step, jumprelu, sae_loss, sparse_decode, training_sae
from jfig.saes.train.step import (TrainState, geometric_median, init_train_state, make_optimizer, make_schedule,
                                  sae_from_state, train_step)

__all__ = [
    "B_DEC_INITS", "DECAYS", "TRAIN_ARCHITECTURES", "TrainConfig", "TrainState", "auxk_loss", "capture_activations",
    "fit", "geometric_median", "heaviside_step", "init_train_state", "jumprelu", "load_checkpoint",
    "make_optimizer", "make_schedule", "sae_from_state", "sae_loss", "save_checkpoint", "sparse_decode",
    "train_sae", "train_step", "training_sae",
]
