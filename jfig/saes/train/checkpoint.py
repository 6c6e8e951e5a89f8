"""Training checkpoints: one folder ``step_{step:09d}/`` per checkpoint, written atomically.

Each holds ``state.eqx`` (the :class:`TrainState` leaves, ``equinox.tree_serialise_leaves``) and
``meta.json`` (format, config, ``d_in``, site, step, the state file's SHA-256, and the metric
history so far; a transcoder's also ``d_out``, its site being ``"read -> write"``). A checkpoint is
assembled in a hidden temporary folder, fsynced, and renamed into place, so a killed run leaves
either the whole checkpoint or none.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jfig.errors import FormatError, JfigError
from jfig.saes.train.config import RESUMABLE_FIELDS
from jfig.saes.train.step import TrainState

CHECKPOINT_FORMAT = "jfig-sae-train-checkpoint"
CHECKPOINT_VERSION = 1
STATE_FILE = "state.eqx"
META_FILE = "meta.json"


def checkpoint_dirs(folder: Path) -> list[Path]:
    """The checkpoints in ``folder``, oldest first. Raises FormatError on files of the old
    single-file ``step_*.npz`` format, which this version cannot resume from."""
    old = sorted(folder.glob("step_*.npz"))
    if old:
        raise FormatError(f"checkpoint {old[-1]} is in the old .npz format; expected step_*/ folders with "
                          f"{STATE_FILE} and {META_FILE}. Delete it or pass a fresh checkpoint_dir")
    return sorted(p for p in folder.glob("step_*") if p.is_dir())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(folder: Path, state: TrainState, history: dict[str, list], meta: dict[str, Any]) -> Path:
    """Write ``folder/step_{step:09d}/`` atomically and keep the last ``keep_checkpoints``."""
    folder.mkdir(parents=True, exist_ok=True)
    step = int(state.step)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, jax.device_get(state))
    blob = buffer.getvalue()
    record = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **meta, "step": step,
              "sha256": hashlib.sha256(blob).hexdigest(),
              "history": {key: {"dtype": str(np.asarray(values).dtype), "values": np.asarray(values).tolist()}
                          for key, values in history.items()}}
    final = folder / f"step_{step:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=".step_", suffix=".tmp", dir=folder))
    try:
        _write_synced(tmp / STATE_FILE, blob)
        _write_synced(tmp / META_FILE, json.dumps(record).encode())
        _fsync_dir(tmp)
        if final.exists():  # a stale checkpoint of this step (e.g. from a run with another history)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(folder)[:-state.cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / META_FILE
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"checkpoint {path} lacks {META_FILE}; expected a folder written by fit(). Delete it to "
                          f"resume from an earlier checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FormatError(f"checkpoint file {file} is truncated or corrupt (not valid JSON: {err}); delete {path} "
                          f"to resume from an earlier checkpoint") from None
    missing = [k for k in ("format", "config", "d_in", "site", "sha256", "history") if k not in saved]
    if saved.get("format") != CHECKPOINT_FORMAT or missing:
        raise FormatError(f"checkpoint file {file} is not a {CHECKPOINT_FORMAT} record (format "
                          f"{saved.get('format')!r}, missing keys {missing})")
    return saved


def load_checkpoint(path: Path, template: TrainState, meta: dict[str, Any]) -> tuple[TrainState, dict[str, list]]:
    """The state and history in checkpoint folder ``path``, shaped like ``template``.

    Raises JfigError when it was written for another config, ``d_in`` or site, and FormatError
    naming the file when it is truncated or corrupt."""
    saved = _read_meta(path)
    want, got = meta["config"], saved["config"]
    diff = sorted(key for key in set(want) | set(got) if key not in RESUMABLE_FIELDS and want.get(key) != got.get(key))
    if diff:
        raise JfigError(f"checkpoint {path} was written with a different TrainConfig "
                        f"({', '.join(f'{k}: {got.get(k)!r} there, {want.get(k)!r} now' for k in diff)})")
    for key in sorted(set(meta) - {"config"}):  # d_in and site; a transcoder's d_out too
        if saved.get(key) != meta[key]:
            raise JfigError(f"checkpoint {path} is for {key} {saved.get(key)!r}; this run has {meta[key]!r}")
    file = path / STATE_FILE
    try:
        blob = file.read_bytes()
    except FileNotFoundError:
        raise FormatError(f"checkpoint {path} lacks {STATE_FILE}; delete it to resume from an earlier "
                          f"checkpoint") from None
    digest = hashlib.sha256(blob).hexdigest()
    if digest != saved["sha256"]:
        raise FormatError(f"checkpoint file {file} is truncated or corrupt: {len(blob)} bytes with SHA-256 "
                          f"{digest[:12]}..., expected {saved['sha256'][:12]}... as recorded in {META_FILE}; delete "
                          f"{path} to resume from an earlier checkpoint")
    state = _deserialise(file, blob, template)
    history = {key: list(np.asarray(entry["values"], entry["dtype"])) for key, entry in saved["history"].items()}
    return state, history


def _deserialise(file: Path, blob: bytes, template: TrainState) -> TrainState:
    """``template`` with its array leaves read from ``blob``; shapes and dtypes checked."""
    count = [0]

    def load_leaf(f: io.BytesIO, like: Any) -> Any:
        if not eqx.is_array(like):
            return like
        index = count[0]
        count[0] += 1
        try:
            array = np.load(f, allow_pickle=False)
        except (ValueError, EOFError, OSError) as err:
            raise FormatError(f"checkpoint file {file}: state array {index} cannot be read ({err})") from None
        if array.shape != like.shape or array.dtype != like.dtype:
            raise FormatError(f"checkpoint file {file}: state array {index} is {array.dtype}{list(array.shape)}; "
                              f"expected {like.dtype}{list(like.shape)}")
        return jnp.asarray(array)

    stream = io.BytesIO(blob)
    state = eqx.tree_deserialise_leaves(stream, template, filter_spec=load_leaf)
    if stream.tell() != len(blob):
        raise FormatError(f"checkpoint file {file} has {len(blob) - stream.tell()} bytes after the "
                          f"{count[0]} state arrays; expected none")
    return state
