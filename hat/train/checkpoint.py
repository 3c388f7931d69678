"""Checkpoints of a run with orbax: model, optimizer, data-iterator state and run metadata.

The workdir layout and reading a run for inference are in `hat.rundir`.

`model` and `optimizer` are pure-dict pytrees of arrays; restoring them onto abstract
arrays that carry the *new* run's shardings reshards, so a checkpoint written on one
mesh restores on any other. `data` holds one grain iterator state per process. `run`
is JSON with the config and the tokenizer model, so a checkpoint directory alone is
enough to rebuild the model (`hat.rundir.load_for_inference`, `init_from`).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import errno
import json
import logging
import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from hat import storage
from hat.config import TrainConfig, to_dict
from hat.rundir import (CHECKPOINTS, TOKENIZER_FILE, find_checkpoint, read_run,  # noqa: F401
                        restore_item, restore_model_pure, tokenizer_from_run,
                        write_run_files)
from hat.train.state import MODEL, OPTIM, StateSpec

log = logging.getLogger(__name__)


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (disk full, permissions); names the folder.

  The run stops (`python -m hat.train` exits 4) rather than training on without
  checkpoints; the newest committed one is intact and the next start resumes from it.
  """


@dataclasses.dataclass(frozen=True)
class SaveFault:
  """Test hook: the save at `step` stalls `delay_s` seconds and/or fails with `error`.

  Both happen inside orbax's writer (while it writes the `data` item), so the step's
  folder is half written: what a preemption or a full disk leaves behind.
  """

  step: int
  delay_s: float = 0.0
  error: int = 0  # an errno, e.g. errno.ENOSPC; 0 = no error

  @classmethod
  def from_env(cls) -> SaveFault | None:
    """HAT_FAULT_SAVE_STEP=k with HAT_FAULT_SAVE_DELAY_S=x and/or HAT_FAULT_SAVE_ERRNO=name."""
    step = os.environ.get("HAT_FAULT_SAVE_STEP")
    if not step:
      return None
    name = os.environ.get("HAT_FAULT_SAVE_ERRNO", "")
    return cls(int(step), float(os.environ.get("HAT_FAULT_SAVE_DELAY_S") or 0.0),
               getattr(errno, name) if name else 0)


class _FrozenIteratorState:
  """An iterator state captured now, saved later by grain's orbax handler."""

  def __init__(self, iterator: Any, fault: SaveFault | None = None, where: str = ""):
    self._state = json.dumps(iterator.get_state()).encode()
    self._fault, self._where = fault, where

  def get_state(self) -> bytes:
    if self._fault is not None:  # called by orbax's writer thread, mid-save
      time.sleep(self._fault.delay_s)
      if self._fault.error:
        raise OSError(self._fault.error, os.strerror(self._fault.error), self._where)
    return self._state


def _host_copy(tree: Any) -> Any:
  """`tree` with its arrays copied to host numpy arrays, when this process holds them all.

  One batched `jax.device_get` (2 ms for the tiny model's 108 arrays on CPU) instead of
  orbax's per-array device transfer and jax-array serialisation: measured on the tiny
  HAT, a save's blocking part drops from 40 to 18 ms and the whole save from 185 to
  75 ms. Arrays spread over several processes (multi-host) stay jax arrays, for orbax
  to write each shard from the process that holds it.
  """
  leaves = jax.tree.leaves(tree)
  if all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return jax.device_get(tree)
  return tree


def _fill(abstract: nnx.State, pure: dict) -> nnx.State:
  """A fresh copy of `abstract` with the arrays of `pure` (possibly partial) put in."""
  state = jax.tree.map(lambda x: x, abstract)  # new Variables; the spec stays abstract
  nnx.replace_by_pure_dict(state, pure)
  return state


