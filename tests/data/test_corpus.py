"""Corpus sources, packing, hashing and prompt suites (toy tokenizer; one slow test on the real one)."""
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jfig.data import corpus as corpus_mod
from jfig.data import (BEHAVIORS, Corpus, all_prompts, corpus_hash, default_corpus, induction_tokens, pack,
                       prompt_suite, token_batches, tokens_from)
from jfig.data.prompts import CAPITALS, NEGATIVE, POSITIVE
from jfig.errors import FormatError, JfigError, ShapeError

BOS, EOS = 1, 2


class ToyTokenizer:
    """Each whitespace-separated integer is its own token id."""

    bos_id, eos_id, vocab_size = BOS, EOS, 1000

    def encode(self, text, add_bos=False):
        return ([BOS] if add_bos else []) + [int(w) for w in text.split()]


class ToyModel:
    tokenizer = ToyTokenizer()
    vocab_size = 1000


TOK = ToyTokenizer()


def numbered_docs(n_docs, words=7, start=10):
    return [" ".join(str(start + (d * words + i) % 900) for i in range(words)) for d in range(n_docs)]


# ---------------------------------------------------------------------------- packing
def test_exact_chunking_with_bos_and_eos_separators():
    docs = Corpus.from_texts(["10 11 12", "13 14", "15 16 17 18"])
    # stream: 10 11 12 EOS 13 14 EOS 15 16 17 18; chunks of 3 after BOS; tail [17, 18] dropped
    got = list(pack(docs, TOK, 4, batch_size=1, shuffle_buffer=0))
    assert [b.tolist() for b in got] == [[[1, 10, 11, 12]], [[1, 2, 13, 14]], [[1, 2, 15, 16]]]
    assert all(b.dtype == np.int32 and b.shape == (1, 4) for b in got)
    no_bos = list(pack(docs, TOK, 4, add_bos=False, batch_size=1, shuffle_buffer=0))
    assert [b.tolist() for b in no_bos] == [[[10, 11, 12, 2]], [[13, 14, 2, 15]]]


def test_batches_drop_partial_last_batch_unless_asked():
    docs = Corpus.from_texts(["10 11 12", "13 14", "15 16 17 18"])
    assert [b.shape for b in pack(docs, TOK, 4, batch_size=2, shuffle_buffer=0)] == [(2, 4)]
    kept = list(pack(docs, TOK, 4, batch_size=2, shuffle_buffer=0, drop_remainder=False))
    assert [b.shape for b in kept] == [(2, 4), (1, 4)]
    with pytest.raises(JfigError, match="fewer than one batch of 8"):
        list(pack(docs, TOK, 4, batch_size=8))


def test_shuffle_is_deterministic_per_seed_and_a_permutation():
    docs = Corpus.from_texts(numbered_docs(300))
    run = lambda **kw: np.concatenate(list(pack(docs, TOK, 16, batch_size=4, drop_remainder=False, **kw)))
    plain = run(shuffle_buffer=0)
    a, b, c = run(seed=0, shuffle_buffer=32), run(seed=0, shuffle_buffer=32), run(seed=1, shuffle_buffer=32)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, plain)
    assert Counter(map(tuple, a.tolist())) == Counter(map(tuple, plain.tolist()))


def test_packing_is_lazy_and_max_tokens_bounds_reading():
    produced = [0]

    def docs():
        for d in range(10**7):
            produced[0] += 1
            yield " ".join(str(10 + (d + i) % 900) for i in range(20))

    corpus = Corpus.from_generator(docs, "endless")
    first = next(pack(corpus, TOK, 32, batch_size=2, shuffle_buffer=4))
    assert first.shape == (2, 32) and produced[0] < 100
    produced[0] = 0
    out = list(pack(corpus, TOK, 32, batch_size=2, shuffle_buffer=4, max_tokens=32 * 10 + 5))
    assert sum(b.size for b in out) == 32 * 10          # 10 sequences, 5 whole batches
    assert produced[0] < 40
    with pytest.raises(JfigError, match="less than one sequence"):
        next(pack(corpus, TOK, 32, max_tokens=31))


def test_large_text_file_streams_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "FILE_PIECE_CHARS", 1000)
    lines = [" ".join(str(10 + (i + j) % 900) for j in range(10)) + "\n" for i in range(5000)]
    path = tmp_path / "big.txt"
    path.write_text("".join(lines))
    pieces = iter(Corpus.from_spec(path))
    first = next(pieces)
    assert 1000 <= len(first) < 1100 and first.endswith("\n")
    assert first + "".join(pieces) == path.read_text()


