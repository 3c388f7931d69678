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
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from hat import storage
from hat.config import TrainConfig, from_config_dict, to_dict

CHECKPOINTS = "checkpoints"
TOKENIZER_FILE = "tokenizer.model"


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
    raise FileNotFoundError(f"no checkpoint under {path}")
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


def restore_model_pure(step_dir: storage.PathLike, abstract_pure: dict) -> dict:
  """The `model` item of a step folder as a pure dict, onto `abstract_pure`'s shardings."""
  item = storage.path(step_dir) / "model"
  try:
    return ocp.StandardCheckpointer().restore(item, abstract_pure)
  except (ValueError, KeyError) as e:
    raise ValueError(f"checkpoint {item} does not fit this run's model "
                     f"(different model config?): {e}") from None


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
  pure = restore_model_pure(step_dir, nnx.to_pure_dict(target))
  state = jax.tree.map(lambda x: x, abstract)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state), cfg, tokenizer
