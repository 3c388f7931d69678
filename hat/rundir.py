"""Run directories: what `hat.train` writes, and loading a run for inference.

Layout of a workdir:

  <workdir>/config.json          the resolved config (written once at start)
  <workdir>/tokenizer.model      the SentencePiece model, for BPE runs
  <workdir>/checkpoints/<step>/  model/ optimizer/ data/ run/ (orbax items)

`run` is JSON with the config and the tokenizer model, so a checkpoint directory alone
is enough to rebuild the model. A workdir is local or a gs:// URL (`hat.storage`). Inference (eval, generation, robustness, lm-eval) reads
runs through this module only; it never builds the optimizer or imports the trainer.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import traceback
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from hat import storage
from hat.cli import UserError, debug_enabled
from hat.config import TrainConfig, from_config_dict, to_dict

CHECKPOINTS = "checkpoints"
TOKENIZER_FILE = "tokenizer.model"


class NoCheckpoint(UserError, FileNotFoundError):
  """A path holds no checkpoint."""


class CheckpointMismatch(UserError, ValueError):
  """A checkpoint's parameters do not fit the model restoring it; names the first one."""


class CheckpointUnreadable(UserError):
  """A checkpoint's files cannot be read (truncated, corrupt, half written)."""


def find_checkpoint(path: storage.PathLike) -> storage.Path:
  """A workdir, its checkpoints/ folder, or one step folder -> that (or the latest) step folder."""
  path = storage.path(path)
  if (path / "model").is_dir():
    return path
  if (path / CHECKPOINTS).is_dir():
    path = path / CHECKPOINTS
  # On object stores a step folder fills in place and is complete once orbax writes its
  # commit marker: an interrupted save must not be picked.
  steps = sorted((int(p.name) for p in path.glob("*") if p.name.isdigit()
                  and (p / "model").is_dir() and ocp.step.is_path_finalized(p)),
                 reverse=True)
  if not steps:
    raise NoCheckpoint(f"no checkpoint under {path}")
  return path / str(steps[0])


def read_run(step_dir: storage.PathLike) -> dict:
  """The `run` JSON of a step folder (config, tokenizer model, step)."""
  return json.loads((storage.path(step_dir) / "run" / "metadata").read_text())


def write_run_files(workdir: storage.PathLike, cfg: TrainConfig, tokenizer: Any) -> None:
  """config.json (and tokenizer.model) in the workdir; call on process 0 only."""
  workdir = storage.path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
  proto = getattr(tokenizer, "model_proto", b"") or b""
  if proto:
    (workdir / TOKENIZER_FILE).write_bytes(proto)


def tokenizer_from_run(run: dict, cfg: TrainConfig, where: storage.PathLike) -> Any:
  """The run's tokenizer: its stored SentencePiece model, the byte tokenizer, or None."""
  from hat.family import family_of  # pylint: disable=g-import-not-at-top

  stored = None
  path = storage.path(where) / TOKENIZER_FILE
  if path.exists():
    stored = path.read_bytes()
  elif run.get("tokenizer_model"):
    # A checkpoint copied away from its workdir still carries its tokenizer.
    stored = base64.b64decode(run["tokenizer_model"])
  return family_of(cfg).load_tokenizer(cfg, stored)


