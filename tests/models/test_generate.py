"""Generation through the one forward with a KV cache: greedy parity with full runs, cached logits,
steered generation, absolute edit positions, position-sparse suffixes, no retracing, errors."""
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfig
from jfig.errors import JfigError
from jfig.models.forward import empty_cache
from jfig.models.generate import generate, run_positions
from tests.support.tiny_models import tiny_model

PROMPTS = [[3, 7, 9], [5], [1, 4, 4, 8, 30, 12]]
N_NEW = 7
WIDTH = 32   # reruns are right-padded to one width: one compile per edit setting


def lively(family):
    """A tiny model whose greedy paths do not just repeat a token (the embedding is scaled down)."""
    m = tiny_model(family, scale=0.3, max_seq_len=64)
    params = dict(m.params, embed=m.params["embed"] * (0.03 if family == "gemma2" else 0.3))
    return jfig.Model.from_config(m.config, params)


@pytest.fixture(scope="module", params=["llama", "gpt2", "gemma2"])
def model(request):
    return lively(request.param)


def greedy_by_rerunning(model, prompt, n, edits=()):
    """Greedy continuation by a full model.run of the whole sequence per new token."""
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, WIDTH), np.int32)
        padded[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(model.run(padded, edits=edits).logits[0, len(seq) - 1])))
    return seq[len(prompt):]


@contextmanager
def count_traces():
    """Counts jaxpr traces (jit compilations) inside the block: yields a list, one entry per trace."""
    seen = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            seen.append(event)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_greedy_equals_argmax_of_full_runs_with_ragged_prompts(model):
    assert model.config.sliding_window is None or model.config.sliding_window < len(PROMPTS[2]) + N_NEW
    out = model.generate(PROMPTS, N_NEW)
    longest = max(map(len, PROMPTS))
    assert out.shape == (3, longest + N_NEW)
    for row, p in zip(out, PROMPTS):
        assert row[longest - len(p):longest].tolist() == p and (row[:longest - len(p)] == -1).all()
        assert row[longest:].tolist() == greedy_by_rerunning(model, p, N_NEW)
    assert any(len(set(r[longest:].tolist())) > 2 for r in out)   # not a degenerate repeat-one-token path


def test_rectangular_prompts_are_returned_with_their_continuation():
    model = lively("llama")
    toks = jnp.asarray([[4, 9, 13], [2, 40, 7]])
    out = model.generate(toks, 4)
    assert out.shape == (2, 7) and (out[:, :3] == np.asarray(toks)).all()
    assert model.generate(toks[0], 2).shape == (1, 5)
    assert (model.generate(toks, 0) == np.asarray(toks)).all()


def test_cached_step_logits_match_full_run_logits(model):
    gen = generate(model, PROMPTS, N_NEW, return_logits=True)
    longest = max(map(len, PROMPTS))
    for row, p in enumerate(PROMPTS):
        seq = np.asarray(gen.tokens[row, longest - len(p):])[None]
        full = model.run(seq).logits[0]
        np.testing.assert_allclose(gen.logits[row], full[len(p) - 1:-1], atol=1e-5, rtol=1e-5)


