"""The command line: `jfig build CONFIG.toml` end to end on a tiny model folder, and config errors."""
import json

import jax
import numpy as np
import pytest

import jfig
from jfig.cli import main
from jfig.pipeline import load_config
from tests.support.hf_reference import tiny_hf


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny Llama HF folder with a byte-level tokenizer.json, two SAEs and a text corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    root = tmp_path_factory.mktemp("proj")
    model_hf, _ = tiny_hf("llama", n_heads=4, n_kv_heads=2)
    model_hf.save_pretrained(root / "model", safe_serialization=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "</s>": 1}
    for ch in sorted(alphabet)[:95]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(root / "model" / "tokenizer.json"))
    (root / "model" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    model = jfig.load_model(root / "model")
    for i, layer in enumerate((0, 2)):
        site = f"blocks.{layer}.hook_resid_post"
        jfig.save_sae(jfig.SAE.init_random(jax.random.PRNGKey(i), 32, 16, site), root / "saes" / f"l{layer}")
    (root / "texts").mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "a", "sequence", "of", "words"]
    for d in range(4):
        (root / "texts" / f"doc{d}.txt").write_text(" ".join(rng.choice(words, 400)))
    return root, model


def _write(root, text):
    p = root / "graph.toml"
    p.write_text(text)
    return p


def test_build_from_config(project, capsys):
    root, model = project
    cfg = _write(root, '''
model = "model"
saes = ["saes/l0", "saes/l2"]
corpus = ["texts"]
out = "out"
[options]
seq_len = 16
max_sequences = 32
top_k = 6
inputs_per_source = 8
gating = false
''')
    assert main(["build", str(cfg), "--quiet"]) == 0
    graph = jfig.load_graph(root / "out" / "graph")
    assert graph.manifest["options"]["top_k"] == 6
    assert (root / "out" / "build" / "build_state.json").exists()
    assert "pruning" in capsys.readouterr().out
    # rerunning resumes from the finished state and gives the same graph
    assert main(["build", str(cfg), "--quiet"]) == 0
    assert jfig.load_graph(root / "out" / "graph").edges.equals(graph.edges)


def test_config_errors(project, capsys):
    root, _ = project
    with pytest.raises(jfig.JfigError, match="unknown key"):
        load_config(_write(root, 'model = "model"\nmodle = 3\n'))
    with pytest.raises(jfig.JfigError, match="unknown build option"):
        load_config(_write(root, 'model = "model"\n[options]\ntopk = 3\n'))
    with pytest.raises(jfig.FormatError, match="not valid TOML"):
        load_config(_write(root, 'model = "model\n'))
    with pytest.raises(jfig.JfigError, match="needs a 'model'"):
        load_config(_write(root, 'out = "x"\n'))
    # through the command line: a clear one-line error and exit code 2, no traceback
    assert main(["build", str(_write(root, 'model = "model"\nbogus = 1\n'))]) == 2
    assert "unknown key" in capsys.readouterr().err
    wrong = _write(root, 'model = "model"\nsaes = ["saes/l0"]\ncorpus = ["texts"]\nout = "bad"\n')
    bad_sae = jfig.SAE.init_random(jax.random.PRNGKey(9), 8, 4, "blocks.0.hook_resid_post")
    jfig.save_sae(bad_sae, root / "saes" / "l0_wrong")
    wrong.write_text(wrong.read_text().replace("saes/l0", "saes/l0_wrong"))
    assert main(["build", str(wrong), "--quiet"]) == 2
    assert "do not belong to this model" in capsys.readouterr().err
    assert not (root / "bad" / "graph").exists()
