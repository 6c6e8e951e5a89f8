"""A local Hugging Face hub cache laid out as huggingface_hub writes it (FORMATS.md section 4):
``models--org--name/blobs/<etag>``, ``refs/<rev>`` holding the commit sha with no trailing newline, and
``snapshots/<sha>/<path>`` as relative links ``../../blobs/<etag>`` (one more ``../`` per
subfolder), or plain copies where links are not used."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


def commit_sha(seed: str) -> str:
    return hashlib.sha1(seed.encode()).hexdigest()


def add_snapshot(cache: Path, repo_id: str, files: dict[str, bytes | Path], *, commit: str | None = None,
                 ref: str | None = "main", symlinks: bool = True) -> Path:
    """Write ``files`` ({repo path: bytes or a file to copy}) as one snapshot of ``repo_id``; returns
    the snapshot folder. ``ref`` (a branch name, or None) is pointed at the commit."""
    repo = Path(cache) / "--".join(["models", *repo_id.split("/")])
    commit = commit or commit_sha(repo_id + ",".join(sorted(files)))
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        data = Path(content).read_bytes() if isinstance(content, (Path, str)) else content
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if symlinks:
            etag = hashlib.sha256(data).hexdigest()
            blob = repo / "blobs" / etag
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            depth = len(Path(name).parts) - 1
            os.symlink("../" * (2 + depth) + f"blobs/{etag}", target)
        else:
            target.write_bytes(data)
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)          # no trailing newline, as huggingface_hub writes it
    return snapshot


def add_folder(cache: Path, repo_id: str, folder: Path, **kw) -> Path:
    """Every file of ``folder`` (recursively) as a snapshot of ``repo_id``."""
    files = {str(p.relative_to(folder)): p for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    return add_snapshot(cache, repo_id, files, **kw)


def use_cache(monkeypatch, root: Path, variable: str = "HF_HUB_CACHE") -> Path:
    """Point the environment at a cache under ``root`` through one variable (the others unset);
    returns the hub cache folder that variable implies."""
    for name in CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    hub = {"HF_HUB_CACHE": root, "HUGGINGFACE_HUB_CACHE": root, "HF_HOME": root / "hub",
           "XDG_CACHE_HOME": root / "huggingface" / "hub"}[variable]
    monkeypatch.setenv(variable, str(root))
    return hub


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
