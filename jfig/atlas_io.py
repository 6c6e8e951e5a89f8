"""Atlas persistence (a directory: JSON manifest + .npz files) and exact merging of atlases.

Layout of an atlas directory:

    manifest.json           format, version, sites (d_sae, n_tracked), site pairs, n_tokens, n_sequences,
                            corpus_hash, settings
    site_{k}.npz            per-feature arrays of site k (compressed): features, count, sum, vmin, vmax,
                            nrec, dropped, wcount, wsum, exact values (ragged), top contexts
    site_{k}_hist.npz       its activation histograms, a scipy.sparse CSR matrix [d_sae, bins + 2]
    pair_{n}_count.npz      co-activation counts of site pair n, CSR [n_source, n_target]
    pair_{n}_sum.npz        sums of the windowed target activation, CSR, same pattern
"""
from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .atlas import Atlas
from .atlas_stats import finalize_site
from .errors import FormatError, JfigError

FORMAT, VERSION = "jfig-atlas", 1
_DENSE = ("count", "sum", "vmin", "vmax", "nrec", "dropped", "wcount", "wsum",
          "ctx_val", "ctx_seq", "ctx_pos", "ctx_tok")


def save_atlas(atlas: Atlas, path) -> None:
    path = Path(path)
    if path.exists() and not (path / "manifest.json").exists() and any(path.iterdir()):
        raise JfigError(f"{path} exists and is not an atlas directory; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write(atlas, tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(atlas: Atlas, out: Path) -> None:
    sites = []
    for k, site in enumerate(atlas.sites):
        st = atlas.stats(site)
        ex = st["exact"]
        keep = ~np.isnan(ex)
        np.savez_compressed(out / f"site_{k}.npz", features=atlas.features[site], exact_values=ex[keep],
                            exact_len=keep.sum(1), **{name: st[name] for name in _DENSE})
        sp.save_npz(out / f"site_{k}_hist.npz", sp.csr_matrix(st["hist"]))
        sites.append(dict(site=site, d_sae=atlas.d_sae[site], n_tracked=len(atlas.features[site]), file=f"site_{k}"))
    pairs = []
    for n, (src, tgt) in enumerate(atlas.pairs):
        co = sp.csr_matrix(atlas.coactivation(src, tgt))
        fs = atlas._p(src, tgt)["fsum"]
        rows, cols = co.nonzero()
        fsum = sp.csr_matrix((fs[rows, cols], (rows, cols)), shape=fs.shape)
        sp.save_npz(out / f"pair_{n}_count.npz", co)
        sp.save_npz(out / f"pair_{n}_sum.npz", fsum)
        pairs.append(dict(source_site=src, target_site=tgt, file=f"pair_{n}"))
    manifest = dict(format=FORMAT, version=VERSION, sites=sites, pairs=pairs, n_tokens=atlas.n_tokens,
                    n_sequences=atlas.n_sequences, corpus_hash=atlas.corpus_hash, settings=atlas.settings)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def load_atlas(path) -> Atlas:
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise FormatError(f"{path} is not an atlas directory: manifest.json is missing") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}/manifest.json is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise FormatError(f"{path}/manifest.json: expected format {FORMAT!r} version {VERSION}, got "
                          f"{manifest.get('format')!r} version {manifest.get('version')!r}")
    settings = manifest["settings"]
    n_exact = settings["exact_values"]
    site_stats, features, d_sae = {}, {}, {}
    for entry in manifest["sites"]:
        site, d = entry["site"], entry["d_sae"]
        z = _load_npz(path / f"{entry['file']}.npz")
        st = {name: z[name] for name in _DENSE}
        st["hist"] = _load_sparse(path / f"{entry['file']}_hist.npz").toarray().astype(np.int64)
        ex = np.full((d, n_exact), np.nan, np.float32)
        lens = z["exact_len"]
        ex[np.arange(n_exact)[None, :] < lens[:, None]] = z["exact_values"]
        st["exact"] = ex
        if st["count"].shape != (d,) or st["hist"].shape != (d, settings["hist_bins"] + 2):
            raise FormatError(f"{path}: arrays of site {site} do not match d_sae {d}")
        site_stats[site], features[site], d_sae[site] = st, z["features"], d
    pair_stats = {}
    for entry in manifest["pairs"]:
        src, tgt = entry["source_site"], entry["target_site"]
        co = _load_sparse(path / f"{entry['file']}_count.npz").toarray().astype(np.int64)
        fs = _load_sparse(path / f"{entry['file']}_sum.npz").toarray().astype(np.float32)
        if co.shape != (len(features[src]), len(features[tgt])) or fs.shape != co.shape:
            raise FormatError(f"{path}: pair {src} -> {tgt} has shape {co.shape}; expected "
                              f"{(len(features[src]), len(features[tgt]))}")
        pair_stats[(src, tgt)] = dict(co=co, fsum=fs)
    return Atlas(sites=[e["site"] for e in manifest["sites"]], d_sae=d_sae, features=features, settings=settings,
                 site_stats=site_stats, pair_stats=pair_stats, n_tokens=manifest["n_tokens"],
                 n_sequences=manifest["n_sequences"], corpus_hash=manifest.get("corpus_hash"))


