"""2x2 designs by intervention: two SAE features each set off or on, a readout in all four cells.

The design fits, per input m and readout r,

    y = A·F1 + B·F2 + C + D·F1·F2,        F1, F2 ∈ {0 (off), 1 (on)},

and the four cells give the four numbers exactly: C = y00, A = y10 − y00, B = y01 − y00 and
D = y11 − y10 − y01 + y00 (the interaction: how much more (or less) the two features do together
than the sum of what each does alone). D is in the readout's units; `gating` = D / (Δ_a·Δ_b), with
Δ the distance between a feature's on and off levels, is D per unit of each feature.

Relation to `jfig.measure.measure_gating(method="factorial")`: its per-input statistic is
[f_j(hi,hi) − f_j(hi,lo) − f_j(lo,hi) + f_j(lo,lo)] / (Δα_i·Δα_k) — exactly `gating` here for an
SAE-feature readout, with off = "low", the same (lo, hi) levels, the same clamp position (the
source's strongest) and the same inputs (tested on a planted gating model, where both equal g).
This module does not call it because it returns the contrast alone: the design needs the four cells
themselves (A, B and C), readouts it does not read (logits, logit differences, MLP neurons), off
levels it does not have ("absent", "opposite") and a null over random partners rather than random
directions.

Off levels (`off`), from the source document's 2x2 designs:

- ``"opposite"`` (what the document did): off is the feature "as low as possible", the low end of
  its encoder pre-activation (the `off_quantile` of the pre-activation over the tokens, usually
  negative), the SAE read before its activation function;
- ``"absent"`` (the document's "I could have opted for an 'absent' rather than an 'opposite'
  design"): off is 0, the feature removed;
- ``"low"``: the `off_quantile` of its non-zero activations (measure_gating's α_lo).

Each input is also split by whether each feature is naturally present (active) at the clamped
position: `by_presence` gives the interaction where a feature was absent from the input and set on
only by the intervention, and where it was present naturally.

Significance: per input D is a paired contrast; `p_sign` is the sign-flip test across inputs
(`jfig.stats.robust_pvalues`: the larger of the saddle-point sign-flip and the skewness-corrected t
p-value). `p_null` compares the pair's t statistic of D across inputs (mean / standard error: free
of the readout's and the partner's scale, which |D| is not) with those of `n_null` random partners:
feature a with random features of b's site (firing on these tokens, each at its own levels),
p = (1 + #{|t_null| ≥ |t|}) / (1 + n_null). A D that is the same on every input has |t| = ∞, a D
that is 0 on every input t = 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..edits import Clamp
from ..errors import JfigError
from ..models.model import Prefix
from ..saes.sae import SAE
from ..sites import block_site, site_key
from ..stats import robust_pvalues

OFF_LEVELS = ("absent", "low", "opposite")
READOUT_KINDS = ("feature", "logit", "neuron")
POSITION_CHOICES = ("max_a", "max_b", "last")


@dataclass(frozen=True)
class Readout:
    """What a design reads at the clamped position: an SAE feature (`site`, `index`), a next-token logit
    (`index`, minus the logit of `minus` for a logit difference) or an MLP neuron (`site` =
    blocks.{L}.mlp.hook_post, `index`)."""

    kind: str
    index: int
    site: str | None = None
    minus: int | None = None

    @property
    def label(self) -> str:
        if self.kind == "logit":
            return f"logit[{self.index}]" + ("" if self.minus is None else f" - logit[{self.minus}]")
        return f"{self.site}#{self.index}"


def feature_readout(site: str, feature: int) -> Readout:
    """Read SAE feature `feature` of the SAE at `site` (its activation)."""
    return Readout("feature", int(feature), site)


def logit_readout(token: int, minus: int | None = None) -> Readout:
    """Read the next-token logit of `token` (minus that of `minus`: a logit difference)."""
    return Readout("logit", int(token), None, None if minus is None else int(minus))


def neuron_readout(layer: int, neuron: int) -> Readout:
    """Read MLP hidden unit `neuron` of layer `layer` (blocks.{layer}.mlp.hook_post)."""
    return Readout("neuron", int(neuron), block_site(int(layer), "mlp.hook_post"))


@dataclass(frozen=True)
class FourCellFit:
    """y = A·F1 + B·F2 + C + D·F1·F2 fitted to four cells; each field has the cells' leading shape."""

    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: np.ndarray


