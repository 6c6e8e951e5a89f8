"""Activations streamed from a model over token batches, and a disk-backed store for them.

`stream_activations` runs the model once per batch (one compiled run, reused across
batches of the same shape), stopping at the last requested site, and yields host arrays
[rows, d] per site. `ActivationBuffer` appends such rows to sharded `.npy` files with a
JSON manifest and serves deterministic shuffled mini-batches across shards, for example
to train an SAE on more activations than fit in memory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import FormatError, JfigError, ShapeError, SiteError
from ..sites import parse_site, sort_sites

MANIFEST = "manifest.json"
FORMAT = "jfig-activations"


def _check_finite(x: np.ndarray, site: str, where: str = ""):
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=-1).sum())
        raise ShapeError(f"activations at site {site!r} contain NaN or inf in {bad} rows{where}; "
                         f"expected finite values (check the model's parameters and inputs)")


def _rows(site: str, x) -> np.ndarray:
    """[batch, seq, ...] -> float32 [batch*seq, width] (attention heads flattened)."""
    x = np.asarray(x, np.float32)
    return x.reshape(x.shape[0] * x.shape[1], -1)


def stream_activations(model, token_batches: Iterable, sites: str | Sequence[str], *, stop_early: bool = True,
                       drop_bos: bool = False, bos_id: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield {site: float32 [batch*seq, d]} for each token batch [batch, seq] (rows in
    batch-major order).

    stop_early: stop each run at the last requested site (no unembedding). drop_bos:
    leave out rows whose token is BOS (`bos_id`, default the model tokenizer's). The next
    batch is dispatched before the current one is copied to the host, so device and host
    work overlap. NaN or inf raises ShapeError naming the site.
    """
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    if not sites:
        raise SiteError("stream_activations needs at least one site")
    for s in sites:
        model.check_site(s)
        if parse_site(s).local == "attn.hook_pattern":
            raise SiteError(f"site {s!r} holds attention patterns [batch, head, query, key], not per-token "
                            f"activations; stream attn.hook_z or a residual site instead")
    last = sort_sites(sites)[-1]
    if drop_bos and bos_id is None:
        bos_id = getattr(model.tokenizer, "bos_id", None)
        if bos_id is None:
            raise JfigError("drop_bos=True but the model has no tokenizer BOS id; pass bos_id=")

    def dispatch(tokens):
        out = model.run(tokens, capture=sites, stop_at=last if stop_early else None, logits=False)
        return np.asarray(tokens), out.cache

    pending = None
    for index, tokens in enumerate(token_batches):
        current = (index, dispatch(tokens))
        if pending is not None:
            yield _collect(*pending, sites, drop_bos, bos_id)
        pending = current
    if pending is not None:
        yield _collect(*pending, sites, drop_bos, bos_id)


def _collect(index: int, run, sites, drop_bos: bool, bos_id) -> dict[str, np.ndarray]:
    tokens, cache = run
    keep = None
    if drop_bos:
        keep = (tokens.reshape(-1) if tokens.ndim == 2 else tokens) != bos_id
    out = {}
    for s in sites:
        x = _rows(s, cache[s])
        _check_finite(x, s, f" of batch {index}")
        out[s] = x[keep] if keep is not None else x
    return out


