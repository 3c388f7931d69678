"""One path type for run directories and data, local or on cloud storage (`gs://`).

`path(p)` is the only way the project turns a string into a location: workdirs,
checkpoints, `init_from`, `text:` sources, corpus caches, eval and robustness outputs.
It returns an `etils.epath.Path`, the type orbax, grain and tfds take: the OS for local
paths, fsspec (gcsfs) for `gs://` URLs. `pathlib.Path` cannot be used for URLs: it
collapses `gs://b/x` into the local path `gs:/b/x`.

Object stores are not file systems: there is no append, no rename, no lock, and a
"directory" exists only while an object lies under it. The few places that need one of
those (metrics.jsonl, TensorBoard events, building a corpus) stage files locally and
upload them (`LocalStage`).

Which client reads which endpoint setting (all of them for an emulator, `emulator_env`):
gcsfs and google-cloud-storage `STORAGE_EMULATOR_HOST`; tensorstore, which writes
orbax's arrays, `TENSORSTORE_GCS_HTTP_URL`; array_record's C++ reader (tfds data
sources) `CLOUD_STORAGE_EMULATOR_ENDPOINT`.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile
from typing import Union

from etils import epath

from hat.cli import UserError

Path = epath.Path
PathLike = Union[str, os.PathLike]

# URL scheme -> (the module fsspec needs for it, the pip extra of this project).
_BACKENDS = {"gs": ("gcsfs", "gcs")}


class StorageError(UserError):
  """A location that cannot be used as given; the message says what to do, in one line."""


def scheme(p: PathLike) -> str:
  """'gs' for 'gs://b/x', '' for a local path."""
  text = os.fspath(p)
  head, sep, _ = text.partition("://")
  return head if sep and head.isalnum() else ""


def is_remote(p: PathLike) -> bool:
  """True for a URL (gs://...), False for a local path."""
  return bool(scheme(p))


def require_backend(p: PathLike) -> None:
  """Raises StorageError when the client library for `p`'s URL scheme is not installed."""
  s = scheme(p)
  if not s:
    return
  if s not in _BACKENDS:
    raise StorageError(f"{os.fspath(p)}: {s}:// locations are not supported; use a local "
                       f"path or gs://")
  module, extra = _BACKENDS[s]
  if importlib.util.find_spec(module) is None:
    raise StorageError(f"{os.fspath(p)}: {s}:// paths need the {module} package: "
                       f"pip install -e .[{extra}]")


def path(p: PathLike) -> Path:
  """The location `p` as an epath.Path: a URL as is, a local path expanded and absolute."""
  if isinstance(p, epath.Path) and is_remote(p):
    return p
  text = os.fspath(p)
  if is_remote(text):
    require_backend(text)
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def walk_files(root: Path) -> list[Path]:
  """Every file under `root`, recursively, sorted (epath's rglob refuses URLs)."""
  out, todo = [], [root]
  while todo:
    d = todo.pop()
    for child in d.iterdir():
      (todo if child.is_dir() else out).append(child)
  return sorted(out, key=os.fspath)


def upload_tree(local: PathLike, remote: Path, *, last: tuple[str, ...] = ()) -> None:
  """Copies a local folder to `remote`; files named in `last` go last (completion markers)."""
  local = pathlib.Path(local)
  files = sorted((f for f in local.rglob("*") if f.is_file()),
                 key=lambda f: (f.name in last, str(f)))
  for f in files:
    dst = remote / f.relative_to(local).as_posix()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(f.read_bytes())


def move_tree(src: Path, dst: Path) -> None:
  """Moves a folder; on an object store (no folder rename) copies each file, then deletes."""
  if not is_remote(src):
    shutil.move(os.fspath(src), os.fspath(dst))
    return
  root = os.fspath(src).rstrip("/") + "/"
  for f in walk_files(src):
    out = dst / os.fspath(f)[len(root):]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(f.read_bytes())
  src.rmtree()


class LocalStage:
  """A local folder standing in for a remote one; `upload` copies its files there.

  For writers that append or keep a file open (metrics.jsonl, TensorBoard events),
  which object stores cannot do: they write here, and the whole files are uploaded.
  For a local target the stage is the target itself and `upload` does nothing.
  """

  def __init__(self, target: Path):
    self.target = target
    self.remote = is_remote(target)
    if self.remote:
      self.dir = pathlib.Path(tempfile.mkdtemp(prefix="hat-stage-"))
    else:
      self.dir = pathlib.Path(os.fspath(target))
      self.dir.mkdir(parents=True, exist_ok=True)

  def fetch(self, name: str) -> pathlib.Path:
    """The local copy of `name`, downloaded first if the target has it (to append to)."""
    local = self.dir / name
    if self.remote and not local.exists():
      src = self.target / name
      local.parent.mkdir(parents=True, exist_ok=True)
      if src.exists():
        local.write_bytes(src.read_bytes())
    return local

  def upload(self) -> None:
    """Copies every staged file to the target (whole files; they are small)."""
    if self.remote:
      upload_tree(self.dir, self.target)

  def close(self) -> None:
    """Uploads and removes the local folder."""
    if self.remote:
      self.upload()
      shutil.rmtree(self.dir, ignore_errors=True)


def emulator_env(url: str) -> dict[str, str]:
  """Environment that points every GCS client here at the emulator at `url`, anonymously."""
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (orbax's array writes and reads)
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # array_record's reader (tfds data sources)
      # No credentials: gcsfs anonymous, tensorstore a fixed token, and nobody asks the
      # cloud metadata server for one.
      "FSSPEC_GS_TOKEN": "anon",
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "NO_GCE_CHECK": "true",
      # gcsfs asks a separate control API for the bucket type, which emulators lack.
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
  }
