"""Behaviour suites: prompts with a clean answer and a counterfactual one, and their tokens.

A suite is a name and a tuple of `jfig.data.Prompt`s: the built-in suites (factual recall,
induction, IOI, sentiment, refusal; `jfig.data.prompt_suite`) or a user's JSONL file with one
prompt per line:

    {"text": "The capital of France is", "answer": " Paris", "distractor": " Rome",
     "label": "capital", "corrupted": "The capital of Italy is", "chat": false}

`text`, `answer` and `distractor` are required; `label`, `corrupted` and `chat` are optional.
The metric of every suite is the logit difference between the first token of the answer and
the first token of the distractor at the prompt's last token (see metric.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..data.prompts import BEHAVIORS, Prompt, prompt_suite
from ..errors import FormatError, JfigError

REQUIRED_FIELDS = ("text", "answer", "distractor")
OPTIONAL_FIELDS = ("label", "corrupted", "chat")


@dataclass(frozen=True)
class BehaviorSuite:
    """A named set of prompts: `prompts` (tuple of jfig.data.Prompt)."""

    name: str
    prompts: tuple[Prompt, ...]

    def __post_init__(self):
        if not self.prompts:
            raise JfigError(f"behaviour suite {self.name!r} has no prompts; expected at least one")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_corrupted(self) -> bool:
        """Whether every prompt has a corrupted counterpart (needed for head patching)."""
        return all(p.corrupted is not None for p in self.prompts)


class SuiteTokens(NamedTuple):
    """A suite tokenised for one model; rows right-padded (causal models never see the padding).

    tokens [n, w] int32, last [n] (index of each row's last prompt token, where the metric is
    read), answer / distractor [n] (first token of each), corrupted [n, w] or None with its own
    corrupted_last [n], aligned [n] bool (the corrupted row has the clean row's length, so the two
    match position by position).
    """

    tokens: np.ndarray
    last: np.ndarray
    answer: np.ndarray
    distractor: np.ndarray
    corrupted: np.ndarray | None
    corrupted_last: np.ndarray | None
    aligned: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        """bool [n, w]: True at real (unpadded) prompt positions."""
        return np.arange(self.tokens.shape[1])[None, :] <= self.last[:, None]


def behavior_suite(name: str, n: int | None = None, seed: int = 0) -> BehaviorSuite:
    """A built-in suite (one of jfig.data.BEHAVIORS) of n prompts, or a JSONL file's suite when
    `name` is a path ending in .jsonl."""
    if isinstance(name, (str, Path)) and str(name).endswith(".jsonl"):
        return load_suite(name)
    if name not in BEHAVIORS:
        raise JfigError(f"unknown behaviour {name!r}; expected one of {BEHAVIORS} or a path to a .jsonl suite")
    return BehaviorSuite(name, tuple(prompt_suite(name, n, seed)))


def as_suite(suite, n: int | None = None, seed: int = 0) -> BehaviorSuite:
    """A BehaviorSuite from a suite, a built-in behaviour name, a .jsonl path or a list of Prompts."""
    if isinstance(suite, BehaviorSuite):
        return suite
    if isinstance(suite, (str, Path)):
        return behavior_suite(suite, n, seed)
    if isinstance(suite, (list, tuple)) and suite and all(isinstance(p, Prompt) for p in suite):
        return BehaviorSuite(suite[0].behavior, tuple(suite))
    if isinstance(suite, (list, tuple)) and suite and all(isinstance(p, dict) for p in suite):
        return BehaviorSuite("custom", tuple(prompt_from_row(r, "custom", f"suite row {i}") for i, r in enumerate(suite)))
    raise JfigError(f"expected a behaviour suite: a BehaviorSuite, one of {BEHAVIORS}, a .jsonl path, a list of "
                    f"jfig.data.Prompt or a list of dicts with {REQUIRED_FIELDS}; got {type(suite).__name__}")


def load_suite(path, name: str | None = None) -> BehaviorSuite:
    """Read a JSONL suite (one prompt object per line; fields in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"behaviour suite file {path} does not exist")
    prompts = []
    name = name or path.stem
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise FormatError(f"{path}, line {i}: not JSON ({err.msg})") from None
        prompts.append(prompt_from_row(row, name, f"{path}, line {i}"))
    if not prompts:
        raise FormatError(f"behaviour suite file {path} has no prompts")
    return BehaviorSuite(name, tuple(prompts))