def _load_npz(file: Path):
    try:
        with np.load(file) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise FormatError(f"atlas file {file} is missing") from None
    except Exception as e:  # zip/pickle errors of a truncated or corrupt file
        raise FormatError(f"atlas file {file} is corrupt: {e}") from None


def _load_sparse(file: Path):
    try:
        return sp.load_npz(file)
    except FileNotFoundError:
        raise FormatError(f"atlas file {file} is missing") from None
    except Exception as e:
        raise FormatError(f"atlas file {file} is corrupt: {e}") from None


def merge_atlases(a: Atlas, b: Atlas) -> Atlas:
    """Statistics of a's corpus followed by b's: counts add exactly, sums add, contexts re-ranked."""
    same = lambda s: {k: v for k, v in s.items() if k != "method"}  # noqa: E731
    if a.sites != b.sites or a.d_sae != b.d_sae or a.pairs != b.pairs:
        raise JfigError(f"cannot merge atlases over different sites/pairs: {a.sites} vs {b.sites}")
    if any(not np.array_equal(a.features[s], b.features[s]) for s in a.sites):
        raise JfigError("cannot merge atlases that track different features; build both with the same features=")
    if same(a.settings) != same(b.settings):
        raise JfigError(f"cannot merge atlases built with different settings: {a.settings} vs {b.settings}")
    n_exact, site_stats = a.settings["exact_values"], {}
    for site in a.sites:
        x, y = a.stats(site), b.stats(site)
        st = {k: x[k] + y[k] for k in ("count", "sum", "hist", "nrec", "dropped", "wcount", "wsum")}
        st["vmin"], st["vmax"] = np.minimum(x["vmin"], y["vmin"]), np.maximum(x["vmax"], y["vmax"])
        st["exact"] = np.sort(np.concatenate([x["exact"], y["exact"]], 1), 1)[:, :n_exact]
        y_seq = np.where(y["ctx_seq"] >= 0, y["ctx_seq"] + a.n_sequences, -1)
        vals = np.concatenate([x["ctx_val"], y["ctx_val"]], 1)
        order = np.argsort(-vals, axis=1, kind="stable")[:, : x["ctx_val"].shape[1]]

        def pick(u, v):
            return np.take_along_axis(np.concatenate([u, v], 1), order if u.ndim == 2 else order[..., None], 1)
        st.update(ctx_val=pick(x["ctx_val"], y["ctx_val"]), ctx_seq=pick(x["ctx_seq"], y_seq),
                  ctx_pos=pick(x["ctx_pos"], y["ctx_pos"]), ctx_tok=pick(x["ctx_tok"], y["ctx_tok"]))
        finalize_site(st, n_exact)
        site_stats[site] = st
    pair_stats = {k: dict(co=a._p(*k)["co"] + b._p(*k)["co"], fsum=a._p(*k)["fsum"] + b._p(*k)["fsum"])
                  for k in a.pairs}
    corpus_hash = f"{a.corpus_hash}+{b.corpus_hash}" if a.corpus_hash and b.corpus_hash else None
    return Atlas(sites=a.sites, d_sae=a.d_sae, features=a.features, settings=a.settings, site_stats=site_stats,
                 pair_stats=pair_stats, n_tokens=a.n_tokens + b.n_tokens, n_sequences=a.n_sequences + b.n_sequences,
                 corpus_hash=corpus_hash)
