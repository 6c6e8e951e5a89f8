"""TrainConfig: the hyperparameters of one SAE training run, validated on construction;
TranscoderConfig: the same for a transcoder (plus its skip connection)."""

from __future__ import annotations

import dataclasses

import numpy as np

from jfig.errors import JfigError

TRAIN_ARCHITECTURES = ("topk", "jumprelu", "relu")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
DECAYS = ("cosine", "linear", "constant")
# Fields that may differ between a checkpoint and the run resuming it: they change no number.
RESUMABLE_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every")
# Fields the update step never reads.
INIT_ONLY_FIELDS = RESUMABLE_FIELDS + ("batch_size", "b_dec_init", "init_batches", "scale_activations", "seed")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one SAE training run.

    Sizes: ``d_sae`` latents; ``architecture`` "topk" (needs ``k``), "jumprelu" or "relu".
    Schedule: ``steps`` updates of Adam (``adam_b1``, ``adam_b2``, ``adam_eps``; optional global
    gradient clipping ``max_grad_norm``) with peak learning rate ``lr``, linear warm-up from 0 over
    ``warmup_steps``, then ``decay`` "cosine" | "linear" to 0 at ``steps``, or "constant".
    ``batch_size`` is the number of tokens per step when training on an array (a callable or an
    iterable of batches sets its own batch size).

    TopK: ``aux_k`` dead latents in the AuxK loss (None: ``d_in // 2``, capped at ``d_sae``),
    weighted ``aux_coeff`` (1/32 as in the paper); a latent is dead once it has not fired for
    ``dead_after_tokens`` tokens. ReLU: ``l1_coeff``. JumpReLU: ``jumprelu_bandwidth`` (eps of the
    rectangle kernel), ``jumprelu_sparsity_coeff`` (lambda on L0), ``jumprelu_init_threshold``.
    The coefficients are for scaled inputs (see ``scale_activations``), where pre-activations are of
    order 1: the paper's eps = theta_0 = 0.001 then leaves almost no token inside the kernel's
    window, and thresholds barely move (on planted dictionaries in the tests, 0.05 and 0.1 learn
    in a thousand steps where 0.001 does not).

    Initialisation: ``W_dec`` rows are random unit vectors and ``W_enc = W_dec.T``; ``b_enc = 0``;
    ``b_dec`` is the ``b_dec_init`` ("geometric_median" by Weiszfeld iterations, "mean", "zeros") of
    the first ``init_batches`` batches. With ``scale_activations`` inputs are multiplied by
    ``sqrt(d_in) / mean ||x||`` (from the same batches) during training, so that hyperparameters
    transfer between sites; the returned SAE has the factor folded in and takes raw activations.

    Bookkeeping: ``seed``; ``checkpoint_every`` steps (None: only at the end); the last
    ``keep_checkpoints`` checkpoints are kept; the progress bar and history are refreshed every
    ``log_every`` steps (each refresh waits for the device).
    """

    d_sae: int
    architecture: str = "topk"
    k: int | None = None
    steps: int = 10_000
    batch_size: int = 4096
    lr: float = 3e-4
    warmup_steps: int = 100
    decay: str = "cosine"
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = None
    aux_k: int | None = None
    aux_coeff: float = 1 / 32
    dead_after_tokens: int = 10_000_000
    l1_coeff: float = 5.0
    jumprelu_bandwidth: float = 0.05
    jumprelu_sparsity_coeff: float = 1.0
    jumprelu_init_threshold: float = 0.1
    b_dec_init: str = "geometric_median"
    init_batches: int = 4
    scale_activations: bool = True
    normalize_decoder: bool = True
    seed: int = 0
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 10

    def __post_init__(self) -> None:
        for name in ("d_sae", "steps", "batch_size", "init_batches", "keep_checkpoints", "log_every"):
            self._positive_int(name)
        for name in ("aux_k", "checkpoint_every"):
            self._positive_int(name, allow_none=True)
        if self.architecture not in TRAIN_ARCHITECTURES:
            raise JfigError(f"TrainConfig.architecture {self.architecture!r} is unknown; expected one of "
                            f"{TRAIN_ARCHITECTURES}")
        if self.architecture == "topk":
            if self.k is None:
                raise JfigError("TrainConfig: architecture 'topk' needs k (latents kept per token)")
            self._positive_int("k")
            if self.k > self.d_sae:
                raise JfigError(f"TrainConfig: k={self.k} exceeds d_sae={self.d_sae}; expected 1 <= k <= d_sae")
        elif self.k is not None:
            raise JfigError(f"TrainConfig: k applies to architecture 'topk' only, not {self.architecture!r}")
        if self.decay not in DECAYS:
            raise JfigError(f"TrainConfig.decay {self.decay!r} is unknown; expected one of {DECAYS}")
        if self.b_dec_init not in B_DEC_INITS:
            raise JfigError(f"TrainConfig.b_dec_init {self.b_dec_init!r} is unknown; expected one of {B_DEC_INITS}")
        if self.warmup_steps < 0 or self.dead_after_tokens < 1:
            raise JfigError(f"TrainConfig: warmup_steps must be >= 0 and dead_after_tokens >= 1; got "
                            f"{self.warmup_steps} and {self.dead_after_tokens}")
        if not self.lr > 0 or not self.jumprelu_bandwidth > 0 or not self.jumprelu_init_threshold > 0:
            raise JfigError(f"TrainConfig: lr, jumprelu_bandwidth and jumprelu_init_threshold must be > 0; got "
                            f"{self.lr}, {self.jumprelu_bandwidth} and {self.jumprelu_init_threshold}")

    def _positive_int(self, name: str, allow_none: bool = False) -> None:
        value = getattr(self, name)
        if value is None and allow_none:
            return
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise JfigError(f"TrainConfig.{name} must be a positive int, got {value!r}")

    def resolved_aux_k(self, d_in: int) -> int:
        """The number of dead latents AuxK uses for inputs of width ``d_in``."""
        return min(self.d_sae, self.aux_k if self.aux_k is not None else max(1, d_in // 2))


@dataclasses.dataclass(frozen=True)
class TranscoderConfig(TrainConfig):
    """Hyperparameters of one transcoder training run: every :class:`TrainConfig` field, read the
    same way with the transcoder's output ``y`` in place of the SAE's input, plus ``skip``.

    ``d_sae`` is the number of latents (``d_tc``). The loss is ``||y - y_hat||^2`` with the same
    sparsity terms; ``b_dec`` starts at the ``b_dec_init`` of ``y``; with ``scale_activations`` the
    input ``x_in`` is scaled to mean norm ``sqrt(d_in)`` and ``y`` to mean norm ``sqrt(d_out)``,
    each by its own factor, both folded back into the returned transcoder. ``skip`` adds a linear
    skip connection ``x_in @ W_skip`` (initialised to 0, not in the sparsity term). Decoder rows are
    kept at unit norm (``normalize_decoder``); ``W_enc`` starts as random unit columns.
    """

    skip: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.skip, (bool, np.bool_)):
            raise JfigError(f"TranscoderConfig.skip must be True or False, got {self.skip!r}")


@dataclasses.dataclass(frozen=True)
class CLTConfig(TrainConfig):
    """Hyperparameters of one cross-layer transcoder training run: every :class:`TrainConfig` field,
    read per read layer (``d_sae`` latents at each layer, ``k`` kept per layer for topk, ``aux_k``
    dead latents per layer for AuxK).

    The loss is ``sum_m ||y_m - y_hat_m||^2`` (mean over tokens) over the write layers plus the
    sparsity term summed over the read layers; a feature's decoder norm (relu's L1 weighting, and
    the unit norm ``normalize_decoder`` keeps) is that of its rows into every layer it writes,
    concatenated. With ``scale_activations`` each layer's inputs and outputs get their own factor.
    """


@dataclasses.dataclass(frozen=True)
class CrosscoderConfig(TrainConfig):
    """Hyperparameters of one crosscoder training run: every :class:`TrainConfig` field, read for the
    SAE on the stacked vector ``concat_l x_l`` (``d_sae`` latents, ``k`` kept per token), plus
    ``interaction_penalty``. AuxK's default ``aux_k`` is half of one layer's width (``d // 2``), not of
    the stacked width: what an SAE at one of the sites would use.

    With ``scale_activations`` each layer gets its own factor (mean norm ``sqrt(d)`` per layer), so no
    layer dominates the loss because its residual is larger. ``interaction_penalty`` (lambda >= 0)
    weights :func:`jfig.saes.train.losses.interaction_penalty`, the co-activation-weighted overlap of
    co-active features' footprints on the MLP neurons that read each layer (needs ``readers`` at
    training time); 0 trains the plain crosscoder.
    """

    interaction_penalty: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.interaction_penalty
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not value >= 0:
            raise JfigError(f"CrosscoderConfig.interaction_penalty must be a number >= 0, got {value!r}")


def config_as(cfg, cls: type):
    """``cfg`` as a ``cls`` (a TrainConfig subclass): itself when it is one, a plain :class:`TrainConfig`
    lifted with the subclass's own fields at their defaults; JfigError for anything else."""
    if isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, TrainConfig):
        return cls(**{f: getattr(cfg, f) for f in TrainConfig.__dataclass_fields__})
    raise JfigError(f"cfg must be a {cls.__name__}, got {type(cfg).__name__}")
