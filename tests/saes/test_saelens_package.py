"""SAEs and transcoders written by the SAELens package itself load into jfig with the same outputs.

The SAELens package lives in the reference environment (tests/support/reference_env.py: it needs an
older transformers than the suite's). A script there builds each architecture with random non-zero
parameters, saves it with SAELens's own `save_model`, and records SAELens's encode and decode of
fixed inputs; jfig then loads each folder and must give the same numbers.
"""
from __future__ import annotations

import numpy as np
import pytest

import jfig
from jfig.saes import load_transcoders
from tests.support.reference_env import run_reference

D_IN, D_SAE, HEADS = 12, 20, 3

SCRIPT = r"""
import sys, json
from pathlib import Path
import numpy as np, torch
from sae_lens import (StandardSAEConfig, TopKSAEConfig, JumpReLUSAEConfig, TranscoderConfig,
                      SkipTranscoderConfig, JumpReLUTranscoderConfig, SAE)
from sae_lens.saes.sae import SAEMetadata

out = Path(sys.argv[1]); D_IN, D_SAE, HEADS = 12, 20, 3
torch.manual_seed(0)
meta = lambda hook, **kw: SAEMetadata(hook_name=hook, model_name="tiny", **kw)
cases = {
    "standard": StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta("blocks.1.hook_resid_post")),
    "standard_no_bdec_in": StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False,
                                             metadata=meta("blocks.1.hook_resid_post")),
    "standard_layer_norm": StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="layer_norm",
                                             metadata=meta("blocks.0.hook_resid_pre")),
    "topk": TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, metadata=meta("blocks.1.hook_mlp_out")),
    "topk_rescale": TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, rescale_acts_by_decoder_norm=True,
                                  metadata=meta("blocks.1.hook_resid_mid")),
    "jumprelu": JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta("blocks.1.hook_attn_out")),
    "hook_z": StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, reshape_activations="hook_z",
                                metadata=meta("blocks.1.attn.hook_z")),
    "transcoder": TranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False,
                                   metadata=meta("blocks.1.hook_resid_mid", hook_name_out="blocks.1.hook_mlp_out")),
    "skip_transcoder": SkipTranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False,
                                            metadata=meta("blocks.1.hook_resid_mid",
                                                          hook_name_out="blocks.1.hook_mlp_out")),
    "jumprelu_transcoder": JumpReLUTranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False,
                                                    metadata=meta("blocks.0.hook_resid_mid",
                                                                  hook_name_out="blocks.0.hook_mlp_out")),
}
record = {}
for name, cfg in cases.items():
    sae = SAE.from_dict(cfg.to_dict())
    with torch.no_grad():
        for pname, p in sae.named_parameters():
            if pname == "threshold":
                p.copy_(torch.rand_like(p) * 0.3)
            else:
                p.copy_(torch.randn_like(p) / (D_IN ** 0.5 if p.ndim == 2 else 3.0))
    sae.eval()
    shape = (4, 5, HEADS, D_IN // HEADS) if name == "hook_z" else (4, 5, D_IN)
    x = torch.randn(shape) * 2.0
    with torch.no_grad():
        f = sae.encode(x)
        y = sae.decode(f)
    sae.save_model(out / name)
    np.savez(out / f"{name}.npz", x=x.numpy(), f=f.numpy(), y=y.numpy())
    record[name] = type(sae).__name__
(out / "cases.json").write_text(json.dumps(record))
print(json.dumps(record))
"""

SAE_CASES = ("standard", "standard_no_bdec_in", "standard_layer_norm", "topk", "topk_rescale", "jumprelu", "hook_z")
TRANSCODER_CASES = ("transcoder", "skip_transcoder", "jumprelu_transcoder")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saelens")
    run_reference(SCRIPT, str(folder))
    return folder


@pytest.mark.parametrize("case", SAE_CASES)
def test_saelens_written_sae_loads_with_the_same_outputs(written, case):
    ref = np.load(written / f"{case}.npz")
    sae = jfig.load_sae(written / case)
    f = np.asarray(sae.encode(ref["x"]))
    np.testing.assert_allclose(f, ref["f"], atol=2e-5, rtol=1e-5)
    assert (ref["f"] != 0).any() and (ref["f"] == 0).any()        # the activation function mattered
    y = np.asarray(sae.decode(ref["f"], sae.encode_with_stats(ref["x"])[1]))
    np.testing.assert_allclose(y.reshape(ref["y"].shape), ref["y"], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", TRANSCODER_CASES)
def test_saelens_written_transcoder_loads_with_the_same_outputs(written, case):
    ref = np.load(written / f"{case}.npz")
    (tc,) = load_transcoders(written / case)
    f = np.asarray(tc.encode(ref["x"]))
    np.testing.assert_allclose(f, ref["f"], atol=2e-5, rtol=1e-5)
    assert (ref["f"] != 0).any()
    y = np.asarray(tc.decode(ref["f"], ref["x"]))
    if case == "skip_transcoder":        # SAELens's decode(f) alone has no skip term; its forward adds it
        y = y - np.asarray(ref["x"] @ np.asarray(tc.W_skip))
    np.testing.assert_allclose(y, ref["y"], atol=2e-5, rtol=1e-5)
