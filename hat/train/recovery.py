"""Resuming a run from the newest checkpoint that restores; broken ones are moved aside.

A step folder can be broken in many ways: a truncated or corrupt array file, a missing
item, a save that a preemption interrupted (orbax leaves `<step>.orbax-checkpoint-tmp`).
On resume every committed step is tried newest first; the first one that restores on
every process wins, and the newer broken ones are moved to `<workdir>/bad_checkpoints/`
(never deleted) with a warning and a `<name>.reason.txt` beside them. Interrupted saves
are moved there too. When no checkpoint restores the run stops with `NoGoodCheckpoint`
and leaves every folder in place: it never starts from scratch on its own.

A checkpoint from a different model is not "broken": `CheckpointMismatch` stops the run
before anything is moved, since every older step would fail the same way.

Several processes try the same steps in the same order and agree on each with one
all-gather, so one process failing to read its shards fails the step for all of them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from hat import storage
from hat.cli import UserError
from hat.rundir import CheckpointMismatch, read_run
from hat.train import checkpoint as ckpt_lib
from hat.train.state import StateSpec

log = logging.getLogger(__name__)

BAD_CHECKPOINTS = "bad_checkpoints"
_STEP_NAME = re.compile(r"^\d+")


class NoGoodCheckpoint(UserError):
  """Checkpoints exist but none restores; the message lists each one's reason."""


@dataclasses.dataclass
class Resumed:
  """The state, step and `run` JSON of the checkpoint a run resumes from."""

  state: nnx.State
  step: int
  run: dict


def _all_processes(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  flags = multihost_utils.process_allgather(np.array([ok], np.int32))
  return bool(np.all(flags))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _reason(e: BaseException) -> str:
  """The first line of the innermost error: orbax wraps tensorstore's useful one."""
  seen = {id(e)}
  while (inner := e.__cause__ or e.__context__) is not None and id(inner) not in seen:
    e = inner
    seen.add(id(e))
  first = str(e).strip().split("\n", 1)[0]
  return f"{type(e).__name__}: {first[:300]}"


def move_aside(path: storage.Path, reason: str) -> storage.Path:
  """Moves a step folder to <workdir>/bad_checkpoints/ (a new name if taken); warns."""
  bad = path.parent.parent / BAD_CHECKPOINTS
  bad.mkdir(parents=True, exist_ok=True)
  target, n = bad / path.name, 1
  while target.exists():
    target, n = bad / f"{path.name}.{n}", n + 1
  storage.move_tree(path, target)
  target.with_name(target.name + ".reason.txt").write_text(reason + "\n")
  log.warning("checkpoint %s does not restore (%s): moved to %s", path, reason, target)
  return target


def _incomplete(directory: storage.Path, committed: list[int]) -> list[storage.Path]:
  """Step folders orbax did not commit (saves interrupted by a kill or a write error)."""
  if not directory.is_dir():
    return []
  names = {str(s) for s in committed}
  return sorted(p for p in directory.iterdir()
                if p.is_dir() and _STEP_NAME.match(p.name) and p.name not in names)


def _try(step_dir: storage.Path, spec: StateSpec, data_iterator):
  """(state, run) of one step folder; raises whatever reading it raises."""
  run = read_run(step_dir)
  if data_iterator is not None:
    data = step_dir / "data"
    if not data.is_dir():
      raise FileNotFoundError(f"missing item {data}")
    for f in data.glob("process_*.json"):
      json.loads(f.read_text())
  state = ckpt_lib.restore_state(step_dir, spec, with_optimizer=True)
  return state, run


def resume(ckpt: ckpt_lib.Checkpointer, spec: StateSpec, data_iterator, *,
           any_process_data: bool = False) -> Resumed | None:
  """The newest checkpoint that restores (iterator set in place), or None if there is none."""
  directory = ckpt.directory
  primary = jax.process_index() == 0
  committed = ckpt.steps()
  if primary:
    for path in _incomplete(directory, committed):
      move_aside(path, "incomplete: the save was interrupted before orbax committed it")
  _sync("hat-resume-incomplete")
  failed: list[tuple[storage.Path, str]] = []
  for step in sorted(committed, reverse=True):
    step_dir = directory / str(step)
    reason = None
    try:
      state, run = _try(step_dir, spec, data_iterator)
    except CheckpointMismatch:
      raise  # a different model: older steps would not fit either
    except Exception as e:  # pylint: disable=broad-except
      reason = _reason(e)
    if not _all_processes(reason is None):
      failed.append((step_dir, reason or "another process could not restore it"))
      continue
    if primary:
      for path, why in failed:
        move_aside(path, why)
    _sync("hat-resume-moved")
    ckpt.steps()  # re-read the folder: the manager must not count the moved steps
    if data_iterator is not None:
      ckpt_lib.restore_data_state(step_dir, data_iterator, any_process=any_process_data)
    if failed:
      log.warning("resuming from step %d, the newest checkpoint that restores", step)
    return Resumed(state, step, run)
  if failed:
    listing = "; ".join(f"{p.name}: {why}" for p, why in failed)
    raise NoGoodCheckpoint(f"no checkpoint in {directory} restores ({listing}); they are "
                           f"left in place. Move or delete them to start from scratch")
  return None