class ActivationBuffer:
    """Rows of activations for one site: float32 [n_rows, d].

    With `folder`, rows are appended to `.npy` shards of `shard_rows` rows (each written
    to a temporary name and renamed; `manifest.json` lists shards and row counts), read
    back memory-mapped. A folder that already holds a manifest is opened and appended to.
    Rows short of a full shard stay in memory until `flush()` (or a read, or leaving a
    `with` block) writes them.
    Without `folder` the rows stay in memory, up to `memory_budget` bytes.
    """

    def __init__(self, folder: str | os.PathLike | None = None, *, d: int | None = None, site: str = "",
                 shard_rows: int = 1 << 16, memory_budget: int = 1 << 30):
        self.folder = Path(folder) if folder is not None else None
        self.site, self.d = site, d
        self.shard_rows, self.memory_budget = shard_rows, memory_budget
        self._shards: list[dict] = []         # {"file", "rows"} for each written shard
        self._memory: list[np.ndarray] = []   # in-memory rows (all rows, or those not yet in a shard)
        self._loaded: np.ndarray | None = None
        if self.folder is not None and (self.folder / MANIFEST).exists():
            self._open(d, site)

    def _open(self, d, site):
        path = self.folder / MANIFEST
        try:
            m = json.loads(path.read_text())
            assert m["format"] == FORMAT
            shards, md, msite = m["shards"], m["d"], m["site"]
        except (OSError, ValueError, KeyError, AssertionError, TypeError) as err:
            raise FormatError(f"{str(path)!r} is not a jfig activation manifest: {err!r}") from None
        if d is not None and md is not None and d != md:
            raise ShapeError(f"activation buffer at {str(self.folder)!r} has d={md}, expected d={d}")
        if site and msite and site != msite:
            raise SiteError(f"activation buffer at {str(self.folder)!r} holds site {msite!r}, not {site!r}")
        self._shards, self.d, self.site = list(shards), md, msite or site

    # ------------------------------------------------------------------ writing
    def append(self, x) -> None:
        """Append rows x [n, d] (or [..., d], flattened)."""
        x = np.asarray(x, np.float32)
        x = x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x
        if self.d is None:
            self.d = int(x.shape[1])
        if x.shape[1] != self.d:
            raise ShapeError(f"activation rows have width {x.shape[1]}, buffer for site {self.site!r} has d={self.d}")
        _check_finite(x, self.site)
        if len(x) == 0:
            return
        self._loaded = None
        self._memory.append(x.copy())
        pending = sum(len(a) for a in self._memory)
        if self.folder is None:
            if pending * self.d * 4 > self.memory_budget:
                raise JfigError(f"activation buffer for {self.site!r} outgrew its memory budget of "
                                f"{self.memory_budget} bytes; give it a folder to store shards on disk")
            return
        if pending >= self.shard_rows:
            rows = np.concatenate(self._memory)
            self._memory = []
            for i in range(0, len(rows) - self.shard_rows + 1, self.shard_rows):
                self._write_shard(rows[i:i + self.shard_rows])
            rest = len(rows) % self.shard_rows
            if rest:
                self._memory = [rows[len(rows) - rest:]]

    def extend(self, arrays: Iterable) -> "ActivationBuffer":
        for x in arrays:
            self.append(x)
        return self

    def flush(self) -> None:
        """Write rows still in memory as a (short) shard. Reads flush first."""
        if self.folder is not None and self._memory:
            rows = np.concatenate(self._memory)
            self._memory = []
            self._write_shard(rows)

    def __enter__(self) -> "ActivationBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()

    def _write_shard(self, rows: np.ndarray):
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard_{len(self._shards):05d}.npy"
        tmp = self.folder / (name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, rows)
        os.replace(tmp, self.folder / name)
        self._shards.append({"file": name, "rows": int(len(rows))})
        manifest = {"format": FORMAT, "version": 1, "site": self.site, "d": self.d, "dtype": "float32",
                    "n_rows": sum(s["rows"] for s in self._shards), "shards": self._shards}
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.folder / MANIFEST)

    # ------------------------------------------------------------------ reading
    @property
    def n_rows(self) -> int:
        return sum(s["rows"] for s in self._shards) + sum(len(a) for a in self._memory)

    def __len__(self) -> int:
        return self.n_rows

    def shards(self) -> list[np.ndarray]:
        """The stored rows as a list of arrays [rows_i, d]: memory-mapped shards on disk, or in-memory blocks."""
        self.flush()
        out = []
        for s in self._shards:
            path = self.folder / s["file"]
            try:
                a = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise FormatError(f"cannot read activation shard {str(path)!r}: {err}") from err
            if a.shape != (s["rows"], self.d):
                raise FormatError(f"activation shard {str(path)!r} has shape {a.shape}, the manifest says "
                                  f"({s['rows']}, {self.d})")
            out.append(a)
        return out + list(self._memory)

    def to_numpy(self) -> np.ndarray:
        """All rows in append order, float32 [n_rows, d] (in memory)."""
        parts = self.shards()
        return np.concatenate(parts) if parts else np.zeros((0, self.d or 0), np.float32)

    def shuffled_batches(self, batch_size: int, seed: int = 0, *, epochs: int = 1,
                         drop_last: bool = False) -> Iterator[np.ndarray]:
        """Random mini-batches float32 [batch_size, d]; each epoch visits every row exactly once
        (the last batch of an epoch is short unless drop_last). Deterministic given seed.

        When the rows fit in the memory budget they are shuffled globally; otherwise shards
        are visited in random order, as many at a time as fit, and shuffled together.
        """
        if batch_size < 1:
            raise ShapeError(f"batch_size must be >= 1, got {batch_size}")
        if self.n_rows == 0:
            raise JfigError(f"activation buffer for {self.site!r} is empty: append rows before reading batches")
        rng = np.random.default_rng(seed)
        row_bytes = 4 * (self.d or 1)
        for _ in range(epochs):
            if self.n_rows * row_bytes <= self.memory_budget:
                if self._loaded is None:
                    self._loaded = self.to_numpy()
                yield from _batches(self._loaded, rng.permutation(len(self._loaded)), batch_size, drop_last)
                continue
            yield from self._grouped_epoch(rng, batch_size, drop_last, row_bytes)

    def _grouped_epoch(self, rng, batch_size, drop_last, row_bytes):
        shards = self.shards()
        carry = np.zeros((0, self.d), np.float32)
        group: list[np.ndarray] = []
        size = 0
        order = list(rng.permutation(len(shards)))
        while order or group:
            if order and (not group or size + len(shards[order[0]]) * row_bytes <= self.memory_budget):
                i = order.pop(0)
                group.append(np.asarray(shards[i]))
                size += len(shards[i]) * row_bytes
                continue
            rows = np.concatenate([carry] + group)
            perm = rng.permutation(len(rows))
            full = len(rows) - len(rows) % batch_size
            yield from _batches(rows, perm[:full], batch_size, True)
            carry, group, size = rows[perm[full:]], [], 0
        if len(carry) and not drop_last:
            yield carry


