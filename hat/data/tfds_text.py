"""Local text files -> an array_record TFDS dataset with train/validation splits.

Files are cut into documents (`doc_mode`: one per file, per blank-line separated block,
or per line), a deterministic `validation_fraction` of them (at least one) goes to the
`validation` split, and both splits are written by a TFDS builder with
`file_format="array_record"`, which needs no TensorFlow to build or to read. The result
lives under `<cache>/text/<stem>-<hash>`, the hash covering the files (path, size,
modification time) and the options, so a repeated run reuses it. Reading is random
access through `tfds.data_source`.

Documents are bytes: the models handle any byte sequence, so text that is not valid
UTF-8 is kept as is (with a warning). Files that look binary (NUL bytes near the start)
are skipped with a warning, since they are almost never meant as training text.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import re
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from hat.cli import UserError

log = logging.getLogger(__name__)

NAME = "hat_text"
DOC_MODES = ("file", "blank_line", "line")
_BUILD_VERSION = "1.1.0"
_SNIFF_BYTES = 8192
# A block ends at a line break followed by one or more whitespace-only lines.
_BLANK_LINES = re.compile(rb"\r?\n(?:[ \t\f\v]*\r?\n)+")
# A blank-line block longer than this (a file of one sentence per line, say) is cut at
# line breaks into documents of at most this size: shuffling works on documents, and a
# megabyte-long one would otherwise fill hundreds of consecutive batches with one text.
MAX_BLOCK_BYTES = 1 << 16


class CorpusError(UserError, ValueError):
  """A text corpus is missing, empty or unusable; the message names the path."""


def list_text_files(path: str | os.PathLike) -> list[pathlib.Path]:
  """A file itself, or every *.txt file under a directory (recursive, sorted)."""
  p = pathlib.Path(path).expanduser()
  if not p.exists():
    raise CorpusError(f"text source: path does not exist: {p}")
  if p.is_file():
    return [p]
  files = sorted(f for f in p.rglob("*.txt") if f.is_file())
  if not files:
    raise CorpusError(f"text source: no *.txt files under {p}")
  return files


def looks_binary(head: bytes) -> bool:
  """NUL bytes near the start: an image, archive or UTF-16 file, not UTF-8 text."""
  return b"\x00" in head[:_SNIFF_BYTES]


def _cut_at_lines(block: bytes, limit: int = MAX_BLOCK_BYTES) -> list[bytes]:
  """Cuts a block into pieces of at most `limit` bytes at line breaks (a line longer
  than `limit` stays whole); joining the pieces with b"\\n" gives the block back."""
  if len(block) <= limit:
    return [block]
  out, start = [], 0
  while len(block) - start > limit:
    cut = block.rfind(b"\n", start, start + limit)
    if cut <= start:
      cut = block.find(b"\n", start + limit)
      if cut < 0:
        break
    out.append(block[start:cut])
    start = cut + 1
  out.append(block[start:])
  return out


def split_documents(data: bytes, doc_mode: str) -> list[bytes]:
  """Cuts one file's bytes into non-empty documents; separators are dropped."""
  if doc_mode == "file":
    parts = [data]
  elif doc_mode == "blank_line":
    parts = [c for block in _BLANK_LINES.split(data) for c in _cut_at_lines(block)]
  elif doc_mode == "line":
    parts = [line.removesuffix(b"\r") for line in data.split(b"\n")]
  else:
    raise ValueError(f"doc_mode must be one of {DOC_MODES}, got {doc_mode!r}")
  # Whitespace-only pieces carry no text; a trailing line break is a separator.
  return [p.rstrip(b"\r\n") for p in parts if p.strip()]


def _file_documents(path: pathlib.Path, doc_mode: str) -> list[bytes]:
  data = path.read_bytes()
  if looks_binary(data):
    log.warning("text source: skipping %s: it contains NUL bytes (binary or UTF-16?)",
                path)
    return []
  try:
    data.decode("utf-8")
  except UnicodeDecodeError as e:
    log.warning("text source: %s is not valid UTF-8 (%s); its bytes are kept as is",
                path, e.reason)
  return split_documents(data, doc_mode)


def validation_indices(num_docs: int, fraction: float, seed: int = 0) -> np.ndarray:
  """Sorted indices of the validation documents: round(fraction*n), at least 1."""
  if num_docs < 2:
    raise CorpusError(f"need at least 2 documents for a train/validation split, "
                      f"got {num_docs}")
  n_val = min(max(1, round(fraction * num_docs)), num_docs - 1)
  perm = np.random.default_rng(seed).permutation(num_docs)
  return np.sort(perm[:n_val])


