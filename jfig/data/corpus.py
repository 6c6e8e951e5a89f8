"""Text corpora (files, JSONL, Parquet, the offline default), packing into token batches, and hashes.

A `Corpus` is a re-iterable stream of documents: it never holds its text in memory, so a
corpus of any size packs in bounded memory. `pack` tokenises documents, joins them with
EOS separators, cuts seq_len chunks (each starting with BOS), shuffles them through a
bounded buffer and yields int32 batches [batch, seq_len]. `corpus_hash` fingerprints the
documents and the tokenisation settings so results can record what they were computed on.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydoc_data.topics import topics as pydoc_topics

from ..errors import FormatError, JfigError, ShapeError
from ..models.validation import check_tokens
from .prompts import all_prompts

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
FILE_PIECE_CHARS = 1 << 20   # a text file longer than this is streamed as pieces of about this size
DEFAULT_SEQ_LEN = 128


class Corpus:
    """An iterable of text documents, re-readable from its source on every iteration.

    Build one with `Corpus.from_spec(path | "default" | [specs])`, `from_text_files`,
    `from_jsonl`, `from_parquet`, `from_texts` or `from_generator(fn)`, where `fn()`
    returns a fresh iterable of strings each call. Empty documents are skipped.
    """

    def __init__(self, documents: Callable[[], Iterable[str]], description: str):
        self._documents = documents
        self.description = description

    def __iter__(self) -> Iterator[str]:
        for doc in self._documents():
            if not isinstance(doc, str):
                raise FormatError(f"corpus {self.description}: a document is {type(doc).__name__}, expected str")
            if doc:
                yield doc

    def __repr__(self) -> str:
        return f"Corpus({self.description})"

    def __add__(self, other: "Corpus") -> "Corpus":
        return Corpus.concat([self, other])

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_generator(cls, fn: Callable[[], Iterable[str]], description: str = "generator") -> "Corpus":
        return cls(fn, description)

    @classmethod
    def from_texts(cls, texts: Sequence[str], description: str | None = None) -> "Corpus":
        texts = tuple(texts)
        return cls(lambda: texts, description or f"{len(texts)} texts")

    @classmethod
    def concat(cls, corpora: Sequence["Corpus"]) -> "Corpus":
        corpora = tuple(corpora)
        return cls(lambda: (d for c in corpora for d in c), " + ".join(c.description for c in corpora))

    @classmethod
    def from_text_files(cls, path: str | os.PathLike) -> "Corpus":
        """A text file, or every *.txt / *.md / *.rst file under a folder (recursive, sorted)."""
        path = _existing(path)
        if path.is_file():
            files = [path]
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        return cls(lambda: (piece for f in files for piece in _read_text_pieces(f)), f"text files at {path}")

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, field: str = "text") -> "Corpus":
        """One document per line of a JSON Lines file: the string at key `field`."""
        path = _existing(path)
        return cls(lambda: read_jsonl(path, field), f"JSONL {path} field {field!r}")

    @classmethod
    def from_parquet(cls, path: str | os.PathLike, column: str = "text", batch_rows: int = 1024) -> "Corpus":
        """One document per row of a Parquet file's string column, read in record batches."""
        path = _existing(path)
        _parquet_file(path, column)  # fail now on a missing column, not mid-run
        return cls(lambda: _read_parquet(path, column, batch_rows), f"Parquet {path} column {column!r}")

    @classmethod
    def from_spec(cls, spec: Any, *, text_field: str = "text") -> "Corpus":
        """A Corpus from a path (folder, .txt/.md/.rst, .jsonl, .parquet), "default", a list of
        specs (concatenated in order), or a Corpus (returned as is). `text_field` names the
        JSONL field or Parquet column holding the text."""
        if isinstance(spec, Corpus):
            return spec
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise JfigError("corpus spec is an empty list; expected paths, 'default' or Corpus objects")
            return cls.concat([cls.from_spec(s, text_field=text_field) for s in spec])
        if not isinstance(spec, (str, os.PathLike)):
            raise JfigError(f"corpus spec must be a path, 'default', a list or a Corpus, got {type(spec).__name__}")
        if isinstance(spec, str) and spec == "default" and not Path(spec).exists():
            return offline_corpus()
        path = _existing(spec)
        suffix = path.suffix.lower()
        if path.is_dir() or suffix in TEXT_SUFFIXES:
            return cls.from_text_files(path)
        if suffix in JSONL_SUFFIXES:
            return cls.from_jsonl(path, text_field)
        if suffix in PARQUET_SUFFIXES:
            return cls.from_parquet(path, text_field)
        raise FormatError(f"cannot tell the format of corpus file {str(path)!r} from its suffix {suffix!r}; expected "
                          f"a folder or one of {TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES}")


