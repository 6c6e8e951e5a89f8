"""`jfig adversarial --graph DIR`: feature pairs of a saved graph that rarely fire together but interact
strongly (jfig.interactions.adversarial), token-swap searches that make them fire together, and what
their co-occurrence does to the next-token prediction.

Pairs: the graph's first-order edges ranked by |weight| × −log P̂(co-occurrence) from the atlas beside the
graph, keeping pairs that co-occur no more often than independence predicts (`max_ratio`), skipping
features that fire only on the sequence-start token (no position to search at) and using each feature in
at most `per_feature` pairs, so a few hub features do not fill the list. Or pairs named with --pair.

Starts: windows of the graph's own corpus (rebuilt from the manifest's options and checked against its
fingerprint) ending where one of the two features fires most strongly (the atlas's top contexts),
alternately the source's and the target's: the sequence-start token, then the `window` − 1 tokens up to
that position p (or the first `window` tokens when p is earlier).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..atlas import Atlas
from ..data import tokens_from
from ..data.files import atomic_write_text, fingerprint
from ..errors import JfigError, SiteError
from ..graph import load_graph
from ..interactions.adversarial import (FIRST_ORDER, adversarial_pairs, output_effects, search_pair,
                                        special_token_ids)
from ..models.registry import load_model
from ..saes import load_sae_ref
from .analysis import find_atlas
from .behavior import cached_saes_for
from .view import ViewSources, check_model, check_sources

log = logging.getLogger(__name__)


@dataclass
class AdversarialOptions:
    """What `jfig adversarial` searches (command-line options)."""

    pairs: int = 8                      # pairs searched, from the top of the ranking
    steps: int = 20                     # greedy steps per pair
    starts: int = 4                     # starting windows per pair (alternately the source's and target's contexts)
    window: int = 16                    # tokens per window, the sequence-start token included
    top_k: int = 8                      # tokens per position kept by linear score
    candidates: int = 16                # swaps evaluated exactly per window and step
    temperature: float = 0.5            # of the soft minimum of the two margins
    max_ratio: float | None = 1.0       # keep pairs with (C + 1/2) / (expected + 1/2) <= this (None: all)
    per_feature: int = 1                # pairs a feature may appear in
    kinds: tuple = FIRST_ORDER
    explicit: tuple = ()                # ((source_site, source, target_site, target), ...) from --pair
    top_tokens: int = 5
    corpus: str = "default"             # the text the graph was built on (checked against its fingerprint)
    seed: int = 0

    def check(self) -> None:
        for name, lo in (("pairs", 1), ("steps", 1), ("starts", 1), ("window", 2), ("top_k", 1), ("candidates", 1),
                         ("per_feature", 1), ("top_tokens", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo:
                raise JfigError(f"--{name.replace('_', '-')} must be an int >= {lo}, got {v!r}")
        if not self.temperature > 0:
            raise JfigError(f"--temperature must be > 0, got {self.temperature}")
        if self.max_ratio is not None and not self.max_ratio > 0:
            raise JfigError(f"--max-ratio must be > 0, got {self.max_ratio}")


def parse_pair(text: str) -> tuple[str, int, str, int]:
    """'SITE:I,SITE:J' (source first) -> (site, i, site, j); JfigError naming the expected form."""
    parts = [p.strip() for p in str(text).split(",")]
    out = []
    for p in parts:
        site, _, feat = p.rpartition(":")
        if len(parts) != 2 or not site or not feat.strip().lstrip("-").isdigit():
            raise JfigError(f"--pair {text!r}: expected SOURCE_SITE:FEATURE,TARGET_SITE:FEATURE, e.g. "
                            f"blocks.10.hook_resid_post:12,blocks.14.hook_resid_post:40")
        out += [site, int(feat)]
    return tuple(out)


def start_only(atlas: Atlas, site: str, feature: int) -> bool:
    """True when the atlas saw the feature fire, and every top context it kept is at position 0."""
    ctx = atlas.contexts(site, int(feature))
    return bool(ctx) and all(c["position"] == 0 for c in ctx)


def _explicit_rows(ranked_all: pa.Table, opts: AdversarialOptions, sae_widths: dict) -> pa.Table:
    keys = list(zip(*(ranked_all[c].to_pylist() for c in ("source_site", "source", "target_site", "target"))))
    rows = []
    for ss, s, ts, t in opts.explicit:
        for site, f in ((ss, s), (ts, t)):
            if site not in sae_widths:
                raise SiteError(f"--pair site {site!r} has no SAE in this graph; its SAE sites are "
                                f"{sorted(sae_widths)}")
            if not 0 <= f < sae_widths[site]:
                raise JfigError(f"--pair feature {site}:{f} is out of range: the SAE there has d_sae "
                                f"{sae_widths[site]} (expected 0 <= feature < {sae_widths[site]})")
        if (ss, s, ts, t) not in keys:
            raise JfigError(f"--pair {ss}:{s},{ts}:{t} is not a {'/'.join(opts.kinds)} edge of the graph with atlas "
                            f"statistics (source first; see the ranking with --pairs instead)")
        rows.append(keys.index((ss, s, ts, t)))
    return ranked_all.take(pa.array(rows, pa.int64()))


def select_pairs(graph, atlas: Atlas, opts: AdversarialOptions, exclude=()) -> tuple[pa.Table, list[str]]:
    """(ADVERSARIAL_SCHEMA rows to search, notes): --pair pairs, or the top of the ranking (module docstring);
    `exclude`: (site, feature) ends a ranked pair must not have (e.g. those of pairs already chosen)."""
    widths = {s["site"]: int(s["d_sae"]) for s in graph.manifest.get("saes", [])}
    if opts.explicit:
        ranked = adversarial_pairs(atlas, graph.edges, kinds=opts.kinds)
        return _explicit_rows(ranked, opts, widths), [f"{len(opts.explicit)} pair(s) named with --pair"]
    ranked = adversarial_pairs(atlas, graph.edges, kinds=opts.kinds, max_ratio=opts.max_ratio)
    notes = [f"{ranked.num_rows:,} {'/'.join(opts.kinds)} edges with atlas counts"
             + (f" co-occur at most {opts.max_ratio:g}x as often as independence predicts" if opts.max_ratio else "")]
    uses: dict = {tuple(e): opts.per_feature for e in exclude}
    skipped_start, skipped_repeat, keep = set(), 0, []
    start_cache: dict = {}
    for r, row in enumerate(ranked.select(["source_site", "source", "target_site", "target"]).to_pylist()):
        ends = ((row["source_site"], row["source"]), (row["target_site"], row["target"]))
        flags = [start_cache.setdefault(e, start_only(atlas, *e)) for e in ends]
        if any(flags):
            skipped_start.update(e for e, f in zip(ends, flags) if f)
            continue
        if any(uses.get(e, 0) >= opts.per_feature for e in ends):
            skipped_repeat += 1
            continue
        for e in ends:
            uses[e] = uses.get(e, 0) + 1
        keep.append(r)
        if len(keep) == opts.pairs:
            break
    if skipped_start:
        notes.append(f"features firing only on the sequence-start token skipped: "
                     f"{', '.join(f'{s}:{f}' for s, f in sorted(skipped_start))}")
    if skipped_repeat:
        notes.append(f"{skipped_repeat} higher-ranked pair(s) skipped: a feature already in {opts.per_feature} pair(s)")
    return ranked.take(pa.array(keep, pa.int64())), notes


def corpus_tokens(model, manifest: dict, corpus: str, atlas: Atlas) -> np.ndarray:
    """int32 [n, seq]: the graph's corpus rebuilt from its manifest's options, checked against the
    manifest's fingerprint (the atlas's contexts index its rows)."""
    o = manifest.get("options", {})
    try:
        seq_len, n_seq, seed = int(o["seq_len"]), int(o["max_sequences"]), int(o.get("seed", 0))
    except (KeyError, TypeError) as e:
        raise JfigError(f"the graph's manifest lacks the corpus options (seq_len, max_sequences): {e}") from None
    tokens = tokens_from(corpus, model, seq_len, seed=seed, max_tokens=n_seq * seq_len)[:n_seq]
    want = manifest.get("corpus_hash")
    if want is not None and fingerprint(tokens.tobytes()) != want:
        raise JfigError(f"the tokens rebuilt from --corpus {corpus!r} (fingerprint {fingerprint(tokens.tobytes())}) "
                        f"are not the graph's corpus ({want}); the atlas's contexts index that corpus: pass it "
                        f"with --corpus")
    if tokens.shape[0] < atlas.n_sequences:
        raise JfigError(f"the atlas counted {atlas.n_sequences} sequences but the corpus rebuilt has "
                        f"{tokens.shape[0]}")
    return tokens


def starting_windows(atlas: Atlas, tokens: np.ndarray, ends, n: int, window: int):
    """(rows int32 [m, window], positions [m], origins [m] 'source'/'target', (sequence, corpus position) [m, 2])
    for m <= n starts (module docstring); contexts at position 0 are not used."""
    window = min(window, tokens.shape[1])
    lists = [[c for c in atlas.contexts(site, int(f)) if c["position"] > 0 and c["sequence"] < len(tokens)]
             for site, f in ends]
    picked, seen = [], set()
    for k in range(max(map(len, lists), default=0)):
        for who, lst in zip(("source", "target"), lists):
            if k < len(lst) and (lst[k]["sequence"], lst[k]["position"]) not in seen and len(picked) < n:
                seen.add((lst[k]["sequence"], lst[k]["position"]))
                picked.append((who, lst[k]["sequence"], lst[k]["position"]))
    rows, pos = [], []
    for _, s, p in picked:
        if p < window:
            rows.append(tokens[s, :window])
            pos.append(p)
        else:
            rows.append(np.concatenate([tokens[s, :1], tokens[s, p - window + 2:p + 1]]))
            pos.append(window - 1)
    if not picked:
        return np.zeros((0, window), np.int32), np.zeros(0, np.int64), [], np.zeros((0, 2), np.int64)
    return (np.stack(rows).astype(np.int32), np.asarray(pos), [w for w, _, _ in picked],
            np.asarray([(s, p) for _, s, p in picked], np.int64))


def _text(tok, ids, changed=None) -> str:
    if tok is None:
        return " ".join(str(int(i)) for i in ids)
    parts = [tok.decode([int(i)]) for i in ids]
    if changed is not None:
        parts = [f"⟦{p}⟧" if c else p for p, c in zip(parts, changed)]
    return "".join(parts).replace("\n", "⏎").replace("|", "¦")       # one line, no Markdown table breaks


def _tokens_text(tok, ids) -> str:
    return " ".join(repr(tok.decode([int(i)])) if tok is not None else str(int(i)) for i in ids)


def pair_examples(model, saes, atlas: Atlas, tokens: np.ndarray, pairs: pa.Table, opts: AdversarialOptions,
                  progress: bool = False) -> pa.Table:
    """One row per (pair, start): the search (search_pair) from the pair's starting windows and the output
    effects (output_effects) at p before and after it. `pairs`: ADVERSARIAL_SCHEMA rows (or any table
    with source_site, source, target_site, target, kind, weight, count, expected)."""
    by_site = {s.site: s for s in saes}
    tok = model.tokenizer
    exclude = special_token_ids(tok) if tok is not None else np.zeros(0, np.int64)
    out = []
    for rank, r in enumerate(pairs.to_pylist(), 1):
        for site in (r["source_site"], r["target_site"]):
            if site not in by_site:
                raise SiteError(f"no SAE at {site} among the SAEs given ({sorted(by_site)})")
        sa, sb = by_site[r["source_site"]], by_site[r["target_site"]]
        ends = ((r["source_site"], r["source"]), (r["target_site"], r["target"]))
        rows, pos, origin, where = starting_windows(atlas, tokens, ends, opts.starts, opts.window)
        if not len(rows):
            log.warning("pair %d (%s:%d, %s:%d): no starting context after position 0", rank, *ends[0], *ends[1])
            continue
        scales = [_scale(atlas, s, f) for s, f in ends]
        res = search_pair(model, sa, int(r["source"]), sb, int(r["target"]), rows, pos, steps=opts.steps,
                          top_k=opts.top_k, n_candidates=opts.candidates, temperature=opts.temperature, scales=scales,
                          exclude_tokens=exclude, seed=opts.seed + rank)
        before = output_effects(model, sa, int(r["source"]), sb, int(r["target"]), res.tokens_before, pos,
                                top=opts.top_tokens)
        after = output_effects(model, sa, int(r["source"]), sb, int(r["target"]), res.tokens_after, pos,
                               top=opts.top_tokens)
        changed = res.tokens_before != res.tokens_after
        for k in range(len(rows)):
            p = int(pos[k])
            out.append(dict(
                pair=rank, source_site=r["source_site"], source=int(r["source"]), target_site=r["target_site"],
                target=int(r["target"]), kind=r["kind"], weight=float(r["weight"]), count=int(r["count"]),
                expected=float(r["expected"]), start=k, start_from=origin[k], sequence=int(where[k, 0]),
                corpus_position=int(where[k, 1]), position=p, swaps=int(changed[k].sum()),
                text_before=_text(tok, res.tokens_before[k, :p + 1]),
                text_after=_text(tok, res.tokens_after[k, :p + 1], changed[k, :p + 1]),
                tokens_after=res.tokens_after[k, :p + 1].tolist(),
                act_source_before=float(res.acts_before[k, 0]), act_target_before=float(res.acts_before[k, 1]),
                act_source_after=float(res.acts_after[k, 0]), act_target_after=float(res.acts_after[k, 1]),
                objective_before=float(res.objective[0, k]), objective_after=float(res.objective[-1, k]),
                success_before=bool(res.success_before[k]), success=bool(res.success[k]),
                kl_source=float(after.kl[0, k]), kl_target=float(after.kl[1, k]), kl_both=float(after.kl[2, k]),
                interaction=float(after.interaction[k]), relative=float(after.relative[k]),
                kl_both_before=float(before.kl[2, k]), interaction_before=float(before.interaction[k]),
                promoted=_tokens_text(tok, after.top_down[k]), suppressed=_tokens_text(tok, after.top_up[k]),
                non_additive=_tokens_text(tok, after.top_interaction[k]) if after.interaction[k] > 0 else "—"))
        if progress:
            log.info("pair %d/%d: %d of %d starts made both fire (%d before)", rank, pairs.num_rows,
                     int(res.success.sum()), len(rows), int(res.success_before.sum()))
    return pa.Table.from_pylist(out) if out else pa.table({})


def _scale(atlas: Atlas, site: str, feature: int) -> float:
    """The feature's median non-zero activation (the margin's unit); 1 where unknown."""
    v = float(atlas.alpha_levels(site)[int(feature), 1])
    return v if math.isfinite(v) and v > 0 else 1.0


def summary_rows(examples: pa.Table) -> list[dict]:
    """Per pair: starts, co-occurrence before / after the search, median swaps, median KL and interaction."""
    if not examples.num_rows:
        return []
    rows = examples.to_pylist()
    out = []
    for k in sorted({r["pair"] for r in rows}):
        sel = [r for r in rows if r["pair"] == k]
        hit = [r for r in sel if r["success"]]
        med = lambda key, rs: float(np.median([r[key] for r in rs])) if rs else float("nan")  # noqa: E731
        out.append(dict(pair=k, source=f"{sel[0]['source_site']}:{sel[0]['source']}",
                        target=f"{sel[0]['target_site']}:{sel[0]['target']}", kind=sel[0]["kind"],
                        weight=sel[0]["weight"], count=sel[0]["count"], expected=sel[0]["expected"], starts=len(sel),
                        before=sum(r["success_before"] for r in sel), after=len(hit),
                        swaps=med("swaps", hit), kl_both=med("kl_both", hit), interaction=med("interaction", hit),
                        relative=med("relative", hit)))
    return out


def _fmt(x, spec=".3g") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def report_markdown(examples: pa.Table, notes: list[str], *, graph: str, opts: AdversarialOptions) -> str:
    """report.md: the pairs, how often the search made them fire together, and the best example of each."""
    summ = summary_rows(examples)
    n, hit = examples.num_rows, sum(s["after"] for s in summ)
    lines = [f"# Adversarial pairs of {graph}", "", *(f"- {x}" for x in notes),
             f"- search: {opts.steps} steps, {opts.candidates} swaps evaluated per step from the top {opts.top_k} "
             f"tokens per position, windows of {opts.window} tokens, soft-min temperature {opts.temperature:g}",
             f"- both features fire at p in {sum(s['before'] for s in summ)} of {n} starting windows before the "
             f"search and in {hit} after it", "",
             "A pair fires together when both SAE activations at position p are > 0. KL: next-token KL(clean ‖ "
             "ablated) at p (nats) with both features ablated there; interaction: ‖Δ_ab − Δ_a − Δ_b‖ of the "
             "log-probability changes (0 when the two ablations add). Medians over the windows where the search "
             "succeeded.", "",
             "| # | source | target | kind | weight | co-occurrences (expected) | both fire: before → after | "
             "swaps | KL both | interaction (relative) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summ:
        lines.append(f"| {s['pair']} | {s['source']} | {s['target']} | {s['kind']} | {s['weight']:+.3g} | "
                     f"{s['count']} ({s['expected']:.3g}) | {s['before']}/{s['starts']} → {s['after']}/{s['starts']} | "
                     f"{_fmt(s['swaps'], '.0f')} | {_fmt(s['kl_both'])} | {_fmt(s['interaction'])} "
                     f"({_fmt(s['relative'], '.2f')}) |")
    lines.append("")
    rows = examples.to_pylist()
    for s in summ:
        sel = [r for r in rows if r["pair"] == s["pair"]]
        best = max(sel, key=lambda r: (r["success"], r["objective_after"]))
        lines += [f"## {s['pair']}. {s['source']} → {s['target']}", "",
                  f"- start from the {best['start_from']}'s context (sequence {best['sequence']}, position "
                  f"{best['corpus_position']}); p = {best['position']}, {best['swaps']} token(s) swapped "
                  f"({'both fire' if best['success'] else 'not both firing'} after the search)",
                  f"- before: `{best['text_before']}`", f"- after: `{best['text_after']}`",
                  f"- activations at p, source / target: {best['act_source_before']:.3g} / "
                  f"{best['act_target_before']:.3g} → {best['act_source_after']:.3g} / {best['act_target_after']:.3g}",
                  f"- KL to clean, ablating source / target / both: {best['kl_source']:.3g} / {best['kl_target']:.3g} "
                  f"/ {best['kl_both']:.3g}; interaction {best['interaction']:.3g} (relative "
                  f"{_fmt(best['relative'], '.2f')})",
                  f"- tokens the pair promotes (ablating both lowers them most): {best['promoted']}",
                  f"- tokens it suppresses: {best['suppressed']}; least additive: {best['non_additive']}", ""]
    return "\n".join(lines)


def _load_atlas(src: ViewSources, graph_dir: Path) -> Atlas:
    path = Path(src.atlas) if src.atlas else find_atlas(graph_dir)
    if path is None:
        raise JfigError(f"no atlas beside the graph at {graph_dir} (looked for ../atlas and ../build/atlas): the "
                        f"ranking needs co-activation counts; pass --atlas DIR")
    return Atlas.load(path)


def run_adversarial(src: ViewSources, out=None, opts: AdversarialOptions | None = None,
                    progress: bool = False) -> tuple[Path, pa.Table]:
    """Rank, search and report a saved graph's adversarial pairs; write OUT/pairs.parquet (the ranking rows
    searched), OUT/examples.parquet and .csv (one row per pair and start) and OUT/report.md (OUT default:
    `adversarial` beside the graph folder). Every check runs before the model loads."""
    opts = opts or AdversarialOptions()
    opts.check()
    graph_dir = check_sources(src)
    if src.model is None:
        raise JfigError("jfig adversarial runs the model on text; pass --model")
    out = Path(out) if out is not None else graph_dir.resolve().parent / "adversarial"
    if out.exists() and not out.is_dir():
        raise JfigError(f"--out {out} is a file; give a folder")
    if not out.parent.exists():
        raise JfigError(f"the folder of --out ({out.parent}) does not exist")
    graph = load_graph(graph_dir)
    atlas = _load_atlas(src, graph_dir)
    pairs, notes = select_pairs(graph, atlas, opts)
    if not pairs.num_rows:
        raise JfigError(f"no pairs to search: none of the graph's {graph.n_edges:,} edges of kind "
                        f"{'/'.join(opts.kinds)} has atlas counts within --max-ratio {opts.max_ratio} and features "
                        f"that fire after the sequence-start token")
    model = load_model(src.model)
    check_model(model, graph.manifest)
    if model.config is None:
        raise JfigError("jfig adversarial differentiates through the token embedding: it needs a built-in model")
    saes = [load_sae_ref(p) for p in src.saes] if src.saes else cached_saes_for(model, graph.manifest)
    have = {s.site for s in saes}
    need = set(pairs["source_site"].to_pylist()) | set(pairs["target_site"].to_pylist())
    if need - have:
        raise SiteError(f"no SAE given for site(s) {sorted(need - have)} of the pairs; the SAEs read {sorted(have)}")
    tokens = corpus_tokens(model, graph.manifest, opts.corpus, atlas)
    examples = pair_examples(model, saes, atlas, tokens, pairs, opts, progress=progress)
    out.mkdir(exist_ok=True)
    for name, table in (("pairs.parquet", pairs), ("examples.parquet", examples)):
        tmp = out / (name + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(out / name)
    if examples.num_rows:
        flat = examples.drop_columns(["tokens_after"])
        tmp = out / "examples.csv.tmp"
        pacsv.write_csv(flat, tmp)
        tmp.replace(out / "examples.csv")
    atomic_write_text(out / "report.md", report_markdown(examples, notes, graph=str(graph_dir), opts=opts))
    return out, examples


def success_counts(examples: pa.Table) -> tuple[int, int, int]:
    """(windows, both firing before, both firing after) over an examples table."""
    if not examples.num_rows:
        return 0, 0, 0
    return (examples.num_rows, int(pc.sum(examples["success_before"]).as_py()),
            int(pc.sum(examples["success"]).as_py()))
