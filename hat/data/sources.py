"""Source specs -> random-access document sources (each element: one document's bytes).

Spec strings (see `DataConfig.train` / `DataConfig.eval`):

  builtin                  the built-in corpus (Python standard library documentation)
  text:<path>              a text file, or every *.txt file under a directory (local or gs://)
  tfds:<name>[:<split>]    any registered TFDS dataset, e.g. `tfds:lm1b`,
                           `tfds:wikipedia/20230601.en:train[:90%]`
  spec=weight,spec=weight  a weighted mixture of the above

`builtin` and `text:` are turned into an array_record dataset with train/validation
splits once (`hat.data.tfds_text`); `tfds:` reads the registered dataset as prepared by
TFDS (which downloads it, so it needs network once). All of them are read with
`tfds.data_source`, random access without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

from hat import storage
from hat.cli import UserError
from hat.data import builtin as builtin_lib
from hat.data import tfds_text

_TFDS_SPEC = re.compile(r"^(?P<name>[^:\[\]]+(?::\d+(?:\.\d+)*)?)(?::(?P<split>.+))?$")
# TFDS text datasets name their text feature differently; the first match is used.
_TEXT_FEATURES = ("text", "content", "document", "article", "sentence", "body")
_LOCAL_CACHE = pathlib.Path("~/.cache/hat")


class SourceError(UserError, ValueError):
  """A source spec is malformed or names something that cannot be read."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One parsed source: scheme `builtin` | `text` | `tfds`, its argument and weight."""

  scheme: str
  arg: str = ""  # text: the path; tfds: the dataset name (with config/version)
  split: str = ""  # tfds: explicit split (empty = the split the caller asks for)
  weight: float = 1.0

  def __str__(self) -> str:
    if self.scheme == "builtin":
      return "builtin"
    if self.scheme == "tfds" and self.split:
      return f"tfds:{self.arg}:{self.split}"
    return f"{self.scheme}:{self.arg}"


def default_cache_dir() -> storage.Path:
  """`$HAT_CACHE`, else `~/.cache/hat`: where built corpora live (local or gs://)."""
  return storage.path(os.environ.get("HAT_CACHE") or "~/.cache/hat")


def parse_source(spec: str, weight: float = 1.0) -> SourceSpec:
  """Parses one spec (no mixture)."""
  spec = spec.strip()
  if spec == "builtin":
    return SourceSpec("builtin", weight=weight)
  scheme, sep, rest = spec.partition(":")
  if not sep or not rest:
    raise SourceError(f"source {spec!r}: expected builtin, text:<path> or "
                      f"tfds:<name>[:<split>]")
  if scheme == "text":
    return SourceSpec("text", rest, weight=weight)
  if scheme == "tfds":
    m = _TFDS_SPEC.match(rest)
    if not m:
      raise SourceError(f"source {spec!r}: expected tfds:<name>[:<split>]")
    return SourceSpec("tfds", m["name"], m["split"] or "", weight)
  raise SourceError(f"source {spec!r}: unknown kind {scheme!r}; use builtin, text: or tfds:")


def parse_mixture(spec: str) -> list[SourceSpec]:
  """`spec=weight,spec=weight` (weights optional, default 1) -> SourceSpecs."""
  if not spec or not spec.strip():
    raise SourceError("empty source spec")
  out = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    body, weight = part, 1.0
    head, sep, tail = part.rpartition("=")
    if sep:
      try:
        body, weight = head, float(tail)
      except ValueError:
        raise SourceError(f"source {part!r}: weight {tail!r} is not a number") from None
      if not weight > 0:
        raise SourceError(f"source {part!r}: weight must be positive")
    out.append(parse_source(body, weight))
  return out


def parse_eval_sets(eval_spec: str, train_spec: str) -> dict[str, str]:
  """`name=spec,name=spec` -> {name: spec}; empty means {"valid": train_spec}."""
  if not eval_spec.strip():
    return {"valid": train_spec}
  out = {}
  for part in filter(None, (p.strip() for p in eval_spec.split(","))):
    name, sep, spec = part.partition("=")
    if not sep or not name or not spec:
      raise SourceError(f"data.eval: {part!r} is not name=spec")
    out[name.strip()] = spec.strip()
  return out


