"""Geometry of SAE dictionaries: how directly one SAE's decoder writes into what another reads.

Decoder alignment e_j · d_i is a weight-only quantity (no data, no model run): the change in
target j's pre-activation per unit of source i along the direct residual path.
"""
from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..sites import RESIDUAL_BASIS, parse_site
from .transcoder import Transcoder

RESIDUAL_STREAM = frozenset({"hook_resid_pre", "hook_resid_mid", "hook_resid_post"})


def alignment_applies(source_site: str, target_site: str) -> bool:
    """Whether a direct residual path exists: the source writes into the residual stream and the
    target SAE reads the residual stream, later in the forward pass."""
    s, t = parse_site(source_site), parse_site(target_site)
    return (s.layer < 0 or s.local in RESIDUAL_BASIS) and t.local in RESIDUAL_STREAM and s < t


def dictionaries_aligned(source, target) -> bool:
    """Whether decoder alignment is defined between two dictionaries (SAEs or transcoders): a direct
    residual path from where the source writes (a transcoder: its output site) to a target that reads
    the residual stream as it is (not a transcoder that reads it through the model's norm), with equal
    widths."""
    if isinstance(target, Transcoder) and target.input_norm != "identity":
        return False
    write = source.out_site if isinstance(source, Transcoder) else source.site
    width = source.d_out if isinstance(source, Transcoder) else source.d_in
    return alignment_applies(write, target.site) and width == target.d_in


def decoder_alignment(source_sae, target_sae, sources=None, targets=None) -> tuple[np.ndarray, np.ndarray]:
    """Direct-path alignment ``e_j · d_i`` and its cosine, ``[n_sources, n_targets]`` each.

    Transcoders: the source's ``W_dec[i]`` is what it writes at its output site; see
    :func:`dictionaries_aligned` for when the alignment is defined.
    d_i is the source's decode direction (``W_dec[i]``, unit-normalised for topk SAEs with
    ``rescale_acts_by_decoder_norm``); e_j is the direction the target's pre-activation reads
    (``W_enc[:, j]``, times ``||W_dec[j]||`` when rescaling, centred when the target SAE centres or
    layer-normalises its input). Residual-stream SAEs read the residual with no model norm in
    between, so this is the whole direct term: adding a·d_i at the source changes pre_j by
    a·(e_j·d_i) (times the target's positive per-token input scale, if it normalises).
    """
    width = source_sae.W_dec.shape[1]                         # an SAE's d_in; a transcoder's d_out
    if width != target_sae.d_in:
        raise ShapeError(f"decoder alignment needs equal widths: {source_sae.site} writes width {width}, "
                         f"{target_sae.site} d_in {target_sae.d_in}")
    D = np.asarray(source_sae.W_dec, np.float64)
    D = D if sources is None else D[np.asarray(sources)]
    if getattr(source_sae, "rescale_acts_by_decoder_norm", False):
        D = D / np.linalg.norm(D, axis=1, keepdims=True)
    E = np.asarray(target_sae.W_enc, np.float64)
    if getattr(target_sae, "rescale_acts_by_decoder_norm", False):
        E = E * np.linalg.norm(np.asarray(target_sae.W_dec, np.float64), axis=1)[None, :]
    E = E if targets is None else E[:, np.asarray(targets)]
    if getattr(target_sae, "center_input", False) or getattr(target_sae, "normalize_activations", None) == "layer_norm":
        E = E - E.mean(axis=0, keepdims=True)
    dot = D @ E
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / np.outer(np.linalg.norm(D, axis=1), np.linalg.norm(E, axis=0))
    return dot, np.nan_to_num(cos)
