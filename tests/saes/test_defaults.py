"""Default SAEs: trained once on the offline corpus, cached with a manifest, reused."""
import json

import jax
import numpy as np

import jfig
from jfig.models.config import llama_config
from jfig.models.forward import init_params
from jfig.saes.defaults import default_saes, metrics_table


class _Tok:
    """A tiny byte tokenizer so the tiny model can read the default corpus."""
    bos_id, eos_id, add_bos = 1, 2, True
    vocab_size = 64

    def encode(self, text, add_bos=None):
        return [3 + (b % 61) for b in text.encode()]

    def encode_batch(self, texts, add_bos=None):
        return [self.encode(t) for t in texts]


def test_default_saes_train_cache_and_reuse(tmp_path, monkeypatch):
    cfg = llama_config(n_layers=3, d_model=16, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=24, vocab_size=64,
                       max_seq_len=64, name="tiny")
    model = jfig.Model.from_config(cfg, init_params(cfg, jax.random.PRNGKey(0), scale=0.2), tokenizer=_Tok())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kw = dict(sites=("blocks.0.hook_resid_post", "blocks.2.hook_resid_post"), d_sae=32, k=4, tokens=4096,
              eval_tokens=512, seq_len=32, batch_size=256, epochs=2, progress=False)
    saes, man = default_saes(model, **kw)
    assert [s.site for s in saes] == list(kw["sites"])
    assert set(man["metrics"]) == set(kw["sites"])
    for m in man["metrics"].values():
        assert {"fvu", "l0", "dead_fraction", "ce_loss_recovered"} <= set(m)
        assert m["l0"] <= 4 + 1e-6
    folder = next((tmp_path / "jfig" / "saes").glob("*/*"))
    assert json.loads((folder / "manifest.json").read_text())["corpus_hash"] == man["corpus_hash"]
    assert (folder / "blocks.0.hook_resid_post" / "cfg.json").exists()        # SAELens folder format
    again, man2 = default_saes(model, **kw)                                  # second call: from the cache
    assert man2 == man
    np.testing.assert_array_equal(np.asarray(again[0].W_dec), np.asarray(saes[0].W_dec))
    assert "| blocks.0.hook_resid_post |" in metrics_table(man)
