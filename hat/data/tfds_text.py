"""Local text files -> an array_record TFDS dataset with train/validation splits.

Files are cut into documents (`doc_mode`: one per file, per blank-line separated block,
or per line), a deterministic `validation_fraction` of them (at least one) goes to the
`validation` split, and both splits are written by a TFDS builder with
`file_format="array_record"`, which needs no TensorFlow to build or to read. The result
lives under `<cache>/text/<stem>-<hash>`, the hash covering the files (path, size,
modification time) and the options, so a repeated run reuses it. Reading is random
access through `tfds.data_source`.

The text and the cache may both be on cloud storage (`gs://`, `hat.storage`): files are
read through epath, and a dataset for a remote cache is built in a local folder and then
uploaded, its dataset_info.json last, since array_record writes local files only (its
reader reads gs:// itself).

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
import shutil
import tempfile
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from hat import storage
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


def list_text_files(path: storage.PathLike) -> list[storage.Path]:
  """A file itself, or every *.txt file under a directory (recursive, sorted); local or gs://."""
  p = storage.path(path)
  if not p.exists():
    raise CorpusError(f"text source: path does not exist: {p}")
  if p.is_file():
    return [p]
  if storage.is_remote(p):
    files = [f for f in storage.walk_files(p) if f.name.endswith(".txt")]
  else:  # epath's rglob refuses `**`, even locally
    local = pathlib.Path(os.fspath(p))
    files = [storage.path(f) for f in sorted(local.rglob("*.txt")) if f.is_file()]
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


def _file_documents(path: storage.Path, doc_mode: str) -> list[bytes]:
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
    self._files = [storage.path(f) for f in files]
    self._root = storage.path(root) if root else None
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


def _fingerprint(files: Sequence[storage.Path], doc_mode: str,
                 validation_fraction: float) -> str:
  h = hashlib.sha256()
  h.update(json.dumps([_BUILD_VERSION, doc_mode, validation_fraction]).encode())
  for f in files:
    if storage.is_remote(f):
      st = f.stat()  # object stores give whole-second modification times
      h.update(json.dumps([os.fspath(f), st.length, st.mtime]).encode())
    else:
      st = os.stat(f)
      h.update(json.dumps([os.path.realpath(f), st.st_size, st.st_mtime_ns]).encode())
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


def prepare_text_dataset(path: storage.PathLike, *, cache_dir: storage.PathLike,
                         doc_mode: str = "blank_line",
                         validation_fraction: float = 0.02) -> storage.Path | pathlib.Path:
  """Builds (once) the array_record dataset of a text path; returns its data_dir."""
  if doc_mode not in DOC_MODES:
    raise ValueError(f"doc_mode must be one of {DOC_MODES}, got {doc_mode!r}")
  root = storage.path(path)
  files = list_text_files(root)
  name = root.name if storage.is_remote(root) else os.path.basename(os.path.realpath(root))
  stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name or "root")[:40]
  data_dir = storage.path(cache_dir) / "text" / (
      f"{stem}-{_fingerprint(files, doc_mode, validation_fraction)}")
  remote = storage.is_remote(data_dir)
  # A local lock even for a remote cache: it keeps this machine's processes from
  # building twice (hosts of a pod may each build; their uploads are identical).
  lock = (pathlib.Path(tempfile.gettempdir()) / "hat-locks" / f"{data_dir.name}.lock"
          if remote else pathlib.Path(os.fspath(data_dir)).with_suffix(".lock"))
  with _file_lock(lock):
    kwargs = dict(files=[os.fspath(f) for f in files],
                  root=os.fspath(root if root.is_dir() else root.parent),
                  doc_mode=doc_mode, validation_fraction=validation_fraction,
                  file_format="array_record")
    if HatText(data_dir=os.fspath(data_dir), **kwargs).is_prepared():
      return data_dir if remote else pathlib.Path(os.fspath(data_dir))
    log.info("building text dataset of %s (%d files) in %s", root, len(files), data_dir)
    build_dir = tempfile.mkdtemp(prefix="hat-text-") if remote else os.fspath(data_dir)
    try:
      with _quiet():
        HatText(data_dir=build_dir, **kwargs).download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
      if remote:
        storage.upload_tree(build_dir, data_dir, last=("dataset_info.json",))
    finally:
      if remote:
        shutil.rmtree(build_dir, ignore_errors=True)
  return data_dir if remote else pathlib.Path(os.fspath(data_dir))


@contextlib.contextmanager
def _quiet():
  # TFDS prints progress bars per split; they swamp training logs.
  tfds.disable_progress_bar()
  try:
    yield
  finally:
    tfds.enable_progress_bar()


def open_split(data_dir: storage.PathLike, split: str):
  """Random-access source over a prepared HatText split (no TensorFlow needed)."""
  return tfds.data_source(NAME, split=split, data_dir=os.fspath(data_dir))