def _batches(rows: np.ndarray, perm: np.ndarray, batch_size: int, drop_last: bool) -> Iterator[np.ndarray]:
    for i in range(0, len(perm), batch_size):
        idx = perm[i:i + batch_size]
        if len(idx) < batch_size and drop_last:
            return
        yield rows[idx]


def collect_activations(model, token_batches: Iterable, sites: str | Sequence[str],
                        folder: str | os.PathLike | None = None, *, max_rows: int | None = None,
                        drop_bos: bool = False, bos_id: int | None = None, shard_rows: int = 1 << 16,
                        memory_budget: int = 1 << 30) -> dict[str, ActivationBuffer]:
    """Stream activations into one ActivationBuffer per site (under folder/<site>/ when a
    folder is given), stopping after `max_rows` rows per site."""
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    bufs = {s: ActivationBuffer(Path(folder) / s if folder is not None else None, site=s,
                                shard_rows=shard_rows, memory_budget=memory_budget) for s in sites}
    n = 0
    for acts in stream_activations(model, token_batches, sites, drop_bos=drop_bos, bos_id=bos_id):
        take = None if max_rows is None else max_rows - n
        for s, x in acts.items():
            bufs[s].append(x[:take] if take is not None else x)
        n += len(next(iter(acts.values())))
        if max_rows is not None and n >= max_rows:
            break
    for b in bufs.values():
        b.flush()
    return bufs