def as_corpus(source: Any) -> Corpus:
    """A Corpus from a Corpus, a spec (path, "default", list), or any other iterable of strings
    (read once: a generator cannot be re-read)."""
    if isinstance(source, (Corpus, str, os.PathLike, list, tuple)):
        return Corpus.from_spec(source)
    if isinstance(source, Iterable):
        return Corpus(lambda: source, "iterable")
    raise JfigError(f"expected a corpus (Corpus, path, 'default', or iterable of str), got {type(source).__name__}")


# ---------------------------------------------------------------------- readers
def _existing(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FormatError(f"corpus path {str(p)!r} does not exist (to use strings as documents, "
                          f"wrap them in Corpus.from_texts)")
    return p


def _read_text_pieces(path: Path) -> Iterator[str]:
    """The file as one document, or as line-aligned pieces of ~FILE_PIECE_CHARS when longer."""
    try:
        with open(path, encoding="utf-8") as f:
            piece: list[str] = []
            size = 0
            for line in f:
                piece.append(line)
                size += len(line)
                if size >= FILE_PIECE_CHARS:
                    yield "".join(piece)
                    piece, size = [], 0
            if piece:
                yield "".join(piece)
    except (OSError, UnicodeDecodeError) as err:
        raise FormatError(f"cannot read corpus file {str(path)!r} as UTF-8 text: {err}") from err


def read_jsonl(path: Path, field: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise FormatError(f"{where}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict) or field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise FormatError(f"{where}: no text field {field!r} (found {keys})")
                text = record[field]
                if not isinstance(text, str):
                    raise FormatError(f"{where}: field {field!r} is {type(text).__name__}, expected a string")
                yield text
    except (OSError, UnicodeDecodeError) as err:
        raise FormatError(f"cannot read corpus file {str(path)!r} as UTF-8 JSON Lines: {err}") from err


def _parquet_file(path: Path, column: str):
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise FormatError(f"cannot read corpus file {str(path)!r} as Parquet: {err}") from err
    names = pf.schema_arrow.names
    if column not in names:
        raise FormatError(f"Parquet file {str(path)!r} has no column {column!r}; its columns are {names}")
    kind = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise FormatError(f"Parquet column {column!r} in {str(path)!r} has type {kind}, expected string")
    return pf


def _read_parquet(path: Path, column: str, batch_rows: int) -> Iterator[str]:
    pf = _parquet_file(path, column)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[column]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


# ---------------------------------------------------------------------- the offline default
def pydoc_corpus() -> Corpus:
    """CPython's bundled documentation topics (pydoc_data), one document per topic, sorted by name."""
    def docs():
        return (pydoc_topics[k] for k in sorted(pydoc_topics))
    return Corpus(docs, "CPython pydoc topics")


def prompt_corpus(n: int | None = None, seed: int = 0) -> Corpus:
    """The completed texts of every prompt suite (prompts.all_prompts)."""
    return Corpus(lambda: (p.full_text for p in all_prompts(n, seed)), f"prompt suites (n={n}, seed={seed})")


def offline_corpus(*, docs: bool = True, prompts: bool = True, seed: int = 0) -> Corpus:
    """CPython's docs and/or the prompt suites: the part of the default corpus that needs no model."""
    parts = ([pydoc_corpus()] if docs else []) + ([prompt_corpus(seed=seed)] if prompts else [])
    if not parts:
        raise JfigError("a corpus with docs and prompts both off has no documents")
    return Corpus.concat(parts)


# ---------------------------------------------------------------------- packing
def _special_ids(tokenizer, add_bos: bool) -> tuple[int | None, int | None]:
    bos, eos = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
    if add_bos and bos is None:
        raise JfigError("add_bos=True but the tokenizer has no BOS token; pass add_bos=False")
    return bos, eos


def _token_stream(corpus: Corpus, tokenizer, eos: int | None, group: int = 16) -> Iterator[list[int]]:
    """Token ids of each document, an EOS before every document but the first."""
    batch_encode = getattr(tokenizer, "encode_batch", None)
    first = True
    docs = iter(corpus)
    while True:
        texts = [d for _, d in zip(range(group), docs)]
        if not texts:
            return
        encoded = batch_encode(texts, add_bos=False) if batch_encode else [tokenizer.encode(t, add_bos=False) for t in texts]
        for ids in encoded:
            if not first and eos is not None:
                yield [eos]
            first = False
            yield ids


def _sequences(corpus, tokenizer, seq_len: int, *, add_bos: bool, max_tokens: int | None) -> Iterator[np.ndarray]:
    """Packed int32 rows [seq_len] in corpus order; the ragged tail is dropped."""
    if seq_len < (2 if add_bos else 1):
        raise ShapeError(f"seq_len must be at least {2 if add_bos else 1} (BOS + one token), got {seq_len}")
    bos, eos = _special_ids(tokenizer, add_bos)
    body = seq_len - 1 if add_bos else seq_len
    limit = None if max_tokens is None else max_tokens // seq_len
    if limit == 0:
        raise JfigError(f"max_tokens={max_tokens} is less than one sequence of seq_len={seq_len} tokens")
    buf = np.empty(0, np.int64)
    emitted = 0
    for ids in _token_stream(corpus, tokenizer, eos):
        buf = np.concatenate([buf, np.asarray(ids, np.int64)])
        n = len(buf) // body
        for i in range(n):
            chunk = buf[i * body:(i + 1) * body]
            yield np.concatenate([[bos], chunk]).astype(np.int32) if add_bos else chunk.astype(np.int32)
            emitted += 1
            if emitted == limit:
                return
        buf = buf[n * body:]


def _shuffled(rows: Iterator[np.ndarray], buffer: int, seed: int) -> Iterator[np.ndarray]:
    """Reservoir-style shuffle through a bounded buffer: deterministic given seed."""
    if buffer <= 1:
        yield from rows
        return
    rng = np.random.default_rng(seed)
    pool: list[np.ndarray] = []
    for row in rows:
        if len(pool) < buffer:
            pool.append(row)
            continue
        i = int(rng.integers(buffer))
        pool[i], row = row, pool[i]
        yield row
    for i in rng.permutation(len(pool)):
        yield pool[i]


def pack(corpus, tokenizer, seq_len: int, *, add_bos: bool = True, batch_size: int = 8, seed: int = 0,
         shuffle_buffer: int = 1024, max_tokens: int | None = None,
         drop_remainder: bool = True) -> Iterator[np.ndarray]:
    """Token batches int32 [batch_size, seq_len] from a corpus, streamed.

    Documents are tokenised (without BOS), joined with EOS separators and cut into chunks
    of seq_len - 1 tokens each prefixed with BOS (add_bos) or of seq_len tokens; the
    ragged tail is dropped. Chunks pass through a shuffle buffer of `shuffle_buffer`
    rows seeded by `seed` (<= 1: corpus order). At most `max_tokens` tokens
    (max_tokens // seq_len rows) are read; a final partial batch is dropped unless
    `drop_remainder=False`. `tokenizer` needs encode(text, add_bos=False), bos_id, eos_id.
    """
    corpus = as_corpus(corpus)
    if batch_size < 1:
        raise ShapeError(f"batch_size must be >= 1, got {batch_size}")
    rows = _shuffled(_sequences(corpus, tokenizer, seq_len, add_bos=add_bos, max_tokens=max_tokens),
                     shuffle_buffer, seed)
    n_rows = n_batches = 0
    batch: list[np.ndarray] = []
    for row in rows:
        n_rows += 1
        batch.append(row)
        if len(batch) == batch_size:
            yield np.stack(batch)
            n_batches += 1
            batch = []
    if batch and not drop_remainder:
        yield np.stack(batch)
        n_batches += 1
    if n_batches == 0:
        if n_rows == 0:
            raise JfigError(f"corpus {corpus.description} is empty: it has no documents, or fewer tokens than one "
                            f"sequence of seq_len={seq_len}; expected at least {seq_len - int(add_bos)} tokens")
        raise JfigError(f"corpus {corpus.description} packs into only {n_rows} sequences of {seq_len} tokens, fewer "
                        f"than one batch of {batch_size}; lower batch_size or pass drop_remainder=False")


def _tokenizer_of(tokenizer_or_model):
    tok = getattr(tokenizer_or_model, "tokenizer", tokenizer_or_model)
    if tok is None or not hasattr(tok, "encode"):
        raise JfigError("packing text needs a tokenizer; this model has none (pass token arrays instead)")
    return tok


def token_batches(corpus, tokenizer_or_model, seq_len: int = DEFAULT_SEQ_LEN, **kw) -> Iterator[np.ndarray]:
    """`pack(Corpus.from_spec(corpus), tokenizer, seq_len, **kw)`; a Model stands for its tokenizer."""
    return pack(as_corpus(corpus), _tokenizer_of(tokenizer_or_model), seq_len, **kw)


def tokens_from(tokens_or_corpus, model, seq_len: int | None = None, *, add_bos: bool = True, seed: int = 0,
                shuffle_buffer: int = 1024, max_tokens: int | None = None) -> np.ndarray:
    """int32 tokens [n, seq] from either a token array (validated and passed through) or a
    corpus / spec (packed with the model's tokenizer; bound the size with max_tokens)."""
    if looks_like_tokens(tokens_or_corpus):
        t = np.asarray(tokens_or_corpus)
        if t.ndim == 2 and t.shape[0] == 0:
            raise ShapeError(f"tokens must be an int array [n, seq] with n, seq > 0, got shape {t.shape}")
        t = np.asarray(check_tokens(t, getattr(model, "vocab_size", None)))
        if seq_len is not None and t.shape[1] != seq_len:
            raise ShapeError(f"tokens have sequence length {t.shape[1]}, expected seq_len={seq_len}")
        return t
    rows = list(_shuffled(_sequences(as_corpus(tokens_or_corpus), _tokenizer_of(model), seq_len or DEFAULT_SEQ_LEN,
                                     add_bos=add_bos, max_tokens=max_tokens), shuffle_buffer, seed))
    if not rows:
        raise JfigError(f"corpus is empty: it has no documents, or fewer tokens than one sequence of "
                        f"seq_len={seq_len or DEFAULT_SEQ_LEN}")
    return np.stack(rows)


def looks_like_tokens(x) -> bool:
    if hasattr(x, "dtype") and hasattr(x, "shape"):
        return True
    if isinstance(x, (list, tuple)) and x:
        first = x[0]
        return isinstance(first, (int, np.integer)) or (isinstance(first, (list, tuple, np.ndarray))
                                                         and not isinstance(first, str))
    return False


# ---------------------------------------------------------------------- hashing
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition when it exposes one, else its special ids and type."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
    for attr in ("bos_id", "eos_id", "vocab_size"):
        h.update(f"{attr}={getattr(tokenizer, attr, None)};".encode())
    return h.hexdigest()


def corpus_hash(corpus, tokenizer=None, **settings) -> str:
    """sha256 hex over every document's text (streamed) and the packing `settings`
    (seq_len, add_bos, seed, ...; any JSON-able values) and the tokenizer's fingerprint."""
    h = hashlib.sha256(b"jfig-corpus-v1\0")
    for doc in as_corpus(corpus):
        b = doc.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    if tokenizer is not None:
        h.update(tokenizer_fingerprint(getattr(tokenizer, "tokenizer", None) or tokenizer).encode())
    return h.hexdigest()