def prompt_from_row(row, behavior: str, where: str) -> Prompt:
    """A Prompt from one suite row (a dict with the fields of the module docstring); FormatError
    naming `where` and the bad or missing fields otherwise."""
    if not isinstance(row, dict):
        raise FormatError(f"{where}: expected a JSON object with fields {REQUIRED_FIELDS}")
    missing = [k for k in REQUIRED_FIELDS if not isinstance(row.get(k), str) or not row.get(k)]
    if missing:
        raise FormatError(f"{where}: missing or empty field(s) {missing}; every prompt needs "
                          f"non-empty strings {REQUIRED_FIELDS} (optional: {OPTIONAL_FIELDS})")
    unknown = sorted(set(row) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise FormatError(f"{where}: unknown field(s) {unknown}; expected {REQUIRED_FIELDS + OPTIONAL_FIELDS}")
    if row["answer"] == row["distractor"]:
        raise FormatError(f"{where}: answer and distractor are both {row['answer']!r}")
    corrupted = row.get("corrupted")
    if corrupted is not None and not isinstance(corrupted, str):
        raise FormatError(f"{where}: corrupted must be a string, got {type(corrupted).__name__}")
    return Prompt(row["text"], row["answer"], row["distractor"], behavior, str(row.get("label", "")),
                  corrupted=corrupted, chat=bool(row.get("chat", False)))


def _prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        if tokenizer.chat_template is None:
            raise JfigError("this suite has chat prompts (chat=True) but the model's tokenizer has no chat template")
        return list(tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True))
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return bos + list(tokenizer.encode(text, add_bos=False))


def _first_token(tokenizer, prompt_ids: list[int], text: str, continuation: str, chat: bool) -> int:
    """The first token the model would emit for `continuation` after the prompt (merges across the
    boundary are avoided by encoding prompt + continuation and reading the token after the prompt)."""
    whole = (tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
             if chat else text) + continuation
    ids = list(tokenizer.encode(whole, add_bos=False))
    n = len(prompt_ids) - (0 if chat or tokenizer.bos_id is None else 1)
    if len(ids) > n and ids[:n] == prompt_ids[len(prompt_ids) - n:]:
        return int(ids[n])
    return int(tokenizer.encode(continuation, add_bos=False)[0])


def tokenize_suite(model, suite: BehaviorSuite) -> SuiteTokens:
    """Token arrays of a suite for `model` (which needs a tokenizer); errors name the bad prompt."""
    tok = model.tokenizer
    if tok is None:
        raise JfigError("tokenize_suite needs a model with a tokenizer; pass token arrays to the metric directly")
    rows, crow, ans, dis = [], [], [], []
    for i, p in enumerate(suite.prompts):
        ids = _prompt_ids(tok, p.text, p.chat)
        a, d = _first_token(tok, ids, p.text, p.answer, p.chat), _first_token(tok, ids, p.text, p.distractor, p.chat)
        if a == d:
            raise JfigError(f"suite {suite.name!r} prompt {i} ({p.text!r}): answer {p.answer!r} and distractor "
                            f"{p.distractor!r} begin with the same token {a}; the logit difference would be 0")
        rows.append(ids), ans.append(a), dis.append(d)
        crow.append(_prompt_ids(tok, p.corrupted, p.chat) if p.corrupted is not None else None)
    width = max(len(r) for r in rows + [c for c in crow if c is not None])
    pad = tok.pad_id if tok.pad_id is not None else 0

    def padded(r):
        return r + [pad] * (width - len(r))

    tokens = np.asarray([padded(r) for r in rows], np.int32)
    has = all(c is not None for c in crow)
    corrupted = np.asarray([padded(c) for c in crow], np.int32) if has else None
    aligned = np.asarray([c is not None and len(c) == len(r) for r, c in zip(rows, crow)])
    model.check_tokens(tokens)
    return SuiteTokens(tokens, np.asarray([len(r) - 1 for r in rows]), np.asarray(ans, np.int32),
                       np.asarray(dis, np.int32), corrupted,
                       np.asarray([len(c) - 1 for c in crow]) if has else None, aligned)