def test_token_batches_and_tokens_from(tmp_path):
    (tmp_path / "a.txt").write_text(" ".join(map(str, range(10, 200))))
    batches = list(token_batches(tmp_path, ToyModel(), 8, batch_size=3, shuffle_buffer=0))
    assert batches[0][0].tolist() == [1, 10, 11, 12, 13, 14, 15, 16]
    arr = tokens_from(tmp_path, ToyModel(), 8, shuffle_buffer=0)
    assert arr.shape == (190 // 7, 8) and arr.dtype == np.int32
    np.testing.assert_array_equal(arr[:3], batches[0])
    given = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(tokens_from(given, ToyModel()), given)
    assert tokens_from([[5, 6, 7]], ToyModel()).shape == (1, 3)
    with pytest.raises(ShapeError, match="integer dtype"):
        tokens_from(np.zeros((2, 3), np.float32), ToyModel())
    with pytest.raises(ShapeError, match="outside the vocabulary"):
        tokens_from(np.array([[1, 5000]]), ToyModel())
    with pytest.raises(ShapeError, match="seq_len=8"):
        tokens_from(given, ToyModel(), 8)


# ---------------------------------------------------------------------------- sources
def test_text_folder_is_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("30 31")
    (tmp_path / "a.txt").write_text("10 11")
    (tmp_path / "b" / "c.rst").write_text("20 21")
    (tmp_path / "skip.py").write_text("99")
    (tmp_path / "empty.txt").write_text("")
    assert list(Corpus.from_spec(tmp_path)) == ["10 11", "20 21", "30 31"]
    assert list(Corpus.from_spec(str(tmp_path / "a.txt"))) == ["10 11"]
    both = Corpus.from_spec([tmp_path / "a.txt", tmp_path / "b" / "c.rst"])
    assert list(both) == list(both) == ["10 11", "20 21"]


def test_jsonl_good_and_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "10 11", "id": 1}\n\n{"text": "12", "id": 2}\n')
    assert list(Corpus.from_spec(good)) == ["10 11", "12"]
    other = tmp_path / "other.jsonl"
    other.write_text('{"body": "10 11"}\n')
    assert list(Corpus.from_spec(other, text_field="body")) == ["10 11"]
    with pytest.raises(FormatError, match=re.escape(f"{other}:1") + ".*no text field 'text'.*body"):
        list(Corpus.from_spec(other))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "10"}\n{"text": oops}\n')
    docs = iter(Corpus.from_spec(bad))
    assert next(docs) == "10"
    with pytest.raises(FormatError, match=re.escape(f"{bad}:2") + ": not valid JSON"):
        next(docs)
    typed = tmp_path / "typed.jsonl"
    typed.write_text('{"text": 5}\n')
    with pytest.raises(FormatError, match="expected a string"):
        list(Corpus.from_spec(typed))


def test_parquet_reads_batches_and_names_missing_column(tmp_path):
    path = tmp_path / "docs.parquet"
    table = pa.table({"text": [f"{10 + i} {11 + i}" for i in range(50)] + [None], "n": list(range(51))})
    pq.write_table(table, path, row_group_size=7)
    docs = list(Corpus.from_parquet(path, batch_rows=5))
    assert docs == [f"{10 + i} {11 + i}" for i in range(50)]
    assert list(Corpus.from_spec(path)) == docs
    with pytest.raises(FormatError, match=r"no column 'body'; its columns are \['text', 'n'\]"):
        Corpus.from_spec(path, text_field="body")
    with pytest.raises(FormatError, match="column 'n'.*expected string"):
        Corpus.from_parquet(path, "n")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(FormatError, match="broken.parquet"):
        Corpus.from_spec(broken)