class Checkpointer:
  """Async orbax checkpoints of a run (every process calls every method, in step).

  A save blocks the training loop only to enqueue a device-side copy of the state (the
  train step donates its input, so the live buffers cannot be read later) and to freeze
  the data-iterator state. A background thread then copies the snapshot to the host and
  hands it to orbax, whose own threads write it. Measured by `tools/bench_train.py`.

  `background=None` (the default) runs the hand-off in the background in single-process
  runs only: with several processes orbax synchronises them during a save, and doing
  that from a side thread would let the processes' collectives interleave differently.
  The snapshot costs one extra copy of this process's state shards in device memory
  until the host copy is done.
  """

  def __init__(self, workdir: storage.PathLike, *, keep: int, tokenizer: Any = None,
               host_copy: bool = True, background: bool | None = None,
               fault: SaveFault | None = None):
    self.host_copy = host_copy  # False: hand orbax the jax arrays (see _host_copy)
    self._fault = fault
    self._last_step: int | None = None  # newest step handed to orbax
    if background is None:
      background = jax.process_count() == 1
    self._pool = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
                  if background else None)
    self._handoff: concurrent.futures.Future | None = None
    self.directory = storage.path(workdir) / CHECKPOINTS
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    proto = getattr(tokenizer, "model_proto", b"") or b""
    self._tokenizer_b64 = base64.b64encode(proto).decode() if proto else None

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or None."""
    self._finish_handoff()
    return self._manager.latest_step()

  def steps(self) -> list[int]:
    """Steps of the committed checkpoints, as on disk now."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: nnx.State, data_iterator: Any, cfg: TrainConfig, *,
           extra: dict | None = None) -> None:
    """Starts an async save of `state` at `step`; returns before anything is written.

    `extra`: more JSON for the `run` item (e.g. a gate controller's state).
    """
    run = {"step": int(step), "config": to_dict(cfg), "tokenizer_model": self._tokenizer_b64,
           "process_count": jax.process_count(), **(extra or {})}
    model = nnx.to_pure_dict(state[MODEL])
    optimizer = nnx.to_pure_dict(state[OPTIM])
    fault = self._fault if self._fault is not None and self._fault.step == step else None
    data = (_FrozenIteratorState(data_iterator, fault, str(self.directory / str(step) / "data"))
            if data_iterator is not None else None)
    self._finish_handoff()  # one hand-off at a time; raises a failed one's error
    if self._pool is None:
      self._hand_to_orbax(step, model, optimizer, run, data)
      return
    # Device-side copies, enqueued before the next step donates (and reuses) `state`.
    model, optimizer = jax.tree.map(lambda x: x.copy(), (model, optimizer))
    self._handoff = self._pool.submit(self._hand_to_orbax, step, model, optimizer, run, data)

  def _hand_to_orbax(self, step, model, optimizer, run, data) -> None:
    copy = _host_copy if self.host_copy else (lambda tree: tree)
    items = {
        "model": ocp.args.StandardSave(copy(model)),
        "optimizer": ocp.args.StandardSave(copy(optimizer)),
        "run": ocp.args.JsonSave(run),
    }
    if data is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data)
    with self._write_errors(self._last_step):  # orbax would wait for it anyway
      self._manager.wait_until_finished()
    with self._write_errors(step):
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._last_step = step

  @contextlib.contextmanager
  def _write_errors(self, step: int | None):
    """Turns a failed write of `step` into one error naming its folder."""
    try:
      yield
    except CheckpointWriteError:
      raise
    except Exception as e:  # orbax re-raises its writer thread's error at the next call
      where = self.directory / str(step) if step is not None else self.directory
      raise CheckpointWriteError(f"writing checkpoint {where} failed: "
                                 f"{type(e).__name__}: {e}") from e

  def _finish_handoff(self) -> None:
    if self._handoff is not None:
      handoff, self._handoff = self._handoff, None
      handoff.result()

  def restore(self, step: int, spec: StateSpec, data_iterator: Any, *,
              any_process_data: bool = False) -> nnx.State:
    """Restores model and optimizer onto `spec`'s shardings, and the iterator in place."""
    state = restore_state(self.directory / str(step), spec, with_optimizer=True)
    if data_iterator is not None:
      restore_data_state(self.directory / str(step), data_iterator,
                         any_process=any_process_data)
    return state

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._finish_handoff()
    with self._write_errors(self._last_step):
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    try:
      self.wait()
    finally:
      if self._pool is not None:
        self._pool.shutdown(wait=True)
      self._manager.close()


def restore_data_state(step_dir: storage.PathLike, data_iterator: Any, *,
                       any_process: bool = False) -> bool:
  """Sets this process's iterator to the saved state; False when none matches the layout.

  `any_process`: every process saved the same state (a global data stream), so any
  process's file will do, even when the process count changed.
  """
  data_dir = storage.path(step_dir) / "data"
  path = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  if not path.exists() and any_process:
    path = next(iter(sorted(data_dir.glob("process_*.json"))), path)
  if not path.exists():
    log.warning("no data-iterator state %s (process count changed?): the data order "
                "restarts from the beginning of the stream", path)
    return False
  data_iterator.set_state(json.loads(path.read_text()))
  return True



def restore_pure(step_dir: storage.PathLike, spec: StateSpec, *,
                 with_optimizer: bool) -> dict:
  """{MODEL: params[, OPTIM: optimizer]} as pure dicts of arrays on `spec`'s shardings."""
  step_dir = storage.path(step_dir)
  halves = {MODEL: "model", OPTIM: "optimizer"} if with_optimizer else {MODEL: "model"}
  return {key: restore_item(step_dir / item, nnx.to_pure_dict(spec.abstract[key]))
          for key, item in halves.items()}


def restore_state(step_dir: storage.PathLike, spec: StateSpec, *,
                  with_optimizer: bool) -> nnx.State:
  """The train state of a step folder on `spec`'s shardings.

  Without the optimizer, the optimizer half stays abstract (for inference only).
  """
  return _fill(spec.abstract, restore_pure(step_dir, spec, with_optimizer=with_optimizer))


def restart_schedule(optimizer_pure: dict) -> dict:
  """Zeroes the step and the lr-schedule count but keeps Adam's moments and bias count."""

  def walk(node):
    if isinstance(node, dict):
      return {k: (v * 0 if k == "count" and "mu" not in node else walk(v))
              for k, v in node.items()}
    return node

  out = walk(optimizer_pure)
  out["step"] = out["step"] * 0
  return out




