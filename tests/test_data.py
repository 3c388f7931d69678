"""Sources, the text dataset builder and windowing."""

import logging
import random

import grain
import pytest

from hat.data import builtin, sources, tfds_text, windows
from hat.text.splitter import Splitter


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(text if isinstance(text, bytes) else text.encode())
  return path


def _random_docs(rng, n):
  alphabet = [b"a", b"bc", b" ", b"\n", b"\t", "é".encode(), "語".encode(), b"\xff",
              b"\x80", b"\x00", "🙂".encode()]
  return [b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 120)))
          for _ in range(n)]


def _reassemble(wins):
  docs, current = [], b""
  for win in wins:
    for seg in win:
      current += b"".join(seg.words)
      if seg.ends_doc:
        docs.append(current)
        current = b""
  assert current == b"", "stream ended inside a document"
  return docs


@pytest.mark.parametrize("rule", ["whitespace", "unicode"])
def test_windows_lose_and_duplicate_no_byte(rule):
  rng = random.Random(0)
  docs = _random_docs(rng, 60)
  split = Splitter(rule, 8).split
  wins = windows.windows_of(docs, split, window_bytes=24)
  assert all(sum(len(w) for s in win for w in s.words) <= 24 for win in wins)
  assert all(win and all(s.words for s in win) for win in wins)
  assert _reassemble(wins) == [d for d in docs if d]


def test_windows_word_boundaries_and_doc_tails():
  split = Splitter("whitespace", 8).split
  wins = windows.windows_of([b"aaa bbb ccc", b"dd eeee"], split, window_bytes=9)
  assert [[(s.words, s.ends_doc) for s in w] for w in wins] == [
      [((b"aaa ", b"bbb "), False)],
      [((b"ccc",), True), ((b"dd ",), False)],
      [((b"eeee",), True)],
  ]


def test_window_state_restore_continues_exactly():
  docs = _random_docs(random.Random(1), 30)
  split = Splitter("whitespace", 8).split

  def make():
    src = grain.MapDataset.source(docs).to_iter_dataset()
    return iter(windows.WindowIterDataset(src, split, 20))

  reference = list(make())
  it = make()
  for k in range(len(reference)):
    state = it.get_state()
    fresh = make()
    fresh.set_state(state)
    assert list(fresh) == reference[k:]
    next(it)


def test_flat_map_state_restore():
  src = grain.MapDataset.source(list(range(10))).to_iter_dataset()
  ds = windows.FlatMapIterDataset(src, lambda x: [x] * (x % 3))
  reference = list(ds)
  it = iter(ds)
  for k in range(len(reference)):
    fresh = iter(ds)
    fresh.set_state(it.get_state())
    assert list(fresh) == reference[k:]
    next(it)


def test_split_documents_modes():
  data = b"one\ntwo\n\n  \nthree\r\n\r\nfour\n"
  assert tfds_text.split_documents(data, "file") == [data.rstrip(b"\n")]
  assert tfds_text.split_documents(data, "blank_line") == [b"one\ntwo", b"three", b"four"]
  assert tfds_text.split_documents(data, "line") == [b"one", b"two", b"three", b"four"]


def test_parse_specs():
  mix = sources.parse_mixture("builtin=3,text:/a/b.txt, tfds:wiki/en:1.0.0:train[:5%]=0.5")
  assert [(s.scheme, s.arg, s.split, s.weight) for s in mix] == [
      ("builtin", "", "", 3.0), ("text", "/a/b.txt", "", 1.0),
      ("tfds", "wiki/en:1.0.0", "train[:5%]", 0.5)]
  assert sources.parse_source("tfds:lm1b").split == ""
  for bad in ("", "nope", "text:", "csv:x", "builtin=x", "builtin=0"):
    with pytest.raises(sources.SourceError):
      sources.parse_mixture(bad)
  assert sources.parse_eval_sets("", "builtin") == {"valid": "builtin"}
  assert sources.parse_eval_sets("en=text:a,de=text:b", "x") == {"en": "text:a",
                                                               "de": "text:b"}