def test_position_sparse_suffix_equals_full_run(model):
    """Run positions >= p against a cache of positions < p: the general mechanism behind generation."""
    cfg, toks = model.config, jnp.asarray([[4, 9, 13, 2, 40, 7, 7, 21, 3, 11]])
    site = "blocks.1.hook_resid_post"
    steer = jfig.Steer(site, jnp.linspace(-1, 1, cfg.d_model), 2.0)
    for edits in [(), (steer,)]:
        full = model.run(toks, edits=edits).logits[0]
        p, s = 6, toks.shape[1]
        run = jax.jit(run_positions, static_argnums=0)
        _, cache = run(cfg, model.params, toks[:, :p], jnp.arange(p)[None], empty_cache(cfg, 1, 16), edits)
        got, _ = run(cfg, model.params, toks[:, p:], jnp.arange(p, s)[None], cache, edits)
        np.testing.assert_allclose(got[0], full[p:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["steer", "clamp"])
def test_steered_generation_equals_argmax_of_edited_full_runs(model, kind):
    cfg, site = model.config, "blocks.1.hook_resid_post"
    if kind == "steer":
        edit = jfig.Steer(site, jax.random.normal(jax.random.PRNGKey(3), (cfg.d_model,)), 8.0)
    else:
        sae = jfig.SAE.init_random(jax.random.PRNGKey(5), cfg.d_model, 32, site)
        edit = jfig.Clamp(sae, 7, 12.0)
    steered = model.generate(PROMPTS, N_NEW, edits=(edit,))
    plain = model.generate(PROMPTS, N_NEW)
    for row, p in zip(steered, PROMPTS):
        assert row[-N_NEW:].tolist() == greedy_by_rerunning(model, p, N_NEW, edits=(edit,))
    assert (steered != plain).any()


def test_edit_positions_are_absolute_positions():
    """A steer at position 5 edits the prompt position 5 of a long row and the 3rd new token of a
    3-token row, exactly as a full run of each row's sequence with the same edit does."""
    model = lively("llama")
    cfg = model.config
    edit = jfig.Steer("blocks.0.hook_resid_post", jax.random.normal(jax.random.PRNGKey(1), (cfg.d_model,)), 8.0,
                      positions=[5])
    out = model.generate(PROMPTS, N_NEW, edits=jfig.Compose(edit))
    for row, p in zip(out, PROMPTS):
        assert row[-N_NEW:].tolist() == greedy_by_rerunning(model, p, N_NEW, edits=(edit,))
    assert (out != model.generate(PROMPTS, N_NEW)).any()
    mask = np.zeros(WIDTH, bool)
    mask[[2, 6]] = True
    masked = jfig.Steer(edit.site, edit.direction, 8.0, positions=mask)
    out = model.generate(PROMPTS, N_NEW, edits=(masked,))
    for row, p in zip(out, PROMPTS):
        assert row[-N_NEW:].tolist() == greedy_by_rerunning(model, p, N_NEW, edits=(masked,))


def test_a_step_is_traced_once_per_shape():
    m = lively("llama")
    sae = jfig.SAE.init_random(jax.random.PRNGKey(5), 16, 32, "blocks.1.hook_resid_post")
    m.generate([[3, 4], [5, 6, 7]], 9, edits=(jfig.Clamp(sae, 1, 3.0),))
    with count_traces() as traces:
        m.generate([[8, 1, 2], [9]], 9, edits=(jfig.Clamp(sae, 4, -2.0),), temperature=0.7, top_k=5, seed=3)
        m.generate([[8, 1, 2], [9]], 12, edits=(jfig.Clamp(sae, 2, 1.0),), seed=4)   # more steps, same buckets
    assert traces == []


def test_sampling_is_seeded():
    m = lively("llama")
    a = m.generate(PROMPTS, 10, temperature=1.0, seed=0)
    assert (a == m.generate(PROMPTS, 10, temperature=1.0, seed=0)).all()
    assert (a != m.generate(PROMPTS, 10, temperature=1.0, seed=1)).any()
    assert (m.generate(PROMPTS, 6, temperature=1.0, top_k=1, seed=5) == m.generate(PROMPTS, 6)).all()


def test_errors():
    m = lively("gpt2")

    def apply(params, tokens, hook):
        return hook("embed", params["E"][tokens]) @ params["E"].T
    opaque = jfig.Model.from_function(apply, {"E": jnp.eye(8)}, sites=("embed",), vocab_size=8)
    with pytest.raises(JfigError, match="built-in model.*Model.from_function"):
        opaque.generate([[1, 2]], 3)
    with pytest.raises(JfigError, match="hook_pattern"):
        m.generate([[1, 2]], 3, edits=(jfig.Patch("blocks.0.attn.hook_pattern", 0.0),))
    with pytest.raises(JfigError, match="one position"):
        m.generate([[1, 2]], 3, edits=(jfig.Patch("blocks.0.hook_resid_post", jnp.zeros((2, 16))),))
    with pytest.raises(jfig.errors.ShapeError, match="exceeds the model's 64 positions"):
        m.generate([[1] * 60], 10)
    with pytest.raises(jfig.errors.ShapeError, match="outside the vocabulary"):
        m.generate([[1, 99]], 3)
    with pytest.raises(JfigError, match="top_k"):
        m.generate([[1, 2]], 3, top_k=0)


def test_steered_step_logits_equal_a_run_with_the_same_edit(model):
    """Each new token's logits under a Steer edit equal the logits of a full model.run of the
    generated sequence with the same edit, at the position that token was picked from."""
    cfg, site = model.config, "blocks.2.hook_resid_post"
    edit = jfig.Steer(site, jax.random.normal(jax.random.PRNGKey(11), (cfg.d_model,)), 6.0)
    prompt = PROMPTS[2]
    out = generate(model, [prompt], N_NEW, edits=(edit,), return_logits=True)
    seq = out.tokens[0]
    full = np.asarray(model.run(seq[None, :-1], edits=(edit,)).logits[0])
    np.testing.assert_allclose(out.logits[0], full[len(prompt) - 1:], atol=2e-4, rtol=2e-4)
    plain = np.asarray(model.run(seq[None, :-1]).logits[0])
    assert np.abs(plain[len(prompt) - 1:] - out.logits[0]).max() > 0.1      # the edit does move the logits
