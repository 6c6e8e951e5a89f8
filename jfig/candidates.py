"""Candidate feature pairs for causal measurement: the pruning strategies of seed 000 §4.

    cands = select_candidates(atlas, saes, model=model, tokens=tokens, top_k=200, window=5)
    cands.pairs      # pyarrow.Table: source_site, source, target_site, target, statistics
    print(cands.report)

The filters, applied in the order of seed 000 §4.6, each to the survivors of the last:

1. layer window (§4.5): source site strictly before the target site, 0 <= layer(t) - layer(s) <= window;
2. importance (§4.4): per site, the top_k features by firing rate x downstream causal effect, the
   effect being the mean absolute change in next-token loss (or the KL of the next-token
   distribution) per activation when the feature is ablated where it is active;
3. co-activation (§4.2): P(j | i) >= min_coact (and PMI >= min_pmi), plus, with keep_low_coact, pairs
   that co-activate significantly *less* than independence predicts (candidate inhibition);
4. decoder alignment (§4.3): |cos(e_j, d_i)| >= min_alignment for pairs where the target SAE reads
   the residual stream the source writes to, within alignment_window layers; other pairs pass.

`report` gives the number of pairs before and after each step (the §4.6 table with real counts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from .edits import Ablate
from .errors import JfigError, ShapeError
from .models.model import Prefix
from .sites import RESIDUAL_BASIS, parse_site

RESIDUAL_STREAM = frozenset({"hook_resid_pre", "hook_resid_mid", "hook_resid_post"})


# ---------------------------------------------------------------------------------- report

@dataclass
class Report:
    """Pairs before and after each filter; `str(report)` is a table."""

    rows: list[dict] = field(default_factory=list)  # step, before, after, note

    def add(self, step: str, before: int, after: int, note: str = "") -> None:
        self.rows.append(dict(step=step, before=int(before), after=int(after), note=note))

    def as_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=pa.schema(
            [("step", pa.string()), ("before", pa.int64()), ("after", pa.int64()), ("note", pa.string())]))

    def __str__(self) -> str:
        w = max([len(r["step"]) for r in self.rows] + [4])
        lines = [f"{'step':{w}s} {'before':>14s} {'after':>14s} {'kept':>8s}  note"]
        for r in self.rows:
            kept = f"{100 * r['after'] / r['before']:.3g}%" if r["before"] else "-"
            lines.append(f"{r['step']:{w}s} {r['before']:14,d} {r['after']:14,d} {kept:>8s}  {r['note']}".rstrip())
        return "\n".join(lines)

    __repr__ = __str__


@dataclass
class Candidates:
    """Selected (source_site, source, target_site, target) pairs with their statistics (`pairs`),
    the per-feature importance table (`features`) and the pruning `report`."""

    pairs: pa.Table
    features: pa.Table
    report: Report
    settings: dict

    def __len__(self) -> int:
        return self.pairs.num_rows

    def _col(self, name):
        return self.pairs.column(name).to_numpy(zero_copy_only=False)

    @property
    def source_site(self) -> np.ndarray:
        return self._col("source_site")

    @property
    def source(self) -> np.ndarray:
        return self._col("source")

    @property
    def target_site(self) -> np.ndarray:
        return self._col("target_site")

    @property
    def target(self) -> np.ndarray:
        return self._col("target")


# ---------------------------------------------------------------------------------- importance

@partial(jax.jit, static_argnames=("site", "kind", "builtin"))
def _ablation_chunk(model, sae, acts, resid, tokens, rowmask, base_logits, feats, *, site, kind, builtin):
    """For each feature in `feats [c]`: (sum over tokens of |Δ next-token loss| or KL, active count)."""
    f_src = sae.encode(acts)                                                     # [b, s, d_sae]
    base = jax.nn.log_softmax(base_logits.astype(jnp.float32), axis=-1)          # [b, s, V]
    nxt = tokens[:, 1:, None]
    base_nll = -jnp.take_along_axis(base[:, :-1], nxt, axis=-1)[..., 0]          # [b, s-1]

    def one(f):
        mask = (f_src[..., f] > 0) & rowmask[:, None]                            # [b, s]
        edit = Ablate(sae, f, positions=mask)
        if builtin:
            logits = model.run_suffix(Prefix(site, acts, resid), edits=(edit,), logits=True).logits
        else:
            logits = model.run(tokens, edits=(edit,)).logits
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        if kind == "kl":
            d = jnp.sum(jnp.exp(base) * (base - logp), axis=-1)                 # [b, s]
        else:
            d = jnp.abs(-jnp.take_along_axis(logp[:, :-1], nxt, axis=-1)[..., 0] - base_nll)
        return jnp.sum(d * rowmask[:, None]), jnp.sum(mask)
    return jax.vmap(one)(feats)


def ablation_effects(model, sae, tokens, features, *, kind: str = "loss", batch_size: int = 8,
                     chunk: int | None = None, memory_budget: int = 1 << 30,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Downstream causal effect of ablating each feature where it is active.

    For feature i: ablate i (error-preserving clamp to 0) at every position where it is active,
    and sum over all next-token predictions of ``|loss_ablated - loss|`` (kind="loss") or of
    ``KL(p || p_ablated)`` (kind="kl"); divide by the number of active positions. Returns
    ``(effect [n], n_active [n])``; effect is nan where the feature never fires on `tokens`.
    Features are vmapped in chunks (sized to `memory_budget` when `chunk` is None); built-in
    models run the prefix to the SAE site once per batch and vmap only the suffix.
    """
    if kind not in ("loss", "kl"):
        raise ValueError(f"kind must be 'loss' or 'kl', got {kind!r}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.shape[1] < 2:
        raise ShapeError(f"tokens must be an int array [n_seq, seq >= 2], got {tokens.dtype} {tokens.shape}")
    feats = np.asarray(features, np.int32).reshape(-1)
    builtin = model.config is not None
    b = min(batch_size, len(tokens))
    if chunk is None:
        per = b * tokens.shape[1] * (4 * (model.vocab_size or 1) + 64 * sae.d_in) * 4
        chunk = max(1, min(len(feats), memory_budget // per))
    totals, counts = np.zeros(len(feats)), np.zeros(len(feats), np.int64)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=-(-len(tokens) // b) * len(feats), desc=f"ablation {sae.site}", unit="feature")
    for r in range(0, len(tokens), b):
        tb = tokens[r:r + b]
        rows = len(tb)
        tb = jnp.asarray(np.concatenate([tb, np.zeros((b - rows, tb.shape[1]), tb.dtype)]), jnp.int32)
        rowmask = jnp.arange(b) < rows
        base_logits = model.run(tb).logits
        if builtin:
            pre = model.prefix(tb, sae.site)
            acts, resid = pre.acts, pre.resid
        else:
            acts, resid = model.run(tb, capture=(sae.site,), logits=False).cache[sae.site], None
        for c in range(0, len(feats), chunk):
            fc = feats[c:c + chunk]
            padded = jnp.asarray(np.concatenate([fc, np.full(chunk - len(fc), fc[0], np.int32)]))
            tot, n = _ablation_chunk(model, sae, acts, resid, tb, rowmask, base_logits, padded,
                                     site=sae.site, kind=kind, builtin=builtin)
            totals[c:c + len(fc)] += np.asarray(tot)[:len(fc)]
            counts[c:c + len(fc)] += np.asarray(n)[:len(fc)]
            if bar is not None:
                bar.update(len(fc))
    if bar is not None:
        bar.close()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / counts, np.nan), counts


@partial(jax.jit, static_argnames=("site",))
def _attribution_batch(model, sae, tb, rowmask, feats, *, site):
    from .edits import Steer

    def loss(delta):
        logits = model.run(tb, edits=(Steer(site, delta, 1.0),)).logits
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
        nll = -jnp.take_along_axis(logp, tb[:, 1:, None], -1)[..., 0]
        return (nll * rowmask[:, None]).sum()

    acts = model.run(tb, capture=(site,), stop_at=site).cache[site]
    g = jax.grad(loss)(jnp.zeros_like(acts))                              # dLoss/dh at the site
    f, stats = sae.encode_with_stats(acts)
    f = jnp.take(f, feats, -1) * rowmask[:, None, None]                   # [b, s, n]
    dirs = jax.vmap(lambda i: sae.decode_direction(i, stats))(feats)      # [n, ..., d]
    dirs = jnp.broadcast_to(dirs.reshape(len(feats), *dirs.shape[1:-1], -1), (len(feats),) + acts.shape[:2] + (-1,)) \
        if dirs.ndim > 2 else jnp.broadcast_to(dirs[:, None, None, :], (len(feats),) + acts.shape)
    lin = jnp.einsum("bsd,nbsd->bsn", g.reshape(*acts.shape[:2], -1), dirs.reshape(len(feats), *acts.shape[:2], -1))
    per_seq = jnp.abs((lin * f).sum(1))                                   # |first-order Δloss| per sequence
    return per_seq.sum(0), (f > 0).sum((0, 1))


def attribution_effects(model, sae, tokens, features, *, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """First-order estimate of `ablation_effects(kind="loss")` from one backward pass per batch.

    For feature i and each sequence, the change in total next-token loss from ablating i at its
    active positions is estimated as Σ_p (∂loss/∂h_p) · (f_i,p d_i) (attribution patching); the
    effect is Σ over sequences of its absolute value, divided by i's active positions. Exact when
    the model is linear in the site; otherwise a fast ranking proxy for the ablation effect.
    """
    tokens = np.asarray(tokens)
    feats = jnp.asarray(np.asarray(features, np.int32).reshape(-1))
    b = min(batch_size, len(tokens))
    totals, counts = np.zeros(len(feats)), np.zeros(len(feats), np.int64)
    for r in range(0, len(tokens), b):
        tb = tokens[r:r + b]
        rows = len(tb)
        tb = jnp.asarray(np.concatenate([tb, np.zeros((b - rows, tb.shape[1]), tb.dtype)]), jnp.int32)
        tot, n = _attribution_batch(model, sae, tb, (jnp.arange(b) < rows).astype(jnp.float32), feats,
                                    site=sae.site)
        totals += np.asarray(tot)
        counts += np.asarray(n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / counts, np.nan), counts


# ---------------------------------------------------------------------------------- alignment

def alignment_applies(source_site: str, target_site: str) -> bool:
    """Whether a direct residual path exists: the source writes into the residual stream and the
    target SAE reads the residual stream, later in the forward pass."""
    s, t = parse_site(source_site), parse_site(target_site)
    return (s.layer < 0 or s.local in RESIDUAL_BASIS) and t.local in RESIDUAL_STREAM and s < t


def decoder_alignment(source_sae, target_sae, sources=None, targets=None) -> tuple[np.ndarray, np.ndarray]:
    """Direct-path alignment ``e_j · d_i`` and its cosine, ``[n_sources, n_targets]`` each.

    d_i is the source's decode direction (``W_dec[i]``, unit-normalised for topk SAEs with
    ``rescale_acts_by_decoder_norm``); e_j is the direction the target's pre-activation reads
    (``W_enc[:, j]``, times ``||W_dec[j]||`` when rescaling, centred when the target SAE centres or
    layer-normalises its input). Residual-stream SAEs read the residual with no model norm in
    between, so this is the whole direct term: adding a·d_i at the source changes pre_j by
    a·(e_j·d_i) (times the target's positive per-token input scale, if it normalises).
    """
    if source_sae.d_in != target_sae.d_in:
        raise ShapeError(f"decoder alignment needs equal widths: {source_sae.site} d_in {source_sae.d_in}, "
                         f"{target_sae.site} d_in {target_sae.d_in}")
    D = np.asarray(source_sae.W_dec, np.float64)
    D = D if sources is None else D[np.asarray(sources)]
    if source_sae.rescale_acts_by_decoder_norm:
        D = D / np.linalg.norm(D, axis=1, keepdims=True)
    E = np.asarray(target_sae.W_enc, np.float64)
    if target_sae.rescale_acts_by_decoder_norm:
        E = E * np.linalg.norm(np.asarray(target_sae.W_dec, np.float64), axis=1)[None, :]
    E = E if targets is None else E[:, np.asarray(targets)]
    if target_sae.center_input or target_sae.normalize_activations == "layer_norm":
        E = E - E.mean(axis=0, keepdims=True)
    dot = D @ E
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / np.outer(np.linalg.norm(D, axis=1), np.linalg.norm(E, axis=0))
    return dot, np.nan_to_num(cos)


# ---------------------------------------------------------------------------------- selection

def _importance(atlas, sae, model, tokens, kind, pool, batch_size, chunk, progress):
    """Per tracked feature of sae.site: (rate, effect, importance); effect nan where not measured."""
    site = sae.site
    rate = atlas.firing_rate(site)[atlas.features[site]]
    if kind == "rate":
        return rate, np.full_like(rate, np.nan), rate.copy()
    order = np.argsort(-rate, kind="stable")
    measured = order[rate[order] > 0][:pool]
    effect = np.full_like(rate, np.nan)
    if len(measured) and kind == "attribution":
        effect[measured], _ = attribution_effects(model, sae, tokens, atlas.features[site][measured],
                                                  batch_size=batch_size)
    elif len(measured):
        effect[measured], _ = ablation_effects(model, sae, tokens, atlas.features[site][measured], kind=kind,
                                               batch_size=batch_size, chunk=chunk, progress=progress)
    return rate, effect, rate * effect


def select_candidates(atlas, saes, *, model=None, tokens=None, top_k: int = 200, min_coact: float = 0.01,
                      min_pmi: float | None = None, keep_low_coact: bool = True, low_coact_p: float = 1e-3,
                      min_alignment: float | None = None, alignment_window: int | None = 1, window: int = 5,
                      importance: str = "loss", importance_pool: int | None = None, batch_size: int = 8,
                      chunk: int | None = None, progress: bool = False) -> Candidates:
    """Candidate pairs by importance, co-activation (incl. low co-activation), decoder alignment and
    layer window (seed 000 §4); see the module docstring and docs/atlas.md.

    importance: "loss" or "kl" (firing rate x ablation effect, needs `model` and `tokens`; without
      them the firing rate alone is used and the report says so), "attribution" (the same effect
      estimated to first order from one backward pass per batch: fast, for CPU runs) or "rate".
    importance_pool: per site, how many of the most frequent tracked features get their ablation
      effect measured (default 4 x top_k); the others have no importance and are not selected.
    min_alignment: threshold on |cos(e_j, d_i)| (default 2/sqrt(d_in), two standard deviations of
      the cosine of random directions); alignment_window: apply it only where the layer distance is
      at most this (None: everywhere it applies).
    """
    saes = {s.site: s for s in (saes.values() if isinstance(saes, dict) else saes)}
    for site in atlas.sites:
        if site not in saes:
            raise JfigError(f"no SAE given for atlas site {site}; got SAEs at {sorted(saes)}")
        if saes[site].d_sae != atlas.d_sae[site]:
            raise ShapeError(f"SAE at {site} has d_sae {saes[site].d_sae}; the atlas was built with "
                             f"{atlas.d_sae[site]}")
    if window > atlas.settings["window"]:
        raise JfigError(f"window {window} exceeds the atlas's layer window {atlas.settings['window']}")
    note = ""
    if importance in ("loss", "kl", "attribution") and (model is None or tokens is None):
        importance, note = "rate", "firing rate only (no model/tokens given)"
    elif importance not in ("loss", "kl", "attribution", "rate"):
        raise ValueError(f"importance must be 'loss', 'kl', 'attribution' or 'rate', got {importance!r}")
    pool = 4 * top_k if importance_pool is None else importance_pool

    feat_rows, chosen = [], {}
    for site in atlas.sites:
        rate, effect, imp = _importance(atlas, saes[site], model, tokens, importance, pool, batch_size, chunk,
                                        progress)
        score = np.where(np.isnan(imp), -np.inf, imp)
        order = np.argsort(-score, kind="stable")
        chosen[site] = np.sort(order[np.isfinite(score[order])][:top_k])      # tracked positions
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        sel = np.zeros(len(order), bool)
        sel[chosen[site]] = True
        feat_rows.append(pa.table(dict(site=[site] * len(rate), feature=atlas.features[site], firing_rate=rate,
                                       effect=effect, importance=imp, rank=rank, selected=sel)))

    layer = {s: parse_site(s).layer for s in atlas.sites}
    order_of = {s: i for i, s in enumerate(atlas.sites)}
    all_pairs = sum(atlas.d_sae[a] * atlas.d_sae[b] for a in atlas.sites for b in atlas.sites
                    if order_of[a] < order_of[b])
    site_pairs = [(a, b) for a, b in atlas.pairs if a != b and layer[b] - layer[a] <= window]
    n_window = sum(atlas.d_sae[a] * atlas.d_sae[b] for a, b in site_pairs)
    n_tracked = sum(len(atlas.features[a]) * len(atlas.features[b]) for a, b in site_pairs)
    n_imp = sum(len(chosen[a]) * len(chosen[b]) for a, b in site_pairs)
    n_high = n_low = n_applied = 0
    parts = []
    for a, b in site_pairs:
        ra, rb = chosen[a], chosen[b]
        if not len(ra) or not len(rb):
            continue
        co = atlas.coactivation(a, b)[np.ix_(ra, rb)]
        p_cond = atlas.conditional_probability(a, b)[np.ix_(ra, rb)]
        pmi = atlas.pmi(a, b)[np.ix_(ra, rb)]
        expected = atlas.expected_coactivation(a, b)[np.ix_(ra, rb)]
        with np.errstate(invalid="ignore"):
            high = (p_cond >= min_coact) & ((pmi >= min_pmi) if min_pmi is not None else True)
        p_low = atlas.low_coactivation_pvalue(a, b, ra, rb)
        low = keep_low_coact & ~high & (co < expected) & (p_low <= low_coact_p)
        n_high, n_low = n_high + int(high.sum()), n_low + int(low.sum())
        keep = high | low
        fa, fb = atlas.features[a][ra], atlas.features[b][rb]
        dot = cos = np.full(co.shape, np.nan)
        applies = alignment_applies(a, b) and saes[a].d_in == saes[b].d_in and (
            alignment_window is None or layer[b] - layer[a] <= alignment_window)
        if alignment_applies(a, b) and saes[a].d_in == saes[b].d_in:
            dot, cos = decoder_alignment(saes[a], saes[b], fa, fb)
        if applies:
            thr = 2.0 / math.sqrt(saes[b].d_in) if min_alignment is None else min_alignment
            n_applied += int(keep.sum())
            keep &= np.abs(cos) >= thr
        i, j = np.nonzero(keep)
        imp_a = feat_rows[order_of[a]].column("importance").to_numpy()[ra]
        imp_b = feat_rows[order_of[b]].column("importance").to_numpy()[rb]
        parts.append(pa.Table.from_pydict(dict(
            source_site=[a] * len(i), source=fa[i], target_site=[b] * len(i), target=fb[j],
            layer_distance=np.full(len(i), layer[b] - layer[a]), low_coactivation=low[i, j], count=co[i, j],
            p_cond=p_cond[i, j], pmi=pmi[i, j], p_low=p_low[i, j], alignment=dot[i, j], alignment_cos=cos[i, j],
            source_importance=imp_a[i], target_importance=imp_b[j]), schema=PAIR_SCHEMA))
    pairs = pa.concat_tables(parts) if parts else _empty_pairs()

    report = Report()
    report.add("all pairs (source site before target site)", all_pairs, all_pairs, f"{len(atlas.sites)} sites")
    report.add(f"layer window (0 <= dlayer <= {window})", all_pairs, n_window, f"{len(site_pairs)} site pairs")
    if n_tracked != n_window:
        report.add("tracked by the atlas", n_window, n_tracked, "features with pair statistics")
    report.add(f"importance (top {top_k} per site, {importance})", n_tracked, n_imp, note)
    coact = f"co-activation (P(j|i) >= {min_coact:g}" + (f", PMI >= {min_pmi:g}" if min_pmi is not None else "")
    coact += f"; low co-activation p <= {low_coact_p:g})" if keep_low_coact else ")"
    report.add(coact, n_imp, n_high + n_low, f"{n_high} co-active, {n_low} low co-activation")
    thr_note = "2/sqrt(d_in)" if min_alignment is None else f"{min_alignment:g}"
    where = "all" if alignment_window is None else f"dlayer <= {alignment_window}"
    report.add(f"decoder alignment (|cos| >= {thr_note}, {where})", n_high + n_low, len(pairs),
               f"applied to {n_applied} residual-stream pairs; others pass")
    settings = dict(top_k=top_k, min_coact=min_coact, min_pmi=min_pmi, keep_low_coact=keep_low_coact,
                    low_coact_p=low_coact_p, min_alignment=min_alignment, alignment_window=alignment_window,
                    window=window, importance=importance, importance_pool=pool)
    return Candidates(pairs=pairs, features=pa.concat_tables(feat_rows), report=report, settings=settings)


PAIR_SCHEMA = pa.schema([("source_site", pa.string()), ("source", pa.int64()), ("target_site", pa.string()),
                         ("target", pa.int64()), ("layer_distance", pa.int64()), ("low_coactivation", pa.bool_()),
                         ("count", pa.int64()), ("p_cond", pa.float64()), ("pmi", pa.float64()),
                         ("p_low", pa.float64()), ("alignment", pa.float64()), ("alignment_cos", pa.float64()),
                         ("source_importance", pa.float64()), ("target_importance", pa.float64())])


def _empty_pairs() -> pa.Table:
    return pa.table(dict(source_site=pa.array([], pa.string()), source=pa.array([], pa.int64()),
                         target_site=pa.array([], pa.string()), target=pa.array([], pa.int64()),
                         layer_distance=pa.array([], pa.int64()), low_coactivation=pa.array([], pa.bool_()),
                         count=pa.array([], pa.int64()), p_cond=pa.array([], pa.float64()),
                         pmi=pa.array([], pa.float64()), p_low=pa.array([], pa.float64()),
                         alignment=pa.array([], pa.float64()), alignment_cos=pa.array([], pa.float64()),
                         source_importance=pa.array([], pa.float64()), target_importance=pa.array([], pa.float64())))