class HatText(tfds.core.GeneratorBasedBuilder):
  """Documents of local text files; constructed without `files` it can only read."""

  VERSION = tfds.core.Version(_BUILD_VERSION)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS looks for checksum files next to a builder's code through
    # importlib_resources, which is not a dependency here; nothing is downloaded.
    return None

  def __init__(self, *, files: Sequence[str] = (), root: str = "",
               doc_mode: str = "blank_line", validation_fraction: float = 0.02,
               **kwargs):
    self._files = [pathlib.Path(f) for f in files]
    self._root = pathlib.Path(root) if root else None
    self._doc_mode = doc_mode
    self._validation_fraction = validation_fraction
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Documents of local text files (hat.data.tfds_text).",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "source": tfds.features.Text(),  # file path relative to the root, #block
        }),
    )

  def _documents(self) -> Iterator[tuple[str, bytes]]:
    for f in self._files:
      rel = f.relative_to(self._root) if self._root else f.name
      for k, doc in enumerate(_file_documents(f, self._doc_mode)):
        yield f"{rel}#{k}", doc

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self._files:
      raise CorpusError("HatText: no input files given (this builder instance can only "
                        "read an already prepared dataset)")
    # First pass counts documents; the splits then re-read the files, so the corpus
    # never has to fit in memory.
    num_docs = sum(1 for _ in self._documents())
    if num_docs == 0:
      where = self._root or (self._files[0] if self._files else "?")
      raise CorpusError(f"text source: no documents (all files empty or binary) in "
                        f"{where}")
    val = set(validation_indices(num_docs, self._validation_fraction).tolist())
    return {"train": self._generate_examples(val, False),
            "validation": self._generate_examples(val, True)}

  def _generate_examples(self, val: set[int], want_val: bool):
    for i, (source, doc) in enumerate(self._documents()):
      if (i in val) == want_val:
        yield i, {"text": doc, "source": source}


def _fingerprint(files: Sequence[pathlib.Path], doc_mode: str,
                 validation_fraction: float) -> str:
  h = hashlib.sha256()
  h.update(json.dumps([_BUILD_VERSION, doc_mode, validation_fraction]).encode())
  for f in files:
    st = f.stat()
    h.update(json.dumps([str(f.resolve()), st.st_size, st.st_mtime_ns]).encode())
  return h.hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  # Processes sharing a cache (several hosts, a test's two processes) build once.
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as fh:
    fcntl.flock(fh, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(fh, fcntl.LOCK_UN)


def prepare_text_dataset(path: str | os.PathLike, *, cache_dir: str | os.PathLike,
                         doc_mode: str = "blank_line",
                         validation_fraction: float = 0.02) -> pathlib.Path:
  """Builds (once) the array_record dataset of a text path; returns its data_dir."""
  if doc_mode not in DOC_MODES:
    raise ValueError(f"doc_mode must be one of {DOC_MODES}, got {doc_mode!r}")
  root = pathlib.Path(path).expanduser()
  files = list_text_files(root)
  stem = re.sub(r"[^A-Za-z0-9_.-]", "_", root.resolve().name or "root")[:40]
  data_dir = pathlib.Path(cache_dir).expanduser() / "text" / (
      f"{stem}-{_fingerprint(files, doc_mode, validation_fraction)}")
  with _file_lock(data_dir.with_suffix(".lock")):
    builder = HatText(files=[str(f) for f in files],
                      root=str(root if root.is_dir() else root.parent),
                      doc_mode=doc_mode, validation_fraction=validation_fraction,
                      data_dir=str(data_dir), file_format="array_record")
    if not builder.is_prepared():
      log.info("building text dataset of %s (%d files) in %s", root, len(files), data_dir)
      with _quiet():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return data_dir


@contextlib.contextmanager
def _quiet():
  # TFDS prints progress bars per split; they swamp training logs.
  tfds.disable_progress_bar()
  try:
    yield
  finally:
    tfds.enable_progress_bar()


def open_split(data_dir: str | os.PathLike, split: str):
  """Random-access source over a prepared HatText split (no TensorFlow needed)."""
  return tfds.data_source(NAME, split=split, data_dir=str(data_dir))