def four_cell_fit(cells) -> FourCellFit:
    """The exact fit of the four cells `cells` [..., 2, 2] (indexed [F1, F2], 0 = off, 1 = on).

    >>> fit = four_cell_fit(np.array([[1.0, 3.0], [2.0, 10.0]]))
    >>> float(fit.A), float(fit.B), float(fit.C), float(fit.D)
    (1.0, 2.0, 1.0, 6.0)
    """
    y = np.asarray(cells, np.float64)
    if y.ndim < 2 or y.shape[-2:] != (2, 2):
        raise JfigError(f"four_cell_fit takes cells [..., 2, 2] (F1 off/on x F2 off/on), got shape {y.shape}")
    y00, y01, y10, y11 = y[..., 0, 0], y[..., 0, 1], y[..., 1, 0], y[..., 1, 1]
    return FourCellFit(A=y10 - y00, B=y01 - y00, C=y00, D=y11 - y10 - y01 + y00)


@dataclass(frozen=True)
class InterventionDesign:
    """A 2x2 intervention design of features a and b (M inputs, R readouts, Q random partners).

    cells [M, R, 2, 2]: the readout with a off/on (axis 2) and b off/on (axis 3). fit: the per-input
    FourCellFit ([M, R] each); A, B, C, D [R]: their means over inputs. gating [R]: D / (Δ_a·Δ_b).
    levels_a / levels_b: (off, on). inputs [M] rows of the tokens, positions [M] the clamped (and
    read) position, present [M, 2]: whether a / b fire there naturally. p_sign [R]: sign-flip test
    of D across inputs. t [R]: mean D over its standard error across inputs. null_features [Q] (b's
    site), null_D [Q, R] and null_t [Q, R] their mean D and t, p_null [R].
    """

    feature_a: tuple[str, int]
    feature_b: tuple[str, int]
    readouts: tuple[Readout, ...]
    off: str
    levels_a: tuple[float, float]
    levels_b: tuple[float, float]
    inputs: np.ndarray
    positions: np.ndarray
    present: np.ndarray
    cells: np.ndarray
    fit: FourCellFit
    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: np.ndarray
    gating: np.ndarray
    p_sign: np.ndarray
    t: np.ndarray
    null_features: np.ndarray
    null_D: np.ndarray
    null_t: np.ndarray
    p_null: np.ndarray

    def by_presence(self) -> dict:
        """{(a present, b present): (n inputs, mean D [R])}: the interaction split by which features
        fired naturally at the clamped position (mean D is NaN for an empty group)."""
        out = {}
        for pa_ in (False, True):
            for pb in (False, True):
                rows = (self.present[:, 0] == pa_) & (self.present[:, 1] == pb)
                mean = self.fit.D[rows].mean(0) if rows.any() else np.full(len(self.readouts), np.nan)
                out[(pa_, pb)] = (int(rows.sum()), mean)
        return out


# ------------------------------------------------------------------------------------------ checks

def check_feature(saes: dict, feature, what: str) -> tuple[str, int]:
    """(site, id) of an SAE feature given as (site, id), checked against the SAEs."""
    if not isinstance(feature, (tuple, list)) or len(feature) != 2:
        raise JfigError(f"{what} must be (site, feature id), got {feature!r}")
    site, f = feature
    if site not in saes:
        raise JfigError(f"{what}: no SAE at site {site!r}; SAEs are at {sorted(saes)}")
    if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not 0 <= int(f) < saes[site].d_sae:
        raise JfigError(f"{what}: feature {f!r} must be an int in [0, {saes[site].d_sae}) for the SAE at {site}")
    return str(site), int(f)