def test_empty_corpus_and_too_short_corpus(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(JfigError, match="is empty: it has no documents.*expected at least 7 tokens"):
        list(pack(tmp_path / "empty", TOK, 8))
    with pytest.raises(JfigError, match="is empty"):
        list(pack(Corpus.from_texts(["10 11"]), TOK, 8))
    with pytest.raises(JfigError, match="is empty"):
        tokens_from(Corpus.from_texts([]), ToyModel(), 8)


def test_unreadable_and_missing_files_name_the_file(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 \xff\xfe")
    with pytest.raises(FormatError, match="latin1.txt.*UTF-8"):
        list(Corpus.from_spec(bad))
    with pytest.raises(FormatError, match="nowhere.txt.*does not exist"):
        Corpus.from_spec(tmp_path / "nowhere.txt")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(FormatError, match="data.csv.*suffix"):
        Corpus.from_spec(tmp_path / "data.csv")


def test_corpus_hash_tracks_content_and_settings():
    a = Corpus.from_texts(["10 11", "12"])
    h = corpus_hash(a, TOK, seq_len=8, add_bos=True)
    assert h == corpus_hash(Corpus.from_texts(["10 11", "12"]), TOK, seq_len=8, add_bos=True)
    assert len(h) == 64
    assert h != corpus_hash(Corpus.from_texts(["10 11", "13"]), TOK, seq_len=8, add_bos=True)
    assert h != corpus_hash(Corpus.from_texts(["10 1", "112"]), TOK, seq_len=8, add_bos=True)  # boundaries count
    assert h != corpus_hash(a, TOK, seq_len=16, add_bos=True)
    assert h != corpus_hash(a, TOK, seq_len=8, add_bos=False)
    assert h != corpus_hash(a, seq_len=8, add_bos=True)


def test_default_corpus_is_offline_docs_plus_prompts():
    docs = list(default_corpus())
    from pydoc_data.topics import topics
    assert len(docs) == len([t for t in topics.values() if t]) + len(all_prompts())
    assert any("The capital of France is Paris" in d for d in docs)
    with pytest.raises(JfigError, match="pass model="):
        default_corpus(n_samples=3)


# ---------------------------------------------------------------------------- prompt suites
@pytest.mark.parametrize("name", BEHAVIORS)
def test_prompt_suites_are_deterministic(name):
    a, b = prompt_suite(name, 40, seed=3), prompt_suite(name, 40, seed=3)
    assert a == b and len(a) == 40
    assert a != prompt_suite(name, 40, seed=4)
    for p in a:
        assert p.behavior == name and p.text and not p.text.endswith(" ")
        # chat prompts end a user turn: the assistant's reply starts without a space
        assert p.chat or (p.answer.startswith(" ") and p.distractor.startswith(" "))
        assert p.answer != p.distractor and p.corrupted != p.text
        assert p.full_text == p.text + p.answer


def test_prompt_answers_are_right():
    capitals = dict(CAPITALS)
    facts = prompt_suite("factual_recall", seed=0)
    assert len(facts) == 3 * len(CAPITALS) + 22 and len(set(facts)) == len(facts)
    for p in facts:
        if p.label == "capital":
            country = next(c for c in capitals if c in p.text)
            assert p.answer == " " + capitals[country]
    for p in prompt_suite("induction", 30, seed=1):
        words = p.text.split()
        k = len(words) - 6
        assert words[:k] == words[6:] and p.answer == " " + words[k] and p.distractor.strip() not in words
    for p in prompt_suite("ioi", 30, seed=1):
        io, s = p.answer.strip(), p.distractor.strip()
        assert p.text.count(io) == 1 and p.text.count(s) == 2 and p.label in ("ABBA", "BABA")
        assert p.text.index(io) < p.text.index(s) if p.label == "ABBA" else p.text.index(s) < p.text.index(io)
    for p in prompt_suite("sentiment", 30, seed=1):
        words = POSITIVE if p.label == "positive" else NEGATIVE
        assert any(w in p.text for w in words)
        assert p.answer in (" great", " positive") if p.label == "positive" else p.answer in (" awful", " terrible", " negative")
    with pytest.raises(JfigError, match="unknown prompt suite"):
        prompt_suite("no_such_behaviour")


def test_induction_tokens_repeat_without_duplicates():
    t = induction_tokens(5, 8, 50, seed=0, bos_id=1, low=3)
    assert t.shape == (5, 17) and t.dtype == np.int32 and (t[:, 0] == 1).all()
    np.testing.assert_array_equal(t[:, 1:9], t[:, 9:])
    assert all(len(set(r)) == 8 for r in t[:, 1:9].tolist()) and t[:, 1:].min() >= 3


# ---------------------------------------------------------------------------- the real tokenizer
@pytest.mark.slow
def test_default_corpus_packs_with_the_real_tokenizer():
    import jfig
    model = jfig.load_model("smollm2-135m")
    tok = model.tokenizer
    batches = list(token_batches("default", model, 128, batch_size=4, max_tokens=4096, seed=0))
    arr = np.concatenate(batches)
    assert arr.shape == (32, 128) and (arr[:, 0] == tok.bos_id).all()
    assert arr.min() >= 0 and arr.max() < model.config.vocab_size
    assert (arr[:, 1:] == tok.bos_id).sum() == 0 and (arr == tok.eos_id).sum() > 0
    assert len(tok.decode(arr[0, 1:]).split()) > 20
    assert corpus_hash("default", tok, seq_len=128) != corpus_hash("default", tok, seq_len=64)
