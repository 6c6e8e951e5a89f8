"""Model-driven data on tiny random models: the sampler (generation with a KV cache), activation streaming and buffers."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.data import ActivationBuffer, collect_activations, sample, sampled_corpus, stream_activations
from jfig.data import sampler as sampler_mod
from jfig.errors import JfigError, ShapeError, SiteError
from jfig.models import model as model_mod
from jfig.models.generate import generate
from tests.support.tiny_models import tiny_config
from jfig.models.forward import init_params

SITES = ("blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out")


class ToyTokenizer:
    bos_id, eos_id, vocab_size = 1, 2, 50

    def encode(self, text, add_bos=False):
        return ([1] if add_bos else []) + [int(w) for w in text.split()]

    def decode(self, ids, skip_special=False):
        return " ".join(str(i) for i in ids if not (skip_special and i in (1, 2)))


def tiny(family="llama", embed_scale=0.3, **kw):
    cfg = tiny_config(family, **{"n_layers": 2, "max_seq_len": 64, **kw})
    params = init_params(cfg, jax.random.PRNGKey(0), scale=0.3)
    params["embed"] = params["embed"] * embed_scale   # keep the token embedding from dominating: non-trivial greedy paths
    return jfig.Model.from_config(cfg, params, ToyTokenizer())


@pytest.fixture(scope="module")
def model():
    return tiny()


def greedy_by_rerunning(model, prompt, n, width=32):
    """Greedy continuation by a full model.run per step (right-padded to one width: one compile)."""
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(model.run(padded).logits[0, len(seq) - 1])))
    return seq[len(prompt):]


# ---------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_greedy_kv_cached_equals_rerunning_the_model(family):
    m = tiny(family, embed_scale=0.03 if family == "gemma2" else 0.3)   # Gemma scales embeddings by sqrt(d)
    prompts = [[3, 7, 9], [5], [1, 4, 4, 8, 30, 12]]
    got = sample(m, prompts, 7, temperature=0)
    want = [greedy_by_rerunning(m, p, 7) for p in prompts]
    assert got == want
    assert any(len(set(row)) > 2 for row in got)   # not a degenerate repeat-one-token path


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_cached_step_logits_match_full_run_at_every_position(family):
    m = tiny(family)
    toks = [4, 9, 13, 2, 40, 7, 7, 21]
    gen = generate(m, [toks[:1]], len(toks) - 1, return_logits=True)
    seq = np.asarray(gen.tokens)
    np.testing.assert_allclose(gen.logits[0], m.run(seq).logits[0, :-1], atol=1e-4, rtol=1e-4)
    for i in range(1, len(toks)):           # the prefill's logits at the last prompt position, too
        gen = generate(m, [toks[:i]], 1, return_logits=True)
        np.testing.assert_allclose(gen.logits[0, 0], m.run(jnp.asarray([toks[:i]])).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_decode_step_is_traced_once(model):
    sample(model, [[3, 4]], 5, temperature=0)
    traces = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(event)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        sample(model, [[3, 4]], 9, temperature=0)             # 8 more steps, same cache bucket
        sample(model, [[3, 4, 5]], 12, temperature=0.7, top_k=5)  # sampling settings are traced values
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert traces == []


def test_sampling_is_seeded_and_top_k_one_is_greedy(model):
    prompts = [[3], [8, 9]]
    a = sample(model, prompts, 10, temperature=1.0, seed=0)
    assert a == sample(model, prompts, 10, temperature=1.0, seed=0)
    assert a != sample(model, prompts, 10, temperature=1.0, seed=1)
    assert all(len(r) == 10 and all(0 <= t < 50 for t in r) for r in a)
    assert sample(model, prompts, 6, top_k=1, seed=5) == sample(model, prompts, 6, temperature=0)
    with pytest.raises(ShapeError, match="at least one token"):
        sample(model, [[]], 3)


def test_sampled_corpus_is_cached_on_disk(model, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    corpus = sampled_corpus(model, 5, 6, seed=0, batch_size=2)
    docs = list(corpus)
    files = list((tmp_path / "jfig" / "samples").glob("*.jsonl"))
    assert len(docs) <= 5 and len(files) == 1
    assert all(set(d.split()) <= {str(i) for i in range(50) if i not in (1, 2)} for d in docs)

    def no_sampling(*a, **k):
        raise AssertionError("sampled again despite the cache")
    monkeypatch.setattr(sampler_mod, "sample", no_sampling)
    assert list(sampled_corpus(model, 5, 6, seed=0, batch_size=2)) == docs
    assert not list((tmp_path / "jfig" / "samples").glob("*.tmp*"))


# ---------------------------------------------------------------------------- streaming
def batches(n=3, b=2, s=6, seed=0):
    rng = np.random.default_rng(seed)
    out = [rng.integers(3, 50, size=(b, s)).astype(np.int32) for _ in range(n)]
    for t in out:
        t[:, 0] = 1   # BOS
    return out


def test_streamed_activations_equal_capture_without_retracing(model, count_traces):
    data = batches()
    stream = stream_activations(model, data, SITES)
    first = next(stream)
    with count_traces() as traces:
        rest = list(stream)
    assert traces.count == 0                               # later batches reuse the compiled run
    for toks, got in zip(data, [first] + rest):
        ref = model.run(toks, capture=SITES).cache
        for s in SITES:
            want = np.asarray(ref[s]).reshape(12, -1)
            assert got[s].dtype == np.float32 and got[s].shape == want.shape
            np.testing.assert_allclose(got[s], want, atol=1e-6)
    assert first["blocks.1.attn.hook_z"].shape == (12, 16)


def test_drop_bos_and_bad_sites(model):
    data = batches(1)
    full = next(stream_activations(model, data, SITES[0]))[SITES[0]]
    kept = next(stream_activations(model, data, SITES[0], drop_bos=True))[SITES[0]]
    np.testing.assert_array_equal(kept, full[data[0].reshape(-1) != 1])
    assert len(kept) == 10
    with pytest.raises(SiteError, match="attention patterns"):
        next(stream_activations(model, data, "blocks.0.attn.hook_pattern"))
    with pytest.raises(SiteError, match="unknown site"):
        next(stream_activations(model, data, "blocks.9.hook_resid_post"))


def test_nan_activations_raise_naming_the_site(model):
    params = jax.tree.map(lambda a: a, model.params)
    params["blocks"]["W_up"] = params["blocks"]["W_up"].at[1].set(jnp.nan)
    broken = jfig.Model.from_config(model.config, params)
    ok = list(stream_activations(broken, batches(1), SITES[:2]))  # before the NaN
    assert len(ok) == 1
    with pytest.raises(ShapeError, match="blocks.1.hook_mlp_out.*NaN"):
        list(stream_activations(broken, batches(1), SITES))
    buf = ActivationBuffer(site="blocks.0.hook_resid_post")
    with pytest.raises(ShapeError, match="blocks.0.hook_resid_post"):
        buf.append(np.array([[1.0, np.inf]]))


# ---------------------------------------------------------------------------- buffers
def test_buffer_round_trip_on_disk_and_in_memory(model, tmp_path):
    chunks = [x[SITES[0]] for x in stream_activations(model, batches(5), SITES[0])]
    want = np.concatenate(chunks)
    disk = ActivationBuffer(tmp_path / "buf", site=SITES[0], shard_rows=25).extend(chunks)
    mem = ActivationBuffer(site=SITES[0]).extend(chunks)
    np.testing.assert_array_equal(disk.to_numpy(), want)
    np.testing.assert_array_equal(mem.to_numpy(), want)
    manifest = json.loads((tmp_path / "buf" / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [25, 25, 10]
    assert manifest["n_rows"] == 60 and manifest["d"] == 16 and manifest["site"] == SITES[0]
    assert not list((tmp_path / "buf").glob("*.tmp"))
    assert all(isinstance(a, np.memmap) for a in disk.shards())
    reopened = ActivationBuffer(tmp_path / "buf")
    assert (reopened.n_rows, reopened.d, reopened.site) == (60, 16, SITES[0])
    with reopened:                                           # flushes on exit
        reopened.append(want[:3])
    np.testing.assert_array_equal(ActivationBuffer(tmp_path / "buf").to_numpy(), np.concatenate([want, want[:3]]))
    with pytest.raises(ShapeError, match="d=16"):
        ActivationBuffer(tmp_path / "buf", d=8)
    with pytest.raises(ShapeError, match="width 3"):
        mem.append(np.zeros((2, 3)))
    with pytest.raises(JfigError, match="memory budget"):
        ActivationBuffer(memory_budget=100).append(np.zeros((10, 16)))


@pytest.mark.parametrize("budget", [1 << 30, 30 * 16 * 4])   # all in memory; shards visited a few at a time
def test_shuffled_batches_cover_every_row_once_per_epoch(tmp_path, budget):
    rows = np.repeat(np.arange(103, dtype=np.float32)[:, None], 4, axis=1)
    buf = ActivationBuffer(tmp_path, shard_rows=10, memory_budget=budget)
    for i in range(0, 103, 7):
        buf.append(rows[i:i + 7])
    out = list(buf.shuffled_batches(8, seed=0, epochs=2))
    assert [len(b) for b in out].count(8) == 24 and all(b.shape[1] == 4 for b in out)
    ids = np.concatenate(out)[:, 0].astype(int)
    assert sorted(ids[:103]) == list(range(103)) and sorted(ids[103:]) == list(range(103))
    assert not np.array_equal(ids[:103], np.arange(103))
    again = np.concatenate(list(buf.shuffled_batches(8, seed=0, epochs=2)))[:, 0]
    np.testing.assert_array_equal(again, ids)
    other = np.concatenate(list(buf.shuffled_batches(8, seed=1)))[:, 0]
    assert not np.array_equal(other, ids[:103])
    assert all(len(b) == 8 for b in buf.shuffled_batches(8, seed=0, drop_last=True))


def test_collect_activations_per_site_with_row_limit(model, tmp_path):
    bufs = collect_activations(model, batches(4), SITES[:2], tmp_path, max_rows=30, shard_rows=16)
    assert set(bufs) == set(SITES[:2])
    full = np.concatenate([x[SITES[1]] for x in stream_activations(model, batches(4), SITES[1])])
    assert bufs[SITES[1]].n_rows == 30 and (tmp_path / SITES[1] / "manifest.json").exists()
    np.testing.assert_array_equal(ActivationBuffer(tmp_path / SITES[1]).to_numpy(), full[:30])
