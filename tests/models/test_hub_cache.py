"""load_model by HF repo id from a local Hugging Face cache (huggingface_hub's offline lookup), and the
messages that say which files to fetch when something is missing."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

import jfig
from jfig.errors import FormatError, OptionError
from jfig.models.hub_cache import NotInCacheError, cached_file, find_snapshot, hub_cache_dir, model_snapshot
from jfig.models.registry import model_path

from tests.support.fake_hub import CACHE_VARIABLES, add_folder, add_snapshot, commit_sha, remove, use_cache
from tests.support.hf_reference import tiny_hf

TOKENS = np.random.default_rng(0).integers(0, 97, size=(2, 9))


def save_checkpoint(folder, family="gpt2", seed=0, **save):
    """A tiny random HF checkpoint written by transformers' save_pretrained, with a tokenizer.json."""
    model_hf, _ = tiny_hf(family, seed=seed)
    model_hf.save_pretrained(folder, safe_serialization=True, **save)
    backend = Backend(WordLevel({f"t{i}": i for i in range(97)}, unk_token="t0"))
    backend.pre_tokenizer = WhitespaceSplit()
    backend.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def gpt2_logits(gpt2_folder):
    return np.asarray(jfig.load_model(gpt2_folder).run(TOKENS).logits)


def logits(name, **kw):
    return np.asarray(jfig.load_model(name, **kw).run(TOKENS).logits)


# ------------------------------------------------------------------------------------ finding the cache


@pytest.mark.parametrize("variable", CACHE_VARIABLES)
@pytest.mark.parametrize("repo_id,name", [("openai-community/gpt2", "gpt2"), ("openai-community/gpt2",
                                          "openai-community/gpt2"), ("gpt2", "gpt2"), ("gpt2", "openai-community/gpt2")])
def test_repo_id_loads_from_the_cache_as_the_folder_does(tmp_path, monkeypatch, gpt2_folder, gpt2_logits, variable,
                                                          repo_id, name):
    hub = use_cache(monkeypatch, tmp_path / "cache", variable)
    snapshot = add_folder(hub, repo_id, gpt2_folder)
    assert (snapshot / "model.safetensors").is_symlink()
    assert os.readlink(snapshot / "model.safetensors").startswith("../../blobs/")
    assert model_path(name) == snapshot
    model = jfig.load_model(name)
    assert model.tokenizer is not None
    np.testing.assert_array_equal(np.asarray(model.run(TOKENS).logits), gpt2_logits)


def test_copies_instead_of_links(tmp_path, monkeypatch, gpt2_folder, gpt2_logits):
    hub = use_cache(monkeypatch, tmp_path)
    snapshot = add_folder(hub, "openai-community/gpt2", gpt2_folder, symlinks=False)
    assert not (snapshot / "model.safetensors").is_symlink()
    np.testing.assert_array_equal(logits("gpt2"), gpt2_logits)


def test_other_repo_ids(tmp_path, monkeypatch):
    hub = use_cache(monkeypatch, tmp_path)
    folder = save_checkpoint(tmp_path / "llama", "llama")
    add_folder(hub, "HuggingFaceTB/SmolLM2-135M", folder)
    np.testing.assert_array_equal(logits("HuggingFaceTB/SmolLM2-135M"), logits(folder))


def test_revision_picks_another_ref_or_a_commit(tmp_path, monkeypatch, gpt2_folder, gpt2_logits):
    hub = use_cache(monkeypatch, tmp_path)
    add_folder(hub, "openai-community/gpt2", gpt2_folder)
    other = save_checkpoint(tmp_path / "other", seed=1)
    sha = commit_sha("v2")
    add_folder(hub, "openai-community/gpt2", other, commit=sha, ref="v2")
    v2 = logits(other)
    assert np.abs(v2 - gpt2_logits).max() > 1e-3
    np.testing.assert_array_equal(logits("gpt2"), gpt2_logits)
    np.testing.assert_array_equal(logits("gpt2", revision="v2"), v2)
    np.testing.assert_array_equal(logits("openai-community/gpt2", revision=sha), v2)


def test_sharded_checkpoint_with_index(tmp_path, monkeypatch):
    hub = use_cache(monkeypatch, tmp_path)
    folder = save_checkpoint(tmp_path / "sharded", max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("*.safetensors"))) > 1
    add_folder(hub, "org/sharded", folder)
    np.testing.assert_array_equal(logits("org/sharded"), logits(folder))


def test_names_and_paths_come_first(tmp_path, monkeypatch, gpt2_folder):
    hub = use_cache(monkeypatch, tmp_path / "cache")
    add_folder(hub, "gpt2", gpt2_folder)
    add_folder(hub, "smollm2-135m", gpt2_folder)
    monkeypatch.chdir(tmp_path)
    local = save_checkpoint(tmp_path / "gpt2", seed=2)
    assert model_path("gpt2") == local.relative_to(tmp_path)
    assert model_path("smollm2-135m").suffix == ".gguf"