def check_readouts(model, saes: dict, readouts, start: str) -> tuple[Readout, ...]:
    """Readouts as a tuple, each known to the model and read at or after the first clamp site `start`."""
    if isinstance(readouts, Readout):
        readouts = (readouts,)
    readouts = tuple(readouts)
    if not readouts:
        raise JfigError("no readouts given; expected feature_readout / logit_readout / neuron_readout entries")
    for r in readouts:
        if not isinstance(r, Readout) or r.kind not in READOUT_KINDS:
            raise JfigError(f"readout {r!r} is not a Readout of kind {READOUT_KINDS}")
        if r.kind == "logit":
            v = model.vocab_size
            for t in (r.index, r.minus):
                if t is not None and v is not None and not 0 <= t < v:
                    raise JfigError(f"readout {r.label}: token {t} is outside the vocabulary [0, {v})")
            continue
        model.check_site(r.site)
        if site_key(r.site) < site_key(start):
            raise JfigError(f"readout {r.label} is read before the first clamped site {start}; expected a site at "
                            f"or after it")
        if r.kind == "feature":
            if r.site not in saes:
                raise JfigError(f"readout {r.label}: no SAE at {r.site}; SAEs are at {sorted(saes)}")
            if not 0 <= r.index < saes[r.site].d_sae:
                raise JfigError(f"readout {r.label}: feature out of range [0, {saes[r.site].d_sae})")
        else:
            width = model.site_width(r.site)
            if width is not None and not 0 <= r.index < width:
                raise JfigError(f"readout {r.label}: neuron out of range [0, {width})")
    return readouts


def readout_groups(readouts: tuple[Readout, ...]):
    """Static groups ((kind, site), ...) and per group (index [n], minus [n], readout positions [n])."""
    keys, rows = [], {}
    for r_i, r in enumerate(readouts):
        key = (r.kind, r.site)
        if key not in rows:
            keys.append(key)
            rows[key] = []
        rows[key].append(r_i)
    groups = []
    for key in keys:
        rs = rows[key]
        idx = np.asarray([readouts[i].index for i in rs], np.int32)
        minus = np.asarray([-1 if readouts[i].minus is None else readouts[i].minus for i in rs], np.int32)
        groups.append((idx, minus, np.asarray(rs)))
    return tuple(keys), groups


def bucket(arrays, n: int):
    """Pad 1-D arrays to length n by repeating their first entry (jit shapes by power-of-two buckets)."""
    return tuple(np.concatenate([a, np.repeat(a[:1], n - len(a))]) for a in arrays)


# ------------------------------------------------------------------------------------------ runs

def read_values(keys, saes_by_site: dict, idx, minus, out, rows, pos, read: str = "post"):
    """[M, n_readouts (padded, group after group)] from a RunOutput at positions pos [M] of rows; SAE
    features as activations (read "post") or encoder pre-activations ("pre")."""
    vals = []
    for (kind, site), i, mi in zip(keys, idx, minus):
        if kind == "logit":
            lg = out.logits[rows, pos]                                             # [M, V]
            v = jnp.take(lg, i, axis=-1) - jnp.where(mi >= 0, jnp.take(lg, jnp.maximum(mi, 0), axis=-1), 0.0)
        elif kind == "feature":
            sae, x = saes_by_site[site], out.cache[site][rows, pos]
            v = jnp.take(sae.encode(x) if read == "post" else sae.pre_activations(x), i, axis=-1)
        else:
            v = jnp.take(out.cache[site][rows, pos], i, axis=-1)
        vals.append(v)
    return jnp.concatenate(vals, axis=-1)


def clamp_edits(sae_a, sae_b, fa, fb, va, vb, positions):
    """Clamps that set a to va and b to vb: one Clamp of both at a shared site (the contrast of
    measure_gating's same-site path), else one per site."""
    if sae_b is None:
        return (Clamp(sae_a, jnp.stack([fa, fb]), jnp.stack([va, vb]), positions),)
    return Clamp(sae_b, fb, vb, positions), Clamp(sae_a, fa, va, positions)