def test_text_source_builds_splits_and_reuses(tmp_path, caplog):
  root = tmp_path / "corpus"
  docs = [f"document {i} says hello {'x' * i}".encode() for i in range(50)]
  _write(root / "a.txt", b"\n\n".join(docs[:30]))
  _write(root / "sub" / "b.txt", b"\n\n".join(docs[30:49]) + b"\n\n\xff\xfe bad utf8")
  _write(root / "img.txt", b"\x89PNG\x00\x00binary")
  _write(root / "ignored.md", "not a txt file")
  cache = tmp_path / "cache"
  with caplog.at_level(logging.WARNING):
    train = sources.open_source(f"text:{root}", "train", cache_dir=cache,
                                validation_fraction=0.1)
  val = sources.open_source(f"text:{root}", "validation", cache_dir=cache,
                            validation_fraction=0.1)
  assert "img.txt" in caplog.text and "not valid UTF-8" in caplog.text
  got = sorted([train[i] for i in range(len(train))] + [val[i] for i in range(len(val))])
  assert got == sorted(docs[:49] + [b"\xff\xfe bad utf8"])
  assert len(val) == 5
  data_dir = tfds_text.prepare_text_dataset(root, cache_dir=cache, validation_fraction=0.1)
  stamp = sorted(p.stat().st_mtime_ns for p in data_dir.rglob("*"))
  assert tfds_text.prepare_text_dataset(root, cache_dir=cache,
                                        validation_fraction=0.1) == data_dir
  assert sorted(p.stat().st_mtime_ns for p in data_dir.rglob("*")) == stamp


def test_validation_at_least_one_document(tmp_path):
  _write(tmp_path / "t.txt", "a\nb\nc\n")
  val = sources.open_source(f"text:{tmp_path / 't.txt'}", "validation", cache_dir=tmp_path,
                            doc_mode="line", validation_fraction=0.0)
  assert len(val) == 1


def test_clear_errors(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(sources.SourceError, match="nowhere"):
    sources.open_source(f"text:{missing}", "train", cache_dir=tmp_path)
  _write(tmp_path / "empty" / "e.txt", "  \n\n")
  with pytest.raises(sources.SourceError, match="no documents.*empty"):
    sources.open_source(f"text:{tmp_path / 'empty'}", "train", cache_dir=tmp_path)
  (tmp_path / "none").mkdir()
  with pytest.raises(sources.SourceError, match="no \\*.txt files"):
    sources.open_source(f"text:{tmp_path / 'none'}", "train", cache_dir=tmp_path)
  _write(tmp_path / "one.txt", "a single document")
  with pytest.raises(sources.SourceError, match="at least 2 documents"):
    sources.open_source(f"text:{tmp_path / 'one.txt'}", "train", cache_dir=tmp_path,
                        doc_mode="file")


def test_builtin_corpus_builds(tmp_path):
  train = sources.open_source("builtin", "train", cache_dir=tmp_path)
  val = sources.open_source("builtin", "validation", cache_dir=tmp_path)
  assert len(train) > 1000 and len(val) >= 1
  text_dir = builtin.builtin_corpus_dir(tmp_path)
  assert (text_dir / "json.txt").read_text().startswith("Module json")
  assert sum(f.stat().st_size for f in text_dir.iterdir()) > 1_000_000
  assert isinstance(train[0], bytes) and train[0]


def test_long_blank_line_blocks_are_cut_at_line_breaks():
  from hat.data.tfds_text import MAX_BLOCK_BYTES, _cut_at_lines, split_documents
  block = b"\n".join(b"sentence %d of a file with no blank lines." % i for i in range(5000))
  parts = _cut_at_lines(block, 1000)
  assert b"\n".join(parts) == block  # no byte lost: only the cut line breaks separate
  assert all(len(p) <= 1000 for p in parts) and len(parts) > 100
  long_line = b"x" * 3000
  assert _cut_at_lines(long_line + b"\nab", 1000) == [long_line, b"ab"]
  docs = split_documents(b"short para\n\n" + block * 20, "blank_line")
  assert docs[0] == b"short para" and all(len(d) <= MAX_BLOCK_BYTES for d in docs[1:])
