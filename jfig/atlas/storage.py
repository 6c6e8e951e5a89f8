"""Atlas persistence: a directory of a JSON manifest (with a sha256 per file) and .npz files.

Layout of an atlas directory:

    manifest.json           format, version, sites (d_sae, n_tracked), site pairs, n_tokens, n_sequences,
                            corpus_hash, settings, checksums (file name -> sha256)
    site_{k}.npz            per-feature arrays of site k (compressed): features, count, sum, vmin, vmax,
                            nrec, dropped, wcount, wsum, exact values (ragged), top contexts
    site_{k}_hist.npz       its activation histograms, a scipy.sparse CSR matrix [d_sae, bins + 2]
    pair_{n}_count.npz      co-activation counts of site pair n, CSR [n_source, n_target]
    pair_{n}_sum.npz        sums of the windowed target activation, CSR, same pattern
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..data.files import atomic_folder, file_checksum
from ..errors import FormatError, JfigError

FORMAT, VERSION = "jfig-atlas", 1
_DENSE = ("count", "sum", "vmin", "vmax", "nrec", "dropped", "wcount", "wsum",
          "ctx_val", "ctx_seq", "ctx_pos", "ctx_tok")


def write_atlas(path, *, sites, d_sae, features, settings, site_stats, pair_stats, n_tokens, n_sequences,
                corpus_hash=None) -> None:
    """Write an atlas's fields (`Atlas.fields()`) to directory `path`, atomically."""
    path = Path(path)
    if path.exists() and not (path / "manifest.json").exists() and any(path.iterdir()):
        raise JfigError(f"{path} exists and is not an atlas directory; refusing to overwrite it")
    with atomic_folder(path) as tmp:
        site_entries = []
        for k, site in enumerate(sites):
            st = site_stats[site]
            ex = st["exact"]
            keep = ~np.isnan(ex)
            np.savez_compressed(tmp / f"site_{k}.npz", features=features[site], exact_values=ex[keep],
                                exact_len=keep.sum(1), **{name: st[name] for name in _DENSE})
            sp.save_npz(tmp / f"site_{k}_hist.npz", sp.csr_matrix(st["hist"]))
            site_entries.append(dict(site=site, d_sae=d_sae[site], n_tracked=len(features[site]), file=f"site_{k}"))
        pair_entries = []
        for n, (src, tgt) in enumerate(pair_stats):
            co = sp.csr_matrix(pair_stats[(src, tgt)]["co"])
            fs = pair_stats[(src, tgt)]["fsum"]
            rows, cols = co.nonzero()
            sp.save_npz(tmp / f"pair_{n}_count.npz", co)
            sp.save_npz(tmp / f"pair_{n}_sum.npz", sp.csr_matrix((fs[rows, cols], (rows, cols)), shape=fs.shape))
            pair_entries.append(dict(source_site=src, target_site=tgt, file=f"pair_{n}"))
        checksums = {f.name: file_checksum(f) for f in sorted(tmp.iterdir())}
        manifest = dict(format=FORMAT, version=VERSION, sites=site_entries, pairs=pair_entries, n_tokens=n_tokens,
                        n_sequences=n_sequences, corpus_hash=corpus_hash, settings=settings, checksums=checksums)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))


def read_atlas(path) -> dict:
    """The fields of the atlas in directory `path` (keyword arguments of `Atlas`), checksums verified."""
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
    _verify_checksums(path, manifest.get("checksums"))
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
    return dict(sites=[e["site"] for e in manifest["sites"]], d_sae=d_sae, features=features, settings=settings,
                site_stats=site_stats, pair_stats=pair_stats, n_tokens=manifest["n_tokens"],
                n_sequences=manifest["n_sequences"], corpus_hash=manifest.get("corpus_hash"))


def _verify_checksums(path: Path, checksums: dict | None) -> None:
    if checksums is None:          # written before checksums existed: the loaders' own checks still apply
        return
    for name, digest in checksums.items():
        file = path / name
        if not file.exists():
            raise FormatError(f"atlas file {file} is missing")
        if file_checksum(file) != digest:
            raise FormatError(f"atlas file {file} is corrupt: its sha256 does not match the manifest")


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