def _key_name(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def check_fits(item: storage.PathLike, target: dict) -> None:
  """Raises CheckpointMismatch naming the first parameter whose name or shape differs.

  Reads only the item's metadata. Orbax's own error for a shape mismatch advises
  `strict=False`, which would silently truncate or pad the weights.
  """
  meta = ocp.StandardCheckpointHandler().metadata(storage.path(item))
  saved = {_key_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(
      meta, is_leaf=lambda x: hasattr(x, "shape"))[0]}
  wanted = {_key_name(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  for name, shape in wanted.items():
    if name not in saved:
      raise CheckpointMismatch(f"checkpoint {item} does not fit this model: parameter {name} "
                               f"{shape} is not in the checkpoint (different model config?)")
    if saved[name] != shape:
      raise CheckpointMismatch(f"checkpoint {item} does not fit this model: parameter {name} "
                               f"has shape {saved[name]} in the checkpoint, {shape} in the "
                               f"model (different model config?)")
  extra = [name for name in saved if name not in wanted]
  if extra:
    raise CheckpointMismatch(f"checkpoint {item} does not fit this model: parameter {extra[0]} "
                             f"{saved[extra[0]]} of the checkpoint is not in the model "
                             f"(different model config?)")


def restore_item(item: storage.PathLike, target: dict) -> dict:
  """One orbax item (a pure dict of arrays) onto `target`'s shapes and shardings.

  Uses the handler, not a Checkpointer: the latter ends with a barrier of all processes,
  which hangs the others when one process fails to read its shards (see
  hat.train.recovery, which decides on the step together).
  """
  item = storage.path(item)
  if not debug_enabled():
    logging.getLogger("asyncio").addFilter(_drop_unretrieved_read_errors)  # added once
    if not isinstance(sys.unraisablehook, _QuietClosedLoop):
      sys.unraisablehook = _QuietClosedLoop(sys.unraisablehook)
  check_fits(item, target)
  return ocp.StandardCheckpointHandler().restore(item, args=ocp.args.StandardRestore(target))


def _drop_unretrieved_read_errors(record: logging.LogRecord) -> bool:
  """A failed restore re-raises its first unreadable shard to the caller (which reports
  it in one line); the other shards' reads end in tasks and futures nobody awaits, which
  asyncio logs with their tracebacks when it collects them (often at exit). Those go."""
  message = record.getMessage()
  if "exception was never retrieved" not in message:
    return True
  tb = "".join(traceback.format_tb(record.exc_info[2])) if record.exc_info else ""
  return not any(s in message + tb for s in ("orbax", "OCDBT", "TensorStore"))


class _QuietClosedLoop:
  """`sys.unraisablehook` that drops what the unawaited reads of a failed restore raise
  when they finish after orbax closed its event loop (TensorStore calls back into the
  closed loop from its own threads: ~200 lines of tracebacks around the one-line error);
  everything else goes to the previous hook."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable):
    frames = traceback.extract_tb(unraisable.exc_traceback)
    if (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) ==
        "Event loop is closed" and frames and frames[0].name == "call_soon_threadsafe"):
      return
    self.previous(unraisable)


def restore_model_pure(step_dir: storage.PathLike, abstract_pure: dict) -> dict:
  """The `model` item of a step folder as a pure dict, onto `abstract_pure`'s shardings."""
  return restore_item(storage.path(step_dir) / "model", abstract_pure)


def load_for_inference(path: storage.PathLike, mesh_spec: str = "data=-1"):
  """(model, cfg, tokenizer) from a workdir or checkpoint folder, on the local devices."""
  from hat.family import family_of  # pylint: disable=g-import-not-at-top
  from hat.sharding import make_mesh, state_shardings  # pylint: disable=g-import-not-at-top

  step_dir = find_checkpoint(path)
  run = read_run(step_dir)
  cfg = from_config_dict(run["config"])
  tokenizer = tokenizer_from_run(run, cfg, step_dir.parent.parent)
  family = family_of(cfg)
  mesh = make_mesh(mesh_spec, jax.local_devices())
  vocab = family.vocab_size(cfg, tokenizer)
  with jax.set_mesh(mesh):
    abstract_model = nnx.eval_shape(lambda: family.build_model(cfg, vocab, nnx.Rngs(0)))
    graphdef, abstract = nnx.split(abstract_model)
    shardings = state_shardings(abstract, mesh)
  target = jax.tree.map(
      lambda v, s: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s),
      abstract, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  try:
    pure = restore_model_pure(step_dir, nnx.to_pure_dict(target))
  except CheckpointMismatch:
    raise
  except Exception as e:  # pylint: disable=broad-except
    inner = e.__cause__ or e
    raise CheckpointUnreadable(f"checkpoint {step_dir} does not restore ({type(inner).__name__}: "
                               f"{str(inner).splitlines()[0][:300]}); give an older step "
                               f"folder of {step_dir.parent} instead") from e
  state = jax.tree.map(lambda x: x, abstract)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state), cfg, tokenizer