@eqx.filter_jit
def _design_cells(model, sae_a, sae_b, read_saes, keys, idx, minus, start, stop, want_logits, read, acts, resid, kv,
                  tokens, pos, fa, fb, level_a, level_b):
    """Readouts [Q, 2, 2, M, n] for partners fb [Q] with levels level_b [Q, 2] (a: level_a [2]).

    Built-in models run the clamped position only (acts / resid [M, 1, d] from the clean prefix at
    `start`, kv its keys and values); models from functions run every position of tokens [M, S]."""
    M = pos.shape[0]
    rows = jnp.arange(M)
    capture = tuple(dict.fromkeys(s for k, s in keys if k != "logit"))

    def cell(b, va, vb):
        if tokens is None:
            edits = clamp_edits(sae_a, sae_b, fa, b, va, vb, None)
            out = model.run_suffix(Prefix(start, acts, resid, kv), edits=edits, capture=capture,
                                   stop_at=None if want_logits else stop, logits=want_logits, positions=pos[:, None])
            return read_values(keys, read_saes, idx, minus, out, rows, jnp.zeros_like(pos), read)
        mask = jax.nn.one_hot(pos, tokens.shape[1], dtype=bool)
        out = model.run(tokens, edits=clamp_edits(sae_a, sae_b, fa, b, va, vb, mask), capture=capture,
                        stop_at=None if want_logits else stop, logits=want_logits)
        return read_values(keys, read_saes, idx, minus, out, rows, pos, read)

    def partner(args):
        b, lb = args
        va = jnp.stack([level_a[0], level_a[0], level_a[1], level_a[1]])
        vb = jnp.stack([lb[0], lb[1], lb[0], lb[1]])
        y = jax.vmap(cell, in_axes=(None, 0, 0))(b, va, vb)                        # [4, M, n]
        return y.reshape(2, 2, *y.shape[1:])

    return jax.lax.map(partner, (fb, level_b))


# ------------------------------------------------------------------------------------------ levels

def site_values(model, saes: dict, sites, tokens, batch_size: int) -> dict:
    """{site: (post [N, S, d_sae], pre [N, S, d_sae])} over tokens, batch by batch (numpy)."""
    sites = sorted(set(sites), key=site_key)
    out = {s: ([], []) for s in sites}
    for b0 in range(0, tokens.shape[0], batch_size):
        run = model.run(tokens[b0:b0 + batch_size], capture=tuple(sites), stop_at=sites[-1], logits=False)
        for s in sites:
            pre = saes[s].pre_activations(run.cache[s])
            out[s][0].append(np.asarray(saes[s].encode(run.cache[s])))
            out[s][1].append(np.asarray(pre))
    return {s: (np.concatenate(p), np.concatenate(q)) for s, (p, q) in out.items()}


def feature_levels(post: np.ndarray, pre: np.ndarray, off: str, on_quantile: float, off_quantile: float):
    """[n, 2] (off, on) per column of post / pre [T, n]: on the `on_quantile` of the non-zero
    activations; off 0 ("absent"), the `off_quantile` of the non-zero activations ("low") or of the
    pre-activations ("opposite"). NaN for a column that never fires; an on level not above off (a feature
    with one constant value) is widened to off + max(|off|, 1)/2, as measure_gating's levels are."""
    nz = np.where(post > 0, post, np.nan)
    fires = (post > 0).any(0)
    safe = np.where(fires[None], nz, 1.0)
    on = np.where(fires, np.nanquantile(safe, on_quantile, axis=0), np.nan)
    if off == "absent":
        lo = np.zeros_like(on)
    elif off == "low":
        lo = np.where(fires, np.nanquantile(safe, off_quantile, axis=0), np.nan)
    else:
        lo = np.quantile(pre, off_quantile, axis=0)
    flat = np.isfinite(lo) & np.isfinite(on) & (on <= lo)        # one constant value: widen as measure_gating does
    on = np.where(flat, lo + np.maximum(np.abs(lo), 1.0) * 0.5, on)
    return np.stack([lo, on], axis=1)