class DocumentSource:
  """Random-access documents (bytes) of one split; picklable, opened lazily."""

  def __init__(self, name: str, split: str, data_dir: str | None, feature: str,
               label: str):
    self._name, self._split, self._data_dir = name, split, data_dir
    self._feature, self.label = feature, label
    self._ds = None

  def _open(self):
    if self._ds is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

      self._ds = tfds.data_source(self._name, split=self._split, data_dir=self._data_dir)
    return self._ds

  def __getstate__(self):
    return {**self.__dict__, "_ds": None}

  def __len__(self) -> int:
    return len(self._open())

  def __getitem__(self, index: int) -> bytes:
    value = self._open()[index][self._feature]
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)

  def __repr__(self) -> str:
    return f"DocumentSource({self.label}, split={self._split!r}, n={len(self)})"


def _pick_text_feature(name: str, features) -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  keys = list(features.keys()) if hasattr(features, "keys") else []
  for key in _TEXT_FEATURES:
    if key in keys:
      return key
  for key in keys:
    if isinstance(features[key], tfds.features.Text):
      return key
  raise SourceError(f"tfds:{name}: no text feature among {keys}")


def _tfds_source(spec: SourceSpec, split: str, data_dir: str | None) -> DocumentSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(spec.arg, data_dir=data_dir)
  except Exception as e:  # TFDS raises several types for unknown names
    raise SourceError(f"tfds:{spec.arg}: cannot load the dataset builder: {e}") from e
  if not builder.is_prepared():
    raise SourceError(f"tfds:{spec.arg}: not prepared under {builder.data_dir}; run "
                      f"`tfds build {spec.arg}` (or tfds.load) once with network access")
  splits = builder.info.splits
  split = spec.split or split
  if split == "validation" and "validation" not in splits and "test" in splits:
    split = "test"  # many TFDS text datasets only ship train/test
  base = re.split(r"[\[+]", split, maxsplit=1)[0]
  if base not in splits:
    raise SourceError(f"tfds:{spec.arg}: no split {base!r}; splits: {sorted(splits)}")
  feature = _pick_text_feature(spec.arg, builder.info.features)
  return DocumentSource(spec.arg, split, data_dir, feature, str(spec))


def open_source(spec: SourceSpec | str, split: str, *, cache_dir: str | os.PathLike | None = None,
                doc_mode: str = "blank_line", validation_fraction: float = 0.02,
                tfds_data_dir: str | None = None) -> DocumentSource:
  """The `split` ("train" | "validation") of one source as random-access documents."""
  if isinstance(spec, str):
    spec = parse_source(spec)
  cache = storage.path(cache_dir) if cache_dir else default_cache_dir()
  if spec.scheme == "tfds":
    return _tfds_source(spec, split, tfds_data_dir)
  if split not in ("train", "validation"):
    raise SourceError(f"{spec}: split must be train or validation, got {split!r}")
  if spec.scheme == "builtin":
    # The built-in text is generated on the spot; only its built dataset goes to a
    # remote cache.
    local = _LOCAL_CACHE if storage.is_remote(cache) else pathlib.Path(os.fspath(cache))
    path = builtin_lib.builtin_corpus_dir(local.expanduser())
  else:
    path = spec.arg
  try:
    data_dir = tfds_text.prepare_text_dataset(
        path, cache_dir=cache, doc_mode=doc_mode, validation_fraction=validation_fraction)
  except tfds_text.CorpusError as e:
    raise SourceError(f"{spec}: {e}") from None
  return DocumentSource(tfds_text.NAME, split, str(data_dir), "text", str(spec))


def open_from_config(data_cfg, spec: SourceSpec | str, split: str) -> DocumentSource:
  """`open_source` with the cache and document options of a `DataConfig`."""
  return open_source(spec, split, cache_dir=data_cfg.cache_dir or None,
                     doc_mode=data_cfg.doc_mode,
                     validation_fraction=data_cfg.validation_fraction)
