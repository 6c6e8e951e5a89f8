"""Text <-> token ids, built from a GGUF file's metadata or from an HF `tokenizer.json`.

`Tokenizer.from_gguf` rebuilds the tokenizer a GGUF describes the way HF transformers does
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), so both give the same ids:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE. Tokens are respelled in the byte alphabet if
  they use other characters; merges come from the file. The pre-tokenizer is HF's split for
  `tokenizer.ggml.pre` (Llama-3, Qwen-2, ...: `PRE_TOKENIZER_SPLITS`) or GPT-2's regex inside
  `ByteLevel` (`GPT2_REGEX_PRE_TOKENIZERS`); any other value is refused with a FormatError
  listing `SUPPORTED_PRE_TOKENIZERS`, since HF's fallback to GPT-2's regex would silently
  mis-split such text.
- `tokenizer.ggml.model == "llama"`: SentencePiece BPE with byte fallback. Merges are rebuilt
  from the token scores. Gemma and Phi-3 files get HF's per-architecture fixes.
- Token type 3 (control) becomes a special added token, type 4 (user-defined) a plain added
  token; both are matched whole in the text. The bos/eos/unk/pad tokens are special too.
- BOS is prepended when `tokenizer.ggml.add_bos_token` says so (SentencePiece default: yes).

One deliberate difference: when a file lacks the default special strings of HF's tokenizer
class (`<|endoftext|>` for byte-level, `<bos>`... for Gemma), HF appends them as new ids past
the model's vocabulary; we do not, so such a literal string is encoded as plain text.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from jfig.errors import FormatError, JfigError
from jfig.models.gguf_reader import GGUFContents, read_gguf

try:  # chat templates only; the "chat" extra installs it
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError:  # pragma: no cover - depends on the environment
    jinja2 = None

__all__ = ["GPT2_REGEX_PRE_TOKENIZERS", "PRE_TOKENIZER_SPLITS", "SUPPORTED_PRE_TOKENIZERS", "Tokenizer",
           "UnknownTokenError", "byte_alphabet", "pre_tokenizer_name"]


class UnknownTokenError(JfigError, KeyError):
    """A token string or id that the vocabulary does not have."""

    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------- byte alphabet


@functools.lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte: printable Latin-1 bytes stand for themselves,
    the other 68 bytes are given the code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    spelling = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _spell_bytes(text: str) -> str:
    alphabet = byte_alphabet()
    return "".join(alphabet[b] for b in text.encode("utf-8"))


def _in_byte_alphabet(text: str) -> bool:
    return set(text) <= _byte_alphabet_set()


@functools.lru_cache(maxsize=1)
def _byte_alphabet_set() -> frozenset[str]:
    return frozenset(byte_alphabet().values())


# ----------------------------------------------------------------------------- pre-tokenizer splits

# The splits HF applies for a `tokenizer.ggml.pre` value (transformers, gguf_tokenizer_mapping.py).
# The values of GPT2_REGEX_PRE_TOKENIZERS keep GPT-2's own regex inside the ByteLevel pre-tokenizer.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
         "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3,
    ),
    "tekken": _TEKKEN,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}

# `tokenizer.ggml.pre` values whose pre-tokenizer is GPT-2's regex inside ByteLevel (llama.cpp's
# GPT-2 group, plus "default" and "smollm", which HF also maps to it; SmolLM's own digit split
# changes nothing for its vocabulary, which has single-digit tokens only). A file without the key
# is read as "default".
GPT2_REGEX_PRE_TOKENIZERS = ("default", "gpt-2", "phi-2", "mpt", "olmo", "jais", "roberta-bpe", "smollm")
# Every `tokenizer.ggml.pre` value a byte-level GGUF tokenizer may have; others are refused.
SUPPORTED_PRE_TOKENIZERS = tuple(sorted({*GPT2_REGEX_PRE_TOKENIZERS, *PRE_TOKENIZER_SPLITS}))

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4
_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")


# ----------------------------------------------------------------------------- GGUF builders


def pre_tokenizer_name(meta: dict[str, Any], where: str) -> str:
    """The byte-level pre-tokenizer a GGUF names (``tokenizer.ggml.pre``, "default" when absent);
    FormatError naming it unless it is in :data:`SUPPORTED_PRE_TOKENIZERS`."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_PRE_TOKENIZERS:
        raise FormatError(f"{where}: GGUF tokenizer.ggml.pre = {pre!r} is not supported; supported: "
                          f"{list(SUPPORTED_PRE_TOKENIZERS)}. Pass the model's tokenizer.json to "
                          f"Tokenizer.from_file instead")
    return pre


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    ranked by the merged token's score (best first), then by the lengths of the two halves.

    Ties keep the order HF's `generate_merges` gives them, so ranks (and ids) agree with it.
    """
    index = {t: i for i, t in enumerate(tokens)}
    score_of = dict(zip(tokens, scores))
    merges: list[tuple[str, str, float]] = []
    for token, score in score_of.items():
        pairs = [
            (token[:k], token[k:], score)
            for k in range(1, len(token))
            if token[:k] in index and token[k:] in index
        ]
        pairs.sort(key=lambda p: (index[p[0]], index[p[1]]))
        merges.extend(pairs)
    merges.sort(key=lambda p: (p[2], len(p[0]), len(p[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _file_merges(meta: dict[str, Any], where: str) -> list[tuple[str, str]] | None:
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise FormatError(f"{where}: merge {m!r} in tokenizer.ggml.merges is not two tokens "
                              f"separated by one space")
        pairs.append((parts[0], parts[1]))
    return pairs


def _scored_merges(meta: dict[str, Any], tokens: Sequence[str], where: str,
                   scores: Sequence[float] | None = None) -> list[tuple[str, str]]:
    merges = _file_merges(meta, where)
    if merges is not None:
        return merges
    if scores is None:
        scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise FormatError(f"{where}: the tokenizer has neither tokenizer.ggml.merges nor "
                          f"tokenizer.ggml.scores; expected one to build BPE merges")
    return _merges_from_scores(tokens, scores)


def _byte_level_backend(meta: dict[str, Any], tokens: list[str], where: str) -> Backend:
    split = PRE_TOKENIZER_SPLITS.get(pre_tokenizer_name(meta, where))
    vocab = {(t if _in_byte_alphabet(t) else _spell_bytes(t)): i for i, t in enumerate(tokens)}
    merges = _scored_merges(meta, tokens, where)
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                 continuing_subword_prefix="", end_of_word_suffix="",
                                 fuse_unk=False))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(meta: dict[str, Any], tokens: list[str], where: str, arch: str) -> Backend:
    unk_token = None
    if arch in _GEMMA_ARCHS:
        # Gemma stores tokens of 2+ spaces as real spaces; they merge as "▁" runs. Its merge
        # order is the token order, not the scores.
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        merges = _scored_merges(meta, tokens, where, scores=[-i for i in range(len(tokens))])
        unk_token = "<unk>"
    else:
        merges = _scored_merges(meta, tokens, where)
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True,
                                 byte_fallback=True, dropout=None))
    replace = decoders.Replace("\u2581", " ")
    if arch in _GEMMA_ARCHS:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence([replace, decoders.ByteFallback(), decoders.Fuse()])
        return backend
    if arch == "phi3":
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [replace, decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return backend


def _add_gguf_tokens(backend: Backend, meta: dict[str, Any], tokens: list[str], byte_level: bool) -> None:
    """Control and special tokens as special added tokens, user-defined ones as plain added
    tokens, so each is matched whole in the text. A byte-level token spelled outside the byte
    alphabet is a mislabelled one (HF skips it too: adding it would grow the vocabulary)."""
    types = meta.get("tokenizer.ggml.token_type") or ()

    def spelled_ok(t: str) -> bool:
        return not byte_level or _in_byte_alphabet(t)

    control = [t for t, kind in zip(tokens, types) if kind == _TOKEN_CONTROL and spelled_ok(t)]
    for key in ("bos", "eos", "unknown", "padding"):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens) and spelled_ok(tokens[i]):
            control.append(tokens[i])
    if control:
        backend.add_special_tokens(
            [AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(control)])
    vocab = backend.get_vocab(with_added_tokens=True)
    user = [t for t, kind in zip(tokens, types) if kind == _TOKEN_USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


# ----------------------------------------------------------------------------- Tokenizer


class Tokenizer:
    """A tokenizer: text to ids and back, plus the model's special ids and chat template.

    Immutable after construction. Equality and hash are by identity, so it can be a static
    field of an equinox Module.

    Example:
        >>> tok = Tokenizer.from_gguf(default_gguf_path())   # doctest: +SKIP
        >>> tok.encode("Hello world")                         # doctest: +SKIP
        [19556, 905]
    """

    def __init__(
        self,
        backend: Any,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
        source: str = "",
    ):
        """Wrap a `tokenizers.Tokenizer`; BOS/EOS are added here, not by its post-processor."""
        self._backend = backend
        self._bos_id, self._eos_id, self._pad_id, self._unk_id = bos_id, eos_id, pad_id, unk_id
        self._add_bos = bool(add_bos) and bos_id is not None
        self._add_eos = bool(add_eos) and eos_id is not None
        self._chat_template = chat_template
        self._source = source
        # One past the largest id: a vocabulary with respelled duplicates has holes.
        self._vocab_size = 1 + max(backend.get_vocab(with_added_tokens=True).values(), default=-1)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_gguf(cls, contents_or_path: GGUFContents | str | os.PathLike) -> Tokenizer:
        """Build the tokenizer described by a GGUF's `tokenizer.*` metadata.

        Args:
            contents_or_path: a `GGUFContents` from `read_gguf`, or a path to a .gguf file.
        """
        contents = (contents_or_path if isinstance(contents_or_path, GGUFContents)
                    else read_gguf(contents_or_path))
        meta, where = contents.metadata, f"GGUF file {contents.path}"
        model = contents.require("tokenizer.ggml.model")
        tokens = list(contents.require("tokenizer.ggml.tokens"))
        arch = meta.get("general.architecture", "")
        if model == "gpt2":
            backend = _byte_level_backend(meta, tokens, where)
            default_add_bos = False
        elif model == "llama":
            backend = _sentencepiece_backend(meta, tokens, where, arch)
            default_add_bos = True  # llama.cpp's default for SentencePiece vocabularies
        else:
            raise FormatError(
                f"{where}: tokenizer.ggml.model {model!r} is not supported; expected 'gpt2' "
                f"(byte-level BPE) or 'llama' (SentencePiece). Pass the model's tokenizer.json to "
                f"Tokenizer.from_file instead"
            )
        _add_gguf_tokens(backend, meta, tokens, byte_level=(model == "gpt2"))

        def token_id(key: str) -> int | None:
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            if i is None:
                return None
            if not 0 <= i < len(tokens):
                raise FormatError(f"{where}: tokenizer.ggml.{key}_token_id is {i}, expected an "
                                  f"id below the vocabulary size {len(tokens)}")
            return int(i)

        chat_template = meta.get("tokenizer.chat_template")
        return cls(
            backend,
            bos_id=token_id("bos"),
            eos_id=token_id("eos"),
            pad_id=token_id("padding"),
            unk_id=token_id("unknown"),
            add_bos=meta.get("tokenizer.ggml.add_bos_token", default_add_bos),
            add_eos=meta.get("tokenizer.ggml.add_eos_token", False),
            chat_template=chat_template if isinstance(chat_template, str) else None,
            source=str(contents.path),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load an HF `tokenizer.json`, or a folder holding one.

        A `tokenizer_config.json` beside it supplies bos/eos/pad/unk tokens, `add_bos_token`,
        `add_eos_token` and `chat_template` (as does a `chat_template.jinja`). Without an
        `add_bos_token` there, BOS/EOS follow what the file's post-processor adds.
        """
        path = pathlib.Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FormatError(f"tokenizer file {file} does not exist (expected an HF tokenizer.json "
                              f"or a folder containing one)")
        try:
            backend = Backend.from_file(str(file))
        except Exception as err:  # noqa: BLE001 -- tokenizers raises its own Exception type
            raise FormatError(f"{file} is not a valid HF tokenizer.json: {err}") from err

        config: dict[str, Any] = {}
        config_file = file.parent / "tokenizer_config.json"
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise FormatError(f"{config_file} is not valid JSON: {err}") from err

        def token_id(name: str) -> int | None:
            value = config.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        bos_id, eos_id = token_id("bos_token"), token_id("eos_token")
        prefix, suffix = _post_processor_specials(backend)
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = len(prefix) == 1 and (bos_id is None or prefix == [bos_id])
            bos_id = prefix[0] if add_bos else bos_id
        add_eos = config.get("add_eos_token")
        if add_eos is None:
            add_eos = len(suffix) == 1 and (eos_id is None or suffix == [eos_id])
            eos_id = suffix[0] if add_eos else eos_id

        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
            chat_template = named.get("default")
        jinja_file = file.parent / "chat_template.jinja"
        if chat_template is None and jinja_file.is_file():
            chat_template = jinja_file.read_text(encoding="utf-8")
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=token_id("pad_token"),
            unk_id=token_id("unk_token"),
            add_bos=bool(add_bos),
            add_eos=bool(add_eos),
            chat_template=chat_template if isinstance(chat_template, str) else None,
            source=str(file),
        )

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """One past the largest token id, added tokens included (the embedding rows needed)."""
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    @property
    def add_bos(self) -> bool:
        """Whether `encode` prepends BOS by default."""
        return self._add_bos

    @property
    def add_eos(self) -> bool:
        """Whether `encode` appends EOS by default."""
        return self._add_eos

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template, if the model has one."""
        return self._chat_template

    @property
    def backend(self) -> Any:
        """The wrapped `tokenizers.Tokenizer`; treat as read-only."""
        return self._backend

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self._bos_id}, "
                f"eos_id={self._eos_id}, add_bos={self._add_bos}, source={self._source!r})")

    # ------------------------------------------------------------------ encode / decode

    def _wrap(self, ids: list[int], add_bos: bool | None) -> list[int]:
        if self._add_bos if add_bos is None else add_bos:
            if self._bos_id is None:
                raise JfigError(f"add_bos=True but this tokenizer has no BOS token ({self._source})")
            ids = [self._bos_id, *ids]
        if self._add_eos:
            ids = [*ids, self._eos_id]
        return ids

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, length `[seq]`. Special-token strings in `text` (e.g.
        `<|im_start|>`) become their ids. `add_bos=None` uses the model's default."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._wrap(self._backend.encode(text, add_special_tokens=False).ids, add_bos)

    def encode_batch(self, texts: Iterable[str], *, add_bos: bool | None = None) -> list[list[int]]:
        """`[encode(t) for t in texts]`, tokenised in parallel. Ragged: no padding."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch expects an iterable of str")
        encodings = self._backend.encode_batch(texts, add_special_tokens=False)
        return [self._wrap(e.ids, add_bos) for e in encodings]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids` (any int sequence or 1-D array). Special tokens are kept unless
        `skip_special`."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UnknownTokenError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return self._backend.decode(ids, skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str:
        """The vocabulary string of id `i` (byte-level vocabularies spell space as 'Ġ')."""
        token = self._backend.id_to_token(int(i)) if int(i) >= 0 else None
        if token is None:
            raise UnknownTokenError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return token

    def token_to_id(self, token: str) -> int:
        """The id of vocabulary string `token`."""
        i = self._backend.token_to_id(token)
        if i is None:
            raise UnknownTokenError(f"token {token!r} is not in the vocabulary ({self._source})")
        return i

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *,
                            add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """Render `messages` (dicts with "role" and "content") with the model's chat template.

        Renders as HF does: sandboxed Jinja with `trim_blocks`/`lstrip_blocks`, the special
        token strings (`bos_token`, ...) in scope, keys whose value is None dropped. Encode the
        result with `add_bos=False` (the template writes its own BOS), or call `encode_chat`.
        """
        if self._chat_template is None:
            raise JfigError(f"this tokenizer has no chat template ({self._source}); expected "
                            f"tokenizer.chat_template in the GGUF or chat_template in "
                            f"tokenizer_config.json")
        template = _compile_chat_template(self._chat_template)
        clean = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        specials = {
            name: self._backend.id_to_token(i)
            for name, i in (("bos_token", self._bos_id), ("eos_token", self._eos_id),
                            ("unk_token", self._unk_id), ("pad_token", self._pad_id))
            if i is not None
        }
        return template.render(**{**specials, **kwargs, "messages": clean,
                                  "add_generation_prompt": add_generation_prompt})

    def encode_chat(self, messages: Sequence[dict[str, Any]], *,
                    add_generation_prompt: bool = False, **kwargs: Any) -> list[int]:
        """Ids of the rendered chat, as HF's `apply_chat_template(..., tokenize=True)`."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        **kwargs)
        return self._backend.encode(text, add_special_tokens=False).ids


def _post_processor_specials(backend: Any) -> tuple[list[int], list[int]]:
    """Ids the tokenizer.json's post-processor puts before and after a single sequence."""
    probe = "a"
    plain = backend.encode(probe, add_special_tokens=False).ids
    full = backend.encode(probe, add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if plain and full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def _raise_template_error(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


if jinja2 is not None:

    class _GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text; render it as is."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> Any:
    if jinja2 is None:
        raise JfigError("rendering a chat template needs jinja2, which is not installed; install the chat "
                        "extra with `pip install 'jfig[chat]'`")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise FormatError(f"the chat template is not valid Jinja: {err}") from err