def test_revision_needs_a_repo_id(gpt2_folder):
    with pytest.raises(OptionError, match="revision='v2' applies to HF repo ids"):
        model_path(gpt2_folder, revision="v2")


@pytest.mark.parametrize("env", [
    {"HF_HUB_CACHE": "/x/hub", "HUGGINGFACE_HUB_CACHE": "/y", "HF_HOME": "/z", "XDG_CACHE_HOME": "/w"},
    {"HUGGINGFACE_HUB_CACHE": "/y", "HF_HOME": "/z", "XDG_CACHE_HOME": "/w"},
    {"HF_HOME": "/z", "XDG_CACHE_HOME": "/w"},
    {"XDG_CACHE_HOME": "/w"},
    {},
    {"HF_HOME": "~/hf-$JFIG_TEST_PART"},
])
def test_cache_folder_is_huggingface_hubs(monkeypatch, env):
    """The same folder as huggingface_hub's constants.HF_HUB_CACHE under the same environment."""
    pytest.importorskip("huggingface_hub")
    for name in CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JFIG_TEST_PART", "part")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    theirs = subprocess.run([sys.executable, "-c", "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)"],
                            capture_output=True, text=True, check=True, env=dict(os.environ)).stdout.strip()
    assert str(hub_cache_dir()) == theirs


def test_cached_file_agrees_with_try_to_load_from_cache(tmp_path, gpt2_folder):
    hub_lib = pytest.importorskip("huggingface_hub")
    snapshot = add_folder(tmp_path, "org/m", gpt2_folder)
    add_folder(tmp_path, "org/m", gpt2_folder, commit=commit_sha("v2"), ref="v2")
    (tmp_path / "models--org--m" / ".no_exist" / snapshot.name).mkdir(parents=True)
    (tmp_path / "models--org--m" / ".no_exist" / snapshot.name / "tokenizer_config.json").touch()
    for repo in ("org/m", "org/none"):
        for revision in ("main", "v2", commit_sha("v2"), "v3"):
            for name in ("config.json", "model.safetensors", "tokenizer_config.json", "nothing.json"):
                theirs = hub_lib.try_to_load_from_cache(repo, name, cache_dir=tmp_path, revision=revision)
                ours = cached_file(repo, name, revision, cache_dir=tmp_path)
                assert (str(ours) if ours else None) == (theirs if isinstance(theirs, str) else None), (repo, revision, name)


# ------------------------------------------------------------------------------------ what is missing


def test_repo_not_in_the_cache(tmp_path, monkeypatch):
    hub = use_cache(monkeypatch, tmp_path)
    with pytest.raises(NotInCacheError) as err:
        jfig.load_model("google/gemma-2-2b")
    message = str(err.value)
    assert message.startswith(f"google/gemma-2-2b is not in the local Hugging Face cache (looked in "
                              f"{hub / 'models--google--gemma-2-2b'}): ")
    assert "`hf download google/gemma-2-2b config.json tokenizer.json tokenizer_config.json`" in message
    assert '`hf download google/gemma-2-2b --include "*.safetensors"`' in message
    assert "huggingface-cli download" in message
    assert "copy the folder models--google--gemma-2-2b from that machine's hub cache" in message
    assert f"into {hub} here" in message and message.endswith("jfig never downloads")
    assert isinstance(err.value, FormatError)


def test_gpt2_names_both_folders_and_fetches_the_org_id(tmp_path, monkeypatch):
    hub = use_cache(monkeypatch, tmp_path)
    with pytest.raises(NotInCacheError) as err:
        jfig.load_model("gpt2")
    message = str(err.value)
    assert f"(looked in {hub / 'models--gpt2'} and {hub / 'models--openai-community--gpt2'})" in message
    assert "`hf download openai-community/gpt2 config.json" in message
    assert "copy the folder models--openai-community--gpt2" in message


def test_not_a_repo_id(tmp_path):
    with pytest.raises(FormatError, match="neither a known name"):
        jfig.load_model(str(tmp_path / "no" / "such.gguf"))


def test_no_config(tmp_path, monkeypatch, gpt2_folder):
    hub = use_cache(monkeypatch, tmp_path)
    snapshot = add_folder(hub, "org/m", gpt2_folder)
    remove(snapshot / "config.json")
    with pytest.raises(NotInCacheError) as err:
        jfig.load_model("org/m")
    message = str(err.value)
    assert message.startswith(f"org/m is not complete in the local Hugging Face cache: {snapshot} lacks config.json: ")
    assert "`hf download org/m config.json`" in message
    assert err.value.missing == ("config.json",)


