"""Clamp sweep: jfig against the hook loops a TransformerLens/SAELens user writes in PyTorch.

    python benchmarks/bench_clamp.py [--sources 16] [--inputs 8] [--seq 64] [--d-sae 4096]
                                     [--model M | --random-weights] [--precision default|highest]

Same weights (SmolLM2-135M GGUF; PyTorch side via HF transformers loading the same file; with
`--random-weights` or `--model FOLDER`, both sides load the same HF folder),
same SAEs (random TopK, source at blocks.8.hook_resid_post, target at blocks.12.hook_resid_post),
same inputs and clamp levels. Loops:
  (a) one PyTorch forward per source x input x level, a forward hook on layer 8 that clamps the
      feature (error-preserving) where it fires, one on layer 12 that encodes the target SAE;
      layers after 12 and the unembedding are dropped (as TransformerLens's stop_at_layer does);
  (b) the same, batched over inputs: one forward per source x level.
The PyTorch side runs on CUDA when torch sees a GPU. Answers are checked equal: the 99.9th
percentile of |jfig - torch| must be within --tol of the largest effect (a few single values may
jump further where a target feature sits at the edge of its SAE's top k), else the script exits 2.
`--precision default` times both frameworks at their float32 matmul default on a GPU made equal
(TF32 for jax's default; torch is told to allow TF32 too); `highest` makes both exact float32.
FLOPs counted are the minimal work: layers 9..12 on every token of every edited run, plus the
target encoder.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from random_checkpoint import DEFAULT_MODEL, add_model_args, describe, model_arg


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
    ap.add_argument("--torch-budget", type=float, default=None,
                    help="seconds the two per-input PyTorch loops may take together; if a timed forward says they "
                         "would take longer, they run on the first sources only and their times are scaled up")
    ap.add_argument("--precision", choices=("default", "highest"), default="default",
                    help="float32 matmul precision of both frameworks (default: each one's GPU default, TF32 on both)")
    ap.add_argument("--tol", type=float, default=None,
                    help="allowed 99.9th percentile of |jfig - torch| relative to the largest effect "
                         "(default 1e-3 with --precision highest or on a CPU, 5e-2 with TF32 on a GPU)")
    add_model_args(ap)
    a = ap.parse_args()
    if a.precision == "highest":
        jax.config.update("jax_default_matmul_precision", "highest")

    import jfig
    from jfig.measure import engine
    from jfig.measure.prefix import prefix_pass
    name = model_arg(a)
    model = jfig.load_model(name)
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
    print(f"jfig (prefix once, vmapped suffix): {t_jfig:.3f} s", flush=True)
    disagree = []

    if not a.skip_torch:
        import torch
        torch.set_grad_enabled(False)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        on_gpu = dev.type == "cuda" and jax.default_backend() == "gpu"
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = a.precision == "default"
            torch.backends.cudnn.allow_tf32 = a.precision == "default"
        tol = a.tol if a.tol is not None else (5e-2 if on_gpu and a.precision == "default" else 1e-3)
        hf = load_torch_model(name).to(dev)
        hf.model.layers = hf.model.layers[:13]                   # stop after layer 12
        body = hf.model                                          # the base model: no unembedding

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize()

        T = lambda x: torch.from_numpy(np.array(x)).to(dev)  # noqa: E731
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
        tok_t = torch.from_numpy(np.array(tokens)).long().to(dev)
        vals_np = np.asarray(vals)

        def effect_for(c, batch_idx):
            res = []
            for alpha in (hi, lo):
                state.update(feat=int(feats[c]), alpha=alpha)
                body(tok_t[batch_idx], use_cache=False)
                res.append(state["read"])
            m = torch.from_numpy((vals_np[batch_idx, :, c] > 0).astype(np.float32)).to(dev)
            diff = (res[0] - res[1]) / (hi - lo)
            return ((m.unsqueeze(-1) * diff).sum(1) / m.sum(1, keepdim=True).clamp(min=1)).cpu().numpy()

        def single_effect_for(c, m):                             # clamp at p, read at p (one input)
            res = []
            for alpha in (hi, lo):
                state.update(feat=int(feats[c]), alpha=alpha, single=True)
                body(tok_t[[m]], use_cache=False)
                res.append(state["read"])
            state["single"] = False
            p = int(np.argmax(vals_np[m, :, c]))
            return ((res[0] - res[1]) / (hi - lo))[:, p].cpu().numpy()

        print(f"PyTorch {torch.__version__} on {dev}"
              f"{' (' + torch.cuda.get_device_name(dev) + ')' if dev.type == 'cuda' else ''}, float32 matmul "
              f"precision {a.precision}; {2 * C * a.inputs} forwards per loop", flush=True)
        single_effect_for(0, 0)                                  # warm-up (CUDA kernels, allocator)
        effect_for(0, list(range(a.inputs)))
        sync()
        t = time.perf_counter()
        for _ in range(3):
            single_effect_for(0, 0)
        sync()
        per_call = (time.perf_counter() - t) / 3                 # two forwards (one per level)
        Ct = C
        if a.torch_budget and 2 * C * a.inputs * per_call > a.torch_budget:
            Ct = max(1, int(a.torch_budget / (2 * a.inputs * per_call)))
        scale_t = C / Ct                                         # sources are independent: time is linear in them
        print(f"PyTorch: {1e3 * per_call / 2:.2f} ms per forward (batch 1); loops (a) and single-position "
              f"projected at {2 * C * a.inputs * per_call:.1f} s together"
              + (f"; they run on the first {Ct} of {C} sources (--torch-budget {a.torch_budget:g} s) and their "
                 f"times are scaled by {C}/{Ct}" if Ct < C else ""), flush=True)
        sparse1_t, jfig_per_input_t = sparse1[:Ct], jfig_per_input[:Ct]
        sync()
        t = time.perf_counter()
        loop_c = np.stack([np.concatenate([single_effect_for(c, m) for m in range(a.inputs)]) for c in range(Ct)])
        sync()
        t_c = (time.perf_counter() - t) * scale_t
        err_c = np.abs(loop_c - sparse1_t).max()
        print(f"single-position clamps: PyTorch loop (one forward per source x input x level, stopped after "
              f"layer 12) {t_c:.3f} s; jfig position-sparse {t_sparse1:.3f} s -> {t_c / t_sparse1:.1f}x; "
              f"jfig full suffix -> {t_c / t_full1:.1f}x; max |jfig - torch| {err_c:.2e}", flush=True)
        disagree += check("single-position clamps", loop_c, sparse1_t, tol)

        sync()
        t = time.perf_counter()
        loop_a = np.stack([np.concatenate([effect_for(c, [m]) for m in range(a.inputs)]) for c in range(Ct)])
        sync()
        t_a = (time.perf_counter() - t) * scale_t
        print(f"PyTorch loop (a): {t_a:.3f} s", flush=True)
        t = time.perf_counter()
        loop_b = np.stack([effect_for(c, list(range(a.inputs))) for c in range(Ct)])
        sync()
        t_b = (time.perf_counter() - t) * scale_t
        print(f"PyTorch loop (b): {t_b:.3f} s", flush=True)
        for h in hooks:
            h.remove()
        err = max(np.abs(loop_a - jfig_per_input_t).max(), np.abs(loop_b - jfig_per_input_t).max())
        disagree += check("all-position clamps, loop (a)", loop_a, jfig_per_input_t, tol)
        disagree += check("all-position clamps, loop (b)", loop_b, jfig_per_input_t, tol)
        worst = np.unravel_index(np.argmax(np.abs(loop_a - jfig_per_input_t)), loop_a.shape)
        print(f"largest gap at (source, input, target) {tuple(int(x) for x in worst)}: jfig "
              f"{jfig_per_input_t[worst]:.4g}, torch {loop_a[worst]:.4g}; 99.9th percentile of gaps "
              f"{np.quantile(np.abs(loop_a - jfig_per_input_t), 0.999):.2e}")
        scale = np.abs(loop_a).max()
        rows += [("PyTorch loop (a): one forward per source x input x level", t_a),
                 ("PyTorch loop (b): batched over inputs", t_b)]
        print(f"answers: max |jfig - torch| = {err:.2e} (max |effect| {scale:.2e})")
    print(f"machine: {platform.machine()}, {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          f"{C} sources x {a.inputs} inputs x 2 levels, seq {a.seq}, d_sae {a.d_sae} (TopK k={a.k}); "
          f"model {describe(name)}; float32 matmul precision {a.precision}")
    print(f"{'what':58s} {'seconds':>8s} {'interv/s':>10s} {'vs (a)':>8s}")
    t_a = dict(rows).get("PyTorch loop (a): one forward per source x input x level")
    for name, sec in rows:
        ratio = f"{t_a / sec:7.1f}x" if t_a else ""
        print(f"{name:58s} {sec:8.3f} {n_interv / sec:10.1f} {ratio:>8s}")
    print(f"jfig achieved {flops / t_jfig / 1e9:.1f} GFLOP/s of minimal work; measured f32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s -> {100 * flops / t_jfig / peak:.0f}% of peak")
    if disagree:
        print("ANSWERS DISAGREE: " + "; ".join(disagree))
        sys.exit(2)
    if not a.skip_torch:
        print("answers agree (jfig and PyTorch, within tolerance)")


def check(what, torch_vals, jfig_vals, tol) -> list[str]:
    """[] when the 99.9th percentile of |torch - jfig| is within `tol` of the largest |effect|, else
    [a line saying by how much it is not]; prints the comparison either way."""
    gap = np.abs(torch_vals - jfig_vals)
    scale = max(float(np.abs(torch_vals).max()), 1e-30)
    q = float(np.quantile(gap, 0.999))
    ok = bool(np.isfinite(gap).all()) and q <= tol * scale
    print(f"check {what}: 99.9th percentile of |jfig - torch| {q:.2e}, max {gap.max():.2e}, max |effect| "
          f"{scale:.2e} -> {'ok' if ok else 'FAIL'} (tolerance {tol:g} x max |effect|)", flush=True)
    return [] if ok else [f"{what}: {q:.2e} > {tol:g} x {scale:.2e}"]


def load_torch_model(name: str):
    """The HF transformers model of the weights jfig loaded: the same HF folder, or the same GGUF file."""
    import torch
    from pathlib import Path
    from transformers import AutoModelForCausalLM
    path = Path(name)
    if name == DEFAULT_MODEL or name.lower() in ("smollm2-135m-instruct", "default"):
        from jfig.models.default_model import default_gguf_path
        path = default_gguf_path()
    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


if __name__ == "__main__":
    main()
