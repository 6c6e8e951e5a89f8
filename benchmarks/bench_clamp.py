"""Clamp sweep: jfig against the hook loops a TransformerLens/SAELens user writes in PyTorch.

    python benchmarks/bench_clamp.py [--sources 16] [--inputs 8] [--seq 64] [--d-sae 4096]

Same weights (SmolLM2-135M GGUF; PyTorch side via HF transformers loading the same file),
same SAEs (random TopK, source at blocks.8.hook_resid_post, target at blocks.12.hook_resid_post),
same inputs and clamp levels. Loops:
  (a) one PyTorch forward per source x input x level, a forward hook on layer 8 that clamps the
      feature (error-preserving) where it fires, one on layer 12 that encodes the target SAE;
      layers after 12 are dropped (as TransformerLens's stop_at_layer does);
  (b) the same, batched over inputs: one forward per source x level.
Answers are checked equal. FLOPs counted are the minimal work: layers 9..12 on every token of
every edited run, plus the target encoder.
"""
from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak(n=2048, reps=10) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(a).block_until_ready()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def minimal_flops(cfg, n_runs, seq, d_sae, layers=4) -> float:
    d, hq, hk, f = cfg.d_model, cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head, cfg.d_mlp
    per_tok_layer = 2 * (d * hq + 2 * d * hk + hq * d + 3 * d * f) + 2 * 2 * seq * hq / 2
    return n_runs * seq * (layers * per_tok_layer + 2 * d * d_sae)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=16)
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--skip-torch", action="store_true")
    a = ap.parse_args()

    import jfig
    from jfig.measure import engine
    from jfig.measure.prefix import prefix_pass
    model = jfig.load_model("smollm2-135m")
    cfg = model.config
    src_site, tgt_site = "blocks.8.hook_resid_post", "blocks.12.hook_resid_post"
    sae_s = jfig.SAE.init_random(jax.random.PRNGKey(0), cfg.d_model, a.d_sae, src_site, "topk", k=a.k)
    sae_t = jfig.SAE.init_random(jax.random.PRNGKey(1), cfg.d_model, a.d_sae, tgt_site, "topk", k=a.k)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (a.inputs, a.seq)), jnp.int32)
    acts, _, vals_all, kv = prefix_pass(model, sae_s, np.arange(a.d_sae), tokens, a.inputs, True, cache=True)
    fires = np.asarray((vals_all > 0).sum((0, 1)))
    feats = np.argsort(-fires)[: a.sources]                   # sources that fire on these inputs
    vals = vals_all[..., feats]
    lo, hi = 1.0, 4.0
    plan = engine.Plan(src_site, (tgt_site,), "clamp", "same", "all_active", True)
    C = a.sources
    idx = jnp.tile(jnp.arange(a.inputs)[None], (C, 1))
    w = jnp.ones((C, a.inputs))
    tcols = (jnp.arange(a.d_sae, dtype=jnp.int32),)
    args = (model, plan, sae_s, (sae_t,), tcols, acts, None, None, vals, idx, w, jnp.arange(C, dtype=jnp.int32),
            jnp.asarray(feats, jnp.int32), jnp.full(C, lo), jnp.full(C, hi), True)

    def run_jfig():
        out = engine.chunk_effects(*args)
        jax.block_until_ready(out[1])
        return out

    out = run_jfig()
    reps = 3
    t = time.perf_counter()
    for _ in range(reps):
        out = run_jfig()
    t_jfig = (time.perf_counter() - t) / reps
    jfig_per_input = np.asarray(out[3])                       # [C, M, d_sae]

    def timed(plan_single, kv_all):                           # one clamp position per input, read there
        args1 = (model, plan_single, *args[2:], kv_all)
        jax.block_until_ready(engine.chunk_effects(*args1)[1])
        t0 = time.perf_counter()
        for _ in range(reps):
            res = engine.chunk_effects(*args1)
            jax.block_until_ready(res[1])
        return (time.perf_counter() - t0) / reps, np.asarray(res[3])

    t_full1, full1 = timed(engine.Plan(src_site, (tgt_site,), "clamp", "same", "single", True, sparse=False), None)
    t_sparse1, sparse1 = timed(engine.Plan(src_site, (tgt_site,), "clamp", "same", "single", True), kv)
    print(f"single-position clamps: full suffix {t_full1:.3f} s, position-sparse suffix {t_sparse1:.3f} s "
          f"({t_full1 / t_sparse1:.1f}x); max |difference| {np.abs(full1 - sparse1).max():.2e} "
          f"(max |effect| {np.abs(full1).max():.2e})")
    n_interv = C * a.inputs                                   # source-feature interventions (each = 2 levels)
    flops = minimal_flops(cfg, 2 * n_interv, a.seq, a.d_sae)
    peak = matmul_peak()
    rows = [("jfig (prefix once, vmapped suffix)", t_jfig)]

    if not a.skip_torch:
        import torch
        from transformers import AutoModelForCausalLM
        from jfig.models.default_model import default_gguf_path
        torch.set_grad_enabled(False)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        p = default_gguf_path()
        hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
        hf.model.layers = hf.model.layers[:13]                   # stop after layer 12
        T = lambda x: torch.from_numpy(np.asarray(x))  # noqa: E731
        We_s, be_s, Wd_s, bd_s = T(sae_s.W_enc), T(sae_s.b_enc), T(sae_s.W_dec), T(sae_s.b_dec)
        We_t, be_t, bd_t = T(sae_t.W_enc), T(sae_t.b_enc), T(sae_t.b_dec)

        def topk_encode(x, We, be, bd, k):
            pre = (x - bd) @ We + be
            v, i = pre.topk(k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, i, v.relu())

        state = {}

        def clamp_hook(mod, inp, output):
            h = output[0] if isinstance(output, tuple) else output
            f = topk_encode(h, We_s, be_s, bd_s, a.k)[..., state["feat"]]
            mask = (f > 0).float().unsqueeze(-1)
            if state.get("single"):                              # only the source's strongest position
                one = torch.nn.functional.one_hot(f.argmax(-1), f.shape[-1]).float()
                mask = (one * (f > 0).any(-1, keepdim=True).float()).unsqueeze(-1)
            h = h + mask * (state["alpha"] - f).unsqueeze(-1) * Wd_s[state["feat"]]
            return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

        def read_hook(mod, inp, output):
            h = output[0] if isinstance(output, tuple) else output
            state["read"] = topk_encode(h, We_t, be_t, bd_t, a.k)

        hooks = [hf.model.layers[8].register_forward_hook(clamp_hook),
                 hf.model.layers[12].register_forward_hook(read_hook)]
        tok_t = torch.from_numpy(np.asarray(tokens)).long()
        vals_np = np.asarray(vals)

        def effect_for(c, batch_idx):
            res = []
            for alpha in (hi, lo):
                state.update(feat=int(feats[c]), alpha=alpha)
                hf(tok_t[batch_idx])
                res.append(state["read"])
            m = torch.from_numpy((vals_np[batch_idx, :, c] > 0).astype(np.float32))
            diff = (res[0] - res[1]) / (hi - lo)
            return ((m.unsqueeze(-1) * diff).sum(1) / m.sum(1, keepdim=True).clamp(min=1)).numpy()

        def single_effect_for(c, m):                             # clamp at p, read at p (one input)
            res = []
            for alpha in (hi, lo):
                state.update(feat=int(feats[c]), alpha=alpha, single=True)
                hf(tok_t[[m]])
                res.append(state["read"])
            state["single"] = False
            p = int(np.argmax(vals_np[m, :, c]))
            return ((res[0] - res[1]) / (hi - lo))[:, p].numpy()

        t = time.perf_counter()
        loop_c = np.stack([np.concatenate([single_effect_for(c, m) for m in range(a.inputs)]) for c in range(C)])
        t_c = time.perf_counter() - t
        err_c = np.abs(loop_c - sparse1).max()
        print(f"single-position clamps: PyTorch loop (one forward per source x input x level, stopped after "
              f"layer 12) {t_c:.3f} s; jfig position-sparse {t_sparse1:.3f} s -> {t_c / t_sparse1:.1f}x; "
              f"jfig full suffix -> {t_c / t_full1:.1f}x; max |jfig - torch| {err_c:.2e}")

        t = time.perf_counter()
        loop_a = np.stack([np.concatenate([effect_for(c, [m]) for m in range(a.inputs)]) for c in range(C)])
        t_a = time.perf_counter() - t
        t = time.perf_counter()
        loop_b = np.stack([effect_for(c, list(range(a.inputs))) for c in range(C)])
        t_b = time.perf_counter() - t
        for h in hooks:
            h.remove()
        err = max(np.abs(loop_a - jfig_per_input).max(), np.abs(loop_b - jfig_per_input).max())
        worst = np.unravel_index(np.argmax(np.abs(loop_a - jfig_per_input)), loop_a.shape)
        print(f"largest gap at (source, input, target) {tuple(int(x) for x in worst)}: jfig "
              f"{jfig_per_input[worst]:.4g}, torch {loop_a[worst]:.4g}; 99.9th percentile of gaps "
              f"{np.quantile(np.abs(loop_a - jfig_per_input), 0.999):.2e}")
        scale = np.abs(loop_a).max()
        rows += [("PyTorch loop (a): one forward per source x input x level", t_a),
                 ("PyTorch loop (b): batched over inputs", t_b)]
        print(f"answers: max |jfig - torch| = {err:.2e} (max |effect| {scale:.2e})")
    print(f"machine: {platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          f"{C} sources x {a.inputs} inputs x 2 levels, seq {a.seq}, d_sae {a.d_sae} (TopK k={a.k})")
    print(f"{'what':58s} {'seconds':>8s} {'interv/s':>10s} {'vs (a)':>8s}")
    t_a = dict(rows).get("PyTorch loop (a): one forward per source x input x level")
    for name, sec in rows:
        ratio = f"{t_a / sec:7.1f}x" if t_a else ""
        print(f"{name:58s} {sec:8.3f} {n_interv / sec:10.1f} {ratio:>8s}")
    print(f"jfig achieved {flops / t_jfig / 1e9:.1f} GFLOP/s of minimal work; measured f32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s -> {100 * flops / t_jfig / peak:.0f}% of peak")


if __name__ == "__main__":
    main()