def test_no_weights(tmp_path, monkeypatch, gpt2_folder):
    hub = use_cache(monkeypatch, tmp_path)
    snapshot = add_snapshot(hub, "org/m", {"config.json": gpt2_folder / "config.json", "pytorch_model.bin": b"x"})
    with pytest.raises(NotInCacheError) as err:
        jfig.load_model("org/m")
    message = str(err.value)
    assert f"{snapshot} lacks files matching *.safetensors (no weights: no model.safetensors" in message
    assert "pytorch_model.bin is there, but jfig reads safetensors weights only" in message
    assert '`hf download org/m --include "*.safetensors"`' in message


def test_index_names_absent_shards(tmp_path, monkeypatch):
    hub = use_cache(monkeypatch, tmp_path)
    folder = save_checkpoint(tmp_path / "sharded", max_shard_size="40KB")
    snapshot = add_folder(hub, "org/sharded", folder)
    shards = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
    remove(snapshot / shards[1])
    remove(snapshot / shards[-1])
    with pytest.raises(NotInCacheError) as err:
        jfig.load_model("org/sharded")
    message = str(err.value)
    assert (f"{snapshot} lacks {shards[1]} (a shard named by model.safetensors.index.json), {shards[-1]} (a shard "
            f"named by model.safetensors.index.json): ") in message
    assert f"`hf download org/sharded {shards[1]} {shards[-1]}`" in message
    assert err.value.missing == (shards[1], shards[-1])


def test_ref_names_an_absent_snapshot(tmp_path, monkeypatch, gpt2_folder):
    hub = use_cache(monkeypatch, tmp_path)
    snapshot = add_folder(hub, "org/m", gpt2_folder)
    sha = commit_sha("newer")
    (hub / "models--org--m" / "refs" / "main").write_text(sha)
    with pytest.raises(NotInCacheError) as err:
        jfig.load_model("org/m")
    message = str(err.value)
    assert (f"{hub / 'models--org--m' / 'refs' / 'main'} names snapshot {sha}, and "
            f"{hub / 'models--org--m' / 'snapshots' / sha} does not exist (snapshots there: {snapshot.name})") in message
    assert "`hf download org/m config.json" in message


def test_unknown_revision(tmp_path, monkeypatch, gpt2_folder):
    hub = use_cache(monkeypatch, tmp_path)
    add_folder(hub, "org/m", gpt2_folder)
    with pytest.raises(NotInCacheError) as err:
        jfig.load_model("org/m", revision="v9")
    message = str(err.value)
    assert f"org/m at revision 'v9' is not in the local Hugging Face cache: {hub / 'models--org--m'} has no refs/v9 " \
           f"and no snapshots/v9" in message
    assert "`hf download org/m config.json tokenizer.json tokenizer_config.json --revision v9`" in message


def test_link_to_an_absent_blob(tmp_path, monkeypatch, gpt2_folder):
    hub = use_cache(monkeypatch, tmp_path)
    snapshot = add_folder(hub, "org/m", gpt2_folder)
    blob = (snapshot / "model.safetensors").resolve()
    blob.unlink()
    with pytest.raises(NotInCacheError) as err:
        jfig.load_model("org/m")
    message = str(err.value)
    assert f"{snapshot} lacks model.safetensors (a link to ../../blobs/{blob.name}, which is not there)" in message
    assert "`hf download org/m model.safetensors`" in message


def test_recorded_absence(tmp_path, monkeypatch, gpt2_folder):
    hub = use_cache(monkeypatch, tmp_path)
    snapshot = add_folder(hub, "org/m", gpt2_folder)
    remove(snapshot / "config.json")
    marker = hub / "models--org--m" / ".no_exist" / snapshot.name / "config.json"
    marker.parent.mkdir(parents=True)
    marker.touch()
    with pytest.raises(NotInCacheError, match=f"lacks config.json \\(the repo has no such file at commit "
                                              f"{snapshot.name}: .no_exist records it\\)"):
        jfig.load_model("org/m")


def test_first_complete_spelling_wins(tmp_path, monkeypatch, gpt2_folder, gpt2_logits):
    """An incomplete models--gpt2 does not hide a complete models--openai-community--gpt2, and is
    what the message names when neither is complete."""
    hub = use_cache(monkeypatch, tmp_path)
    broken = add_folder(hub, "gpt2", gpt2_folder)
    remove(broken / "config.json")
    with pytest.raises(NotInCacheError, match=f"{broken} lacks config.json"):
        model_snapshot(("gpt2", "openai-community/gpt2"))
    add_folder(hub, "openai-community/gpt2", gpt2_folder)
    np.testing.assert_array_equal(logits("gpt2"), gpt2_logits)


def test_snapshot_lookup_strips_nothing_it_should_not(tmp_path):
    """refs/main holds the sha without a newline; one written by hand with a newline still works."""
    snapshot = add_snapshot(tmp_path, "org/m", {"config.json": b"{}"})
    (tmp_path / "models--org--m" / "refs" / "main").write_text(snapshot.name + "\n")
    assert find_snapshot("org/m", cache_dir=tmp_path).folder == snapshot
