"""Default SAEs for a model: trained once on the offline default corpus, cached, reused.

No SAEs are published for the default model (SmolLM2-135M), so jfig trains TopK SAEs at a
spread of residual sites and caches them under ``$XDG_CACHE_HOME/jfig/saes/`` in SAELens's
folder format with a manifest (model, sites, corpus hash, settings, metrics). A second call with
the same settings loads the cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import collect_activations, corpus_hash, default_corpus, tokens_from
from ..data.files import atomic_folder
from ..errors import JfigError
from .loaders import load_sae, save_sae
from .metrics import sae_metrics
from .sae import SAE
from .train import train_sae

log = logging.getLogger(__name__)
DEFAULT_LAYERS = (6, 10, 14, 18)   # early-middle to late-middle of 30 layers, 4 apart (inside a window of 5)


@dataclass(frozen=True)
class DefaultSAESettings:
    """What the cached SAEs depend on (the cache key)."""

    sites: tuple[str, ...] = tuple(f"blocks.{l}.hook_resid_post" for l in DEFAULT_LAYERS)
    d_sae: int = 2048
    k: int = 32
    tokens: int = 65_536             # training tokens per site (CPU default: a few minutes in all)
    eval_tokens: int = 4_096
    seq_len: int = 64
    batch_size: int = 1024
    epochs: int = 2
    lr: float = 2e-3
    seed: int = 0
    corpus: str = "default"
    extra: tuple = field(default=())

    def key(self, model_id: str) -> str:
        blob = json.dumps({"model": model_id, "recipe": 2, **asdict(self)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jfig"


def model_id(model: Any) -> str:
    """A stable identifier of a built-in model: its name and a hash of its config and a weight sample."""
    cfg = model.config
    h = hashlib.sha256(repr(cfg).encode())
    emb = np.asarray(model.params["embed"][:4, :16], np.float32)
    h.update(emb.tobytes())
    return f"{(cfg.name or cfg.family).replace(' ', '_')}-{h.hexdigest()[:12]}"


def _folder_name(site: str) -> str:
    return site.replace("/", "_")


def default_saes(model: Any, *, settings: DefaultSAESettings | None = None,
                 cache_dir: str | os.PathLike | None = None, force: bool = False, progress: bool = True,
                 **overrides: Any) -> tuple[list[SAE], dict[str, Any]]:
    """SAEs for `model` at the default sites: loaded from the cache, or trained and cached.

    Keyword overrides set DefaultSAESettings fields (sites, d_sae, k, tokens, ...). Returns
    (saes: list[SAE], manifest: dict) — the manifest records metrics (FVU, L0, dead fraction,
    CE loss recovered), the corpus hash and the settings.
    """
    settings = settings or DefaultSAESettings()
    if overrides:
        unknown = set(overrides) - set(DefaultSAESettings.__dataclass_fields__)
        if unknown:
            raise JfigError(f"unknown default-SAE settings {sorted(unknown)}; expected DefaultSAESettings fields "
                            f"{sorted(DefaultSAESettings.__dataclass_fields__)}")
        settings = DefaultSAESettings(**{**asdict(settings), **{k: (tuple(v) if isinstance(v, list) else v)
                                                               for k, v in overrides.items()}})
    for s in settings.sites:
        model.check_site(s)
    mid = model_id(model)
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "saes" / mid / settings.key(mid)
    manifest_path = folder / "manifest.json"
    if manifest_path.exists() and not force:
        manifest = json.loads(manifest_path.read_text())
        if all((folder / _folder_name(s) / "cfg.json").exists() for s in settings.sites):
            log.info("using cached SAEs in %s", folder)
            return [load_sae(folder / _folder_name(s)) for s in settings.sites], manifest
    return _train_and_cache(model, settings, folder, mid, progress)


def _train_and_cache(model: Any, settings: DefaultSAESettings, folder: Path, mid: str,
                     progress: bool) -> tuple[list[SAE], dict[str, Any]]:
    t0 = time.time()
    corpus = default_corpus(model) if settings.corpus == "default" else settings.corpus
    n_seq = (settings.tokens + settings.eval_tokens) // settings.seq_len + 1
    toks = tokens_from(corpus, model, settings.seq_len, seed=settings.seed, max_tokens=n_seq * settings.seq_len)
    n_eval = max(1, settings.eval_tokens // settings.seq_len)
    if len(toks) <= n_eval:
        raise JfigError(f"the corpus gave only {len(toks)} sequences of {settings.seq_len} tokens; need more than {n_eval}")
    train_toks, eval_toks = toks[n_eval:], toks[:n_eval]
    chash = corpus_hash(corpus, model.tokenizer, seq_len=settings.seq_len, seed=settings.seed)
    log.info("training default SAEs at %d sites on %d tokens (d_sae %d, k %d); cache: %s", len(settings.sites),
             train_toks.size, settings.d_sae, settings.k, folder)
    batches = (train_toks[i: i + 16] for i in range(0, len(train_toks), 16))
    bufs = collect_activations(model, batches, settings.sites, drop_bos=True, bos_id=None)
    saes, metrics = [], {}
    with atomic_folder(folder) as tmp:
        manifest = _train_into(tmp, model, settings, bufs, eval_toks, mid, chash, train_toks, saes, metrics, progress,
                               t0)
    return saes, manifest


def _train_into(tmp: Path, model, settings: DefaultSAESettings, bufs, eval_toks, mid, chash, train_toks, saes,
                metrics, progress, t0: float) -> dict:
    """Train and save each site's SAE into `tmp`, appending to `saes` and `metrics`; returns the manifest."""
    for index, site in enumerate(settings.sites):
        acts = bufs[site].to_numpy()
        steps = max(1, settings.epochs * len(acts) // settings.batch_size)
        sae, _ = train_sae(None, acts, site, d_sae=settings.d_sae, k=settings.k, steps=steps,
                           batch_size=settings.batch_size, lr=settings.lr, seed=settings.seed + index,
                           progress=progress)   # a seed per site: no shared initialisation across sites
        m = sae_metrics(model, sae, eval_toks)
        metrics[site] = {k: float(v) for k, v in m.items()}
        save_sae(sae, tmp / _folder_name(site))
        saes.append(sae)
        log.info("%s: FVU %.3f  L0 %.1f  dead %.3f  CE recovered %.3f", site, m["fvu"], m["l0"],
                 m["dead_fraction"], m["ce_loss_recovered"])
    manifest = {"format": "jfig-default-saes", "model": mid, "sites": list(settings.sites),
                "settings": asdict(settings), "corpus_hash": chash, "train_tokens": int(train_toks.size),
                "eval_tokens": int(eval_toks.size), "metrics": metrics, "seconds": round(time.time() - t0, 1)}
    text = json.dumps(manifest, indent=2)
    (tmp / "manifest.json").write_text(text)
    return json.loads(text)   # the same JSON types a cached load returns


def metrics_table(manifest: dict) -> str:
    """A Markdown table of the manifest's per-site metrics."""
    lines = ["| site | FVU | L0 | dead fraction | CE loss recovered |", "|---|---|---|---|---|"]
    for site, m in manifest["metrics"].items():
        lines.append(f"| {site} | {m['fvu']:.3f} | {m['l0']:.1f} | {m['dead_fraction']:.3f} | "
                     f"{m['ce_loss_recovered']:.3f} |")
    return "\n".join(lines)
