"""The on-disk state of one graph build: what inputs and options it is for, and a checksum per file.

`build_state.json` holds the build's fingerprint (options, tokens, SAEs, model) and the sha256 of
every stage file written so far. A rerun with a different fingerprint refuses the folder instead
of mixing results. A stage file is trusted only when its checksum matches the record: a truncated,
corrupt or unrecorded file (a crash between writing it and recording it) is logged and computed
again, never read as data.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..atlas import Atlas
from ..data.files import atomic_write_json, atomic_write_npz, file_checksum
from ..errors import FormatError, JfigError

STATE_FILE = "build_state.json"
log = logging.getLogger(__name__)


class RunState:
    """The build folder `out_dir` (None: an in-memory build that reads and writes nothing)."""

    def __init__(self, out_dir: str | Path | None, fingerprint: dict):
        self.dir = Path(out_dir) if out_dir is not None else None
        self.fingerprint = fingerprint
        self.files: dict[str, str] = {}
        if self.dir is None:
            return
        if self.dir.exists() and not self.dir.is_dir():
            raise JfigError(f"build folder {self.dir} exists and is not a folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self.dir / STATE_FILE
        if state.exists():
            try:
                old = json.loads(state.read_text())
            except (OSError, ValueError) as e:
                raise FormatError(f"{state} is not valid JSON ({e}); delete the build folder {self.dir} "
                                  f"or use another") from None
            old_fp = old.get("fingerprint", {})
            if old_fp != fingerprint:
                diff = sorted(k for k in set(old_fp) | set(fingerprint) if old_fp.get(k) != fingerprint.get(k))
                raise JfigError(f"{self.dir} holds a build with different inputs or options ({diff}); "
                                f"use another --out folder or delete it")
            self.files = dict(old.get("files", {}))
            self.created = old.get("created")
        else:
            self.created = time.strftime("%Y-%m-%dT%H:%M:%S")
            self._write_state()
        (self.dir / "blocks").mkdir(exist_ok=True)

    # ---- paths and records -------------------------------------------------------------------

    def path(self, name: str) -> Path | None:
        return None if self.dir is None else self.dir / name

    def _write_state(self) -> None:
        atomic_write_json(self.dir / STATE_FILE, {"fingerprint": self.fingerprint, "created": self.created,
                                                  "files": self.files})

    def _record(self, name: str, file: Path) -> None:
        self.files[name] = file_checksum(file)
        self._write_state()

    def _trusted(self, name: str, file: Path) -> bool:
        """Whether `file` exists and matches its recorded checksum; a bad file is logged and removed."""
        if not file.exists():
            return False
        expected = self.files.get(name)
        if expected is not None and file_checksum(file) == expected:
            return True
        why = "has no recorded checksum (interrupted write)" if expected is None else "does not match its checksum"
        log.warning("build file %s %s; computing it again", file, why)
        file.unlink()
        self.files.pop(name, None)
        return False

    # ---- typed files -------------------------------------------------------------------------

    def load_npz(self, name: str) -> dict[str, np.ndarray] | None:
        """The arrays of a trusted .npz stage file, or None (not written yet, or untrustworthy)."""
        file = self.path(name)
        if file is None or not self._trusted(name, file):
            return None
        with np.load(file, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def save_npz(self, name: str, arrays: dict[str, Any]) -> None:
        if self.dir is not None:
            self._record(name, atomic_write_npz(self.path(name), **arrays))

    def load_json(self, name: str) -> Any | None:
        file = self.path(name)
        if file is None or not self._trusted(name, file):
            return None
        return json.loads(file.read_text())

    def save_json(self, name: str, obj: Any) -> None:
        if self.dir is not None:
            self._record(name, atomic_write_json(self.path(name), obj))

    def load_atlas(self, name: str = "atlas") -> Atlas | None:
        """The trusted atlas folder (its manifest checksummed here, its files by the manifest), or None."""
        folder = self.path(name)
        if folder is None or not (folder / "manifest.json").exists():
            return None
        if not self._trusted(f"{name}/manifest.json", folder / "manifest.json"):
            shutil.rmtree(folder, ignore_errors=True)
            return None
        try:
            return Atlas.load(folder)
        except FormatError as e:
            log.warning("build atlas %s is unreadable (%s); building it again", folder, e)
            self.files.pop(f"{name}/manifest.json", None)
            return None

    def save_atlas(self, atlas: Atlas, name: str = "atlas") -> None:
        if self.dir is not None:
            atlas.save(self.path(name))
            self._record(f"{name}/manifest.json", self.path(name) / "manifest.json")


def process_folder(out_dir: str | Path, index: int) -> Path:
    """The build folder of process `index` of a build spread over several processes."""
    return Path(out_dir) / f"process_{index:03d}"


class PeerState:
    """A read-only view of another process's build folder: its fingerprint must be this build's, and a
    file is read only once its checksum is recorded and matches (nothing is ever deleted here, since
    the other process may still be writing)."""

    def __init__(self, folder: str | Path, fingerprint: dict):
        self.dir = Path(folder)
        self.fingerprint = fingerprint

    def files(self) -> dict[str, str]:
        """The recorded checksums ({} until the process has written its state file)."""
        state = self.dir / STATE_FILE
        try:
            old = json.loads(state.read_text())
        except (OSError, ValueError):
            return {}
        if old.get("fingerprint") != self.fingerprint:
            raise JfigError(f"{self.dir} holds a build with different inputs or options than this process's; "
                            f"every process of a build must get the same model, SAEs, tokens and options")
        return dict(old.get("files", {}))

    def load_npz(self, name: str) -> dict[str, np.ndarray] | None:
        file, expected = self.dir / name, self.files().get(name)
        if expected is None or not file.exists() or file_checksum(file) != expected:
            return None
        with np.load(file, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def load_json(self, name: str) -> Any | None:
        file, expected = self.dir / name, self.files().get(name)
        if expected is None or not file.exists() or file_checksum(file) != expected:
            return None
        return json.loads(file.read_text())

    def load_atlas(self, name: str) -> Atlas | None:
        """The atlas folder `name` once its manifest's checksum is recorded and matches (the manifest
        checks the other files), or None."""
        manifest = f"{name}/manifest.json"
        file, expected = self.dir / manifest, self.files().get(manifest)
        if expected is None or not file.exists() or file_checksum(file) != expected:
            return None
        return Atlas.load(self.dir / name)


def wait_for_peer(out_dir: str | Path, fingerprint: dict, j: int, count: int, done_file: str, poll: float = 0.5,
                  log_every: float = 60.0) -> tuple[PeerState, Any]:
    """(process j's folder, the contents of its `done_file`) once it has recorded that file."""
    peer = PeerState(process_folder(out_dir, j), fingerprint)
    t0 = last = time.time()
    while (done := peer.load_json(done_file)) is None:
        if time.time() - last > log_every:
            log.info("waiting for process %d of %d (%.0f s so far)", j, count, time.time() - t0)
            last = time.time()
        time.sleep(poll)
    return peer, done


def wait_for_peers(out_dir: str | Path, fingerprint: dict, count: int, names_of, poll: float = 0.5,
                   log_every: float = 60.0, done_file: str = "done.json") -> dict[str, PeerState]:
    """Wait until every process 1..count-1 has recorded `done_file`, then check the files it lists
    (`names_of(done)` -> names) against their recorded checksums. Returns {name: the PeerState holding
    it} over all peers; read each with `load_npz(name)` when needed (nothing is loaded here)."""
    out: dict[str, PeerState] = {}
    for j in range(1, count):
        peer, done = wait_for_peer(out_dir, fingerprint, j, count, done_file, poll, log_every)
        files = peer.files()
        for name in names_of(done):
            file = peer.dir / name
            if name not in files or not file.exists() or file_checksum(file) != files[name]:
                raise JfigError(f"process {j} reported {name} done, but {file} is missing or does not "
                                f"match its checksum")
            out[name] = peer
    return out