def t_across_inputs(D: np.ndarray) -> np.ndarray:
    """[..., R] mean / standard error over inputs of D [..., M, R]: ±inf where D is one nonzero value on every
    input, 0 where it is 0 on every input."""
    mean, sd = D.mean(-2), D.std(-2, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = mean / (sd / np.sqrt(D.shape[-2]))
        flat = np.where(mean != 0, np.copysign(np.inf, mean), 0.0)
    return np.where(sd > 1e-12 * np.maximum(np.abs(mean), 1e-30), t, flat)


def choose_positions(fa: np.ndarray, fb: np.ndarray, positions, skip: int, n_inputs: int, seed: int):
    """(rows [M], positions [M]) from a's and b's activations [N, S]: the strongest position of a ("max_a")
    or b ("max_b") at or after `skip` in rows where it fires, the last position ("last"), or one given
    position per row (int [N]); at most n_inputs rows, a seeded choice."""
    N, S = fa.shape
    if isinstance(positions, str):
        if positions not in POSITION_CHOICES:
            raise JfigError(f"positions must be one of {POSITION_CHOICES} or int [n_rows], got {positions!r}")
        if positions == "last":
            rows, pos = np.arange(N), np.full(N, S - 1)
        else:
            f = (fa if positions == "max_a" else fb)[:, skip:]
            rows = np.flatnonzero(f.max(1) > 0)
            pos = f[rows].argmax(1) + skip
            if not rows.size:
                raise JfigError(f"feature {'a' if positions == 'max_a' else 'b'} never fires at positions >= {skip} "
                                f"of these tokens; give tokens where it fires, or positions='last'")
    else:
        pos = np.asarray(positions)
        if pos.shape != (N,) or not np.issubdtype(pos.dtype, np.integer) or ((pos < 0) | (pos >= S)).any():
            raise JfigError(f"positions must be int [n_rows={N}] in [0, {S}), got {pos.dtype} {pos.shape}")
        rows = np.arange(N)
    if rows.size > n_inputs:
        keep = np.sort(np.random.default_rng(seed).choice(rows.size, n_inputs, replace=False))
        rows, pos = rows[keep], pos[keep]
    return rows.astype(np.int32), pos.astype(np.int32)


# ------------------------------------------------------------------------------------------ the design

def intervention_design(model, saes, feature_a, feature_b, readouts, tokens, *, off: str = "opposite",
                        on_quantile: float = 0.9, off_quantile: float = 0.1, levels=None, positions="max_a",
                        skip_positions: int = 1, n_inputs: int = 32, n_null: int = 16, null_pool=None,
                        read: str = "post", values: dict | None = None, prefix: Prefix | None = None,
                        batch_size: int = 16, seed: int = 0) -> InterventionDesign:
    """A 2x2 intervention design of SAE features a = (site, id) and b = (site, id) on `readouts`.

    Each input (a row of tokens [N, S]) is clamped at one position (`positions`: a's strongest
    position at or after `skip_positions`, b's, the last one, or int [N]) with a and b at their off
    or on levels (module docstring; `levels` ((a_off, a_on), (b_off, b_on)) overrides them), and
    every readout is read there in the four cells (SAE-feature readouts as activations, read "post",
    or encoder pre-activations, "pre", as measure_gating's `read`). Up to `n_inputs` rows. `n_null` random partners
    of a (features of b's site that fire on these tokens, or drawn from `null_pool`, ids) give the
    null of |mean D|; 0 skips it (p_null NaN). Returns InterventionDesign ([M, R] per input, [R]).

    Many designs on the same tokens share two passes: `values`, `site_values(model, saes, sites, tokens)`
    for the two features' sites, and `prefix`, `model.prefix(tokens, start, cache=True)` at the earlier
    of the two sites (built-in models); each is computed here when not given.
    """
    if off not in OFF_LEVELS:
        raise JfigError(f"off must be one of {OFF_LEVELS}, got {off!r}")
    if read not in ("post", "pre"):
        raise JfigError(f"read must be 'post' or 'pre', got {read!r}")
    for name, q in (("on_quantile", on_quantile), ("off_quantile", off_quantile)):
        if not 0.0 <= q <= 1.0:
            raise JfigError(f"{name} must be in [0, 1], got {q}")
    if n_inputs < 2:
        raise JfigError(f"n_inputs must be >= 2 (a test across inputs), got {n_inputs}")
    if n_null < 0:
        raise JfigError(f"n_null must be >= 0 random partners, got {n_null}")
    if levels is not None:
        lv = np.asarray(levels, np.float64)
        if lv.shape != (2, 2) or not np.isfinite(lv).all():
            raise JfigError(f"levels must be finite ((a_off, a_on), (b_off, b_on)), got {levels!r}")
    saes = model.check_saes(saes)
    site_a, fa = check_feature(saes, feature_a, "feature_a")
    site_b, fb = check_feature(saes, feature_b, "feature_b")
    if (site_a, fa) == (site_b, fb):
        raise JfigError(f"feature_a and feature_b are the same feature {site_a}#{fa}; a 2x2 design needs two")
    for s in (site_a, site_b):
        if not isinstance(saes[s], SAE):
            raise JfigError(f"the dictionary at {s} is a {type(saes[s]).__name__}; intervention designs clamp SAE "
                            f"features at their own site")
    start, later = sorted((site_a, site_b), key=site_key)
    readouts = check_readouts(model, saes, readouts, start)
    tokens = np.asarray(model.check_tokens(tokens))
    if values is None:
        values = site_values(model, saes, (site_a, site_b), tokens, batch_size)
    for s in (site_a, site_b):
        if s not in values or values[s][0].shape[:2] != tokens.shape or values[s][1].shape != values[s][0].shape:
            raise JfigError(f"values must hold (post, pre) [{tokens.shape[0]}, {tokens.shape[1]}, d_sae] for site {s} "
                            f"(site_values of these tokens)")
    if prefix is not None and (prefix.site != start or prefix.cache is None or prefix.acts.shape[:2] != tokens.shape):
        raise JfigError(f"prefix must be model.prefix(tokens, {start!r}, cache=True) of these "
                        f"{tokens.shape[0]} x {tokens.shape[1]} tokens")
    rows, pos = choose_positions(values[site_a][0][..., fa], values[site_b][0][..., fb], positions, skip_positions,
                                 n_inputs, seed)
    if rows.size < 2:
        raise JfigError(f"only {rows.size} input(s) qualify for this design; expected at least 2")

    post_b, pre_b = (v.reshape(-1, v.shape[-1]) for v in values[site_b])
    rng = np.random.default_rng(seed + 1)
    pool = np.flatnonzero((post_b > 0).any(0)) if null_pool is None else np.unique(np.asarray(null_pool, np.int64))
    pool = pool[(pool != fb) & ~((pool == fa) & (site_a == site_b))]
    null_ids = rng.choice(pool, min(n_null, pool.size), replace=False) if n_null > 0 and pool.size else \
        np.zeros(0, np.int64)
    partners = np.concatenate([[fb], null_ids]).astype(np.int64)
    post_a, pre_a = (v.reshape(-1, v.shape[-1])[:, [fa]] for v in values[site_a])
    lv_a = feature_levels(post_a, pre_a, off, on_quantile, off_quantile)[0]
    lv_b = feature_levels(post_b[:, partners], pre_b[:, partners], off, on_quantile, off_quantile)
    if levels is not None:
        lv_a, lv_b[0] = lv[0], lv[1]
    if not np.isfinite(lv_a).all() or not np.isfinite(lv_b[0]).all():
        raise JfigError(f"feature {'a' if not np.isfinite(lv_a).all() else 'b'} never fires on these tokens, so it "
                        f"has no on level; give tokens where it fires or explicit levels")
    keep = np.isfinite(lv_b).all(1)
    keep[0] = True
    partners, lv_b = partners[keep], lv_b[keep]

    keys, groups = readout_groups(readouts)
    width = max(8, 1 << int(np.ceil(np.log2(max(len(g[0]) for g in groups)))))
    idx = tuple(jnp.asarray(bucket(g[:2], width)[0]) for g in groups)
    minus = tuple(jnp.asarray(bucket(g[:2], width)[1]) for g in groups)
    want_logits = any(k == "logit" for k, _ in keys)
    stop = max((s for k, s in keys if k != "logit"), key=site_key, default=None)
    read_saes = {s: saes[s] for k, s in keys if k == "feature"}
    toks = tokens[rows]
    if model.apply_fn is None:
        if prefix is None:
            pre, r = model.prefix(toks, start, cache=True), np.arange(rows.size)
        else:
            pre, r = prefix, rows
        acts = pre.acts[r, pos][:, None]
        resid = None if pre.resid is None else pre.resid[r, pos][:, None]
        kv, run_tokens = type(pre.cache)(pre.cache.k[:, r], pre.cache.v[:, r]), None
    else:
        acts = resid = kv = None
        run_tokens = jnp.asarray(toks)
    y = np.asarray(_design_cells(model, saes[site_a], None if site_a == site_b else saes[site_b], read_saes, keys,
                                 idx, minus, start, stop, want_logits, read, acts, resid, kv, run_tokens,
                                 jnp.asarray(pos), jnp.int32(fa), jnp.asarray(partners, jnp.int32),
                                 jnp.asarray(lv_a, jnp.float32), jnp.asarray(lv_b, jnp.float32)), np.float64)
    # y [Q, 2, 2, M, groups x width] -> [Q, M, R, 2, 2] in readout order
    cols = np.concatenate([g * width + np.arange(len(gr[0])) for g, gr in enumerate(groups)])
    order = np.concatenate([gr[2] for gr in groups])
    y = y[..., cols]
    y = y[..., np.argsort(order)]
    cells = np.moveaxis(y, (1, 2), (-2, -1))                                      # [Q, M, R, 2, 2]
    if not np.isfinite(cells).all():
        raise JfigError("the design's runs gave NaN or infinite readouts; check the levels and the model")
    fits = four_cell_fit(cells)
    D_all = fits.D.mean(1)                                                        # [Q, R]
    fit = FourCellFit(*(x[0] for x in (fits.A, fits.B, fits.C, fits.D)))
    R = len(readouts)
    p_sign = robust_pvalues(fit.D[None], np.ones((1, rows.size)))[0]
    t_all = np.nan_to_num(t_across_inputs(fits.D), nan=0.0, posinf=np.inf, neginf=-np.inf)  # [Q, R]
    null_D, null_t = D_all[1:], t_all[1:]
    p_null = ((1.0 + (np.abs(null_t) >= np.abs(t_all[0])[None] * (1 - 1e-9)).sum(0)) / (1.0 + len(null_t))
              if len(null_t) else np.full(R, np.nan))
    present = np.stack([values[site_a][0][rows, pos, fa] > 0, values[site_b][0][rows, pos, fb] > 0], axis=1)
    span = (lv_a[1] - lv_a[0]) * (lv_b[0, 1] - lv_b[0, 0])
    return InterventionDesign(
        feature_a=(site_a, fa), feature_b=(site_b, fb), readouts=readouts, off=off,
        levels_a=(float(lv_a[0]), float(lv_a[1])), levels_b=(float(lv_b[0, 0]), float(lv_b[0, 1])), inputs=rows,
        positions=pos, present=present, cells=cells[0], fit=fit, A=fit.A.mean(0), B=fit.B.mean(0),
        C=fit.C.mean(0), D=D_all[0], gating=D_all[0] / span if span != 0 else np.full(R, np.nan), p_sign=p_sign,
        t=t_all[0], null_features=partners[1:], null_D=null_D, null_t=null_t, p_null=p_null)
