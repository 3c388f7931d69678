"""The training loop: one loop for every model kind, on any mesh, one or many processes.

Per step: next local batch -> global arrays -> jitted step (state donated). Metrics are
fetched one step late, so the host never waits for the device except at log, eval and
checkpoint points. A checkpoint is only written after its step's metrics were fetched
and found finite, so the newest checkpoint is always a good one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import sys
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from hat import flops, storage
from hat.config import ConfigError, TrainConfig
from hat.data import pipeline
from hat.data.sources import parse_eval_sets
from hat.family import family_of
from hat.models import gates, model_vocab_size
from hat.sharding import make_mesh
from hat.train import checkpoint as ckpt_lib
from hat.train import metrics as metrics_lib
from hat.train import recovery
from hat.train.state import MODEL, OPTIM, init_state, model_from_state, state_spec
from hat.train.step import make_eval_step, make_train_step

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """The loss or gradient norm became NaN/Inf; the message names the step."""


@dataclasses.dataclass
class StopFlag:
  """Set by SIGTERM; the loop saves at the current step and exits cleanly."""

  requested: bool = False

  def install(self) -> None:
    """Routes SIGTERM to this flag (main thread only)."""
    signal.signal(signal.SIGTERM, lambda *_: setattr(self, "requested", True))


@dataclasses.dataclass
class Result:
  """What a run ended with."""

  step: int
  status: str  # done | preempted
  eval: dict[str, float]


def make_run_mesh(cfg: TrainConfig):
  """The mesh of `cfg.mesh`, checked against the batch; raises ConfigError naming the key."""
  try:
    mesh = make_mesh(cfg.mesh)
  except ValueError as e:
    raise ConfigError(str(e) if str(e).startswith("mesh:") else f"mesh: {e}") from None
  dp = mesh.shape["replica"] * mesh.shape["data"] * mesh.shape["fsdp"]
  b, accum, pc = cfg.data.batch_size, cfg.optim.grad_accum, jax.process_count()
  if b % pc:
    raise ConfigError(f"data.batch_size: {b} is not divisible by the {pc} processes")
  if b % dp:
    raise ConfigError(f"data.batch_size: {b} is not divisible by the data-parallel mesh size "
                      f"{dp} (replica*data*fsdp of mesh={cfg.mesh!r})")
  if b % accum or (b // accum) % dp:
    raise ConfigError(f"optim.grad_accum: {accum} micro-batches of data.batch_size={b} must "
                      f"each be divisible by the data-parallel mesh size {dp}")
  return mesh


def _initial_state(cfg, spec, mesh, vocab_size, ckpt, data_iter, controller=None):
  """Resume from the workdir's newest good checkpoint, else `init_from`, else scratch."""
  resumed = recovery.resume(ckpt, spec, data_iter, any_process_data=cfg.global_data_stream)
  if resumed is not None:
    log.info("resumed from step %d", resumed.step)
    saved = resumed.run.get("gate_controller")
    if controller is not None and saved:
      controller.load_state_dict(saved)
    return resumed.state, resumed.step
  if not cfg.init_from:
    return init_state(cfg, vocab_size, mesh, spec), 0
  step_dir = ckpt_lib.find_checkpoint(cfg.init_from)
  log.info("initialising from %s (reset_optimizer=%s)", step_dir, cfg.reset_optimizer)
  state = init_state(cfg, vocab_size, mesh, spec)
  pure = ckpt_lib.restore_pure(step_dir, spec, with_optimizer=not cfg.reset_optimizer)
  if OPTIM in pure:
    pure[OPTIM] = ckpt_lib.restart_schedule(pure[OPTIM])  # this run's own schedule
  nnx.replace_by_pure_dict(state, pure)
  return state, 0


def evaluate(cfg, spec, mesh, eval_step, state, tokenizer) -> dict[str, float]:
  """`eval_batches` batches of every eval set -> {eval/<name>/bpb, ...}; none if 0."""
  out: dict[str, float] = {}
  if cfg.eval_batches <= 0:
    return out
  for name in parse_eval_sets(cfg.data.eval, cfg.data.train):
    sums: dict[str, float] = {}
    batches = pipeline.make_eval_iterator(cfg, name, tokenizer, max_batches=cfg.eval_batches)
    for local in batches:
      m = eval_step(state[MODEL], pipeline.global_batch(local, mesh))
      for k, v in metrics_lib.to_host(m).items():
        sums[k] = sums.get(k, 0.0) + v
    if not sums.get("num_bytes"):
      log.warning("eval set %r yielded no text", name)
      continue
    out.update(metrics_lib.derived(sums, f"eval/{name}/"))
  return out


def _train_iterator(cfg: TrainConfig, tokenizer):
  if cfg.global_data_stream:
    return pipeline.make_train_iterator(cfg, tokenizer, process_index=0, process_count=1)
  return pipeline.make_train_iterator(cfg, tokenizer)


def _next_batch(cfg: TrainConfig, data_iter, mesh) -> dict:
  """The next global batch as sharded arrays (from this process's part of it)."""
  local = next(data_iter)
  if cfg.global_data_stream:
    n = cfg.data.batch_size // jax.process_count()
    i = jax.process_index()
    local = {k: v[i * n:(i + 1) * n] for k, v in local.items()}
  return pipeline.global_batch(local, mesh)


def _any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))


def train(cfg: TrainConfig, workdir: storage.PathLike, *,
          inject_nan_at_step: int | None = None, stop: StopFlag | None = None,
          progress: bool = True, step_delay_s: float = 0.0,
          save_fault: ckpt_lib.SaveFault | None = None) -> Result:
  """Trains `cfg` in `workdir`, resuming from its newest good checkpoint if there is one.

  `inject_nan_at_step`, `step_delay_s` and `save_fault` are test hooks: a NaN loss at
  that step, a host sleep after every step (so a test can interrupt a tiny run mid-way),
  a stalled or failing checkpoint write.
  """
  workdir = storage.path(workdir)  # local or gs://
  primary = jax.process_index() == 0
  stop = stop or StopFlag()
  mesh = make_run_mesh(cfg)
  tokenizer = pipeline.default_tokenizer(cfg)
  vocab_size = model_vocab_size(cfg, tokenizer)
  if primary:
    ckpt_lib.write_run_files(workdir, cfg, tokenizer)
  spec = state_spec(cfg, vocab_size, mesh)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=cfg.keep_checkpoints, tokenizer=tokenizer,
                               fault=save_fault)
  data_iter = _train_iterator(cfg, tokenizer)
  # A gate's regulariser weight alpha: set on the host each step, saved with checkpoints.
  controller = family_of(cfg).make_controller(cfg)
  state, step = _initial_state(cfg, spec, mesh, vocab_size, ckpt, data_iter, controller)

  def save(s):
    extra = {"gate_controller": controller.state_dict()} if controller else None
    ckpt.save(s, state, data_iter, cfg, extra=extra)
    writer.flush()  # a remote workdir's metrics.jsonl then reaches this checkpoint
  last_saved = step if ckpt.latest_step() == step else None

  batch = _next_batch(cfg, data_iter, mesh)
  train_step = make_train_step(cfg, spec, mesh, batch)
  eval_step = make_eval_step(cfg, spec, mesh, batch)
  kind = jax.devices()[0].device_kind
  window = metrics_lib.Window(flops.train_flops_per_step(cfg, vocab_size), jax.device_count(),
                              flops.peak_flops(kind), flops.hardware_train_flops_per_step(
                                  cfg, vocab_size, impl=flops.executed_attention_impl(cfg)))
  writer = metrics_lib.MetricsWriter(workdir, enabled=primary)
  if primary:
    n_params = sum(int(x.size) for x in jax.tree.leaves(spec.abstract[MODEL]))
    log.info("%s model, %s parameters, mesh %s, %d devices (%s), %d processes",
             family_of(cfg).name, f"{n_params:,}", dict(mesh.shape), jax.device_count(), kind,
             jax.process_count())
  bar = tqdm(total=cfg.steps, initial=step, disable=not (primary and progress),
             dynamic_ncols=True, file=sys.stderr)
  pending = None  # (step, device metrics) not yet fetched

  def settle(s, m):
    """Fetches a finished step's metrics, checks them, adds them to the log window."""
    host = metrics_lib.to_host(m)
    if not metrics_lib.is_finite_step(host):
      good = ckpt.latest_step()
      raise NonFiniteError(
          f"non-finite training metrics at step {s}: loss={host.get('loss')}, "
          f"grad_norm={host.get('grad_norm')}; stopping without saving this state. "
          f"Last good checkpoint: {f'step {good}' if good is not None else 'none'} in "
          f"{ckpt.directory}")
    if controller is not None:
      ratio = gates.measured_ratio(host)
      if ratio is not None:
        controller.update(ratio)
    window.add(host)
    if s % cfg.log_every == 0 or s == cfg.steps:
      summary = window.summary()
      if window.peak_flops is None:
        summary["perf/mfu"] = summary["perf/hfu"] = None
      writer.write(s, summary)
      bar.set_postfix(loss=f"{summary.get('train/loss', math.nan):.3f}",
                      bpb=f"{summary.get('train/bpb', math.nan):.3f}")
      if primary and not progress:
        log.info(metrics_lib.format_line(s, summary))

  status = "done"
  eval_results: dict[str, float] = {}
  try:
    with jax.set_mesh(mesh):
      while step < cfg.steps:
        scale = np.float32(math.nan if inject_nan_at_step == step + 1 else 1.0)
        alpha = controller.alpha if controller is not None else 0.0
        state, m = train_step(state, batch, scale, alpha)
        if controller is not None:
          m = dict(m, gate_alpha=np.float32(alpha))
        step += 1
        bar.update(1)
        if step_delay_s:
          time.sleep(step_delay_s)
        if pending is not None:
          settle(*pending)
        pending = (step, m)
        want_save = step == cfg.steps or (cfg.ckpt_every > 0 and step % cfg.ckpt_every == 0)
        sync_point = step % cfg.log_every == 0 or want_save
        # Processes agree on stopping at sync points only: a collective every step would
        # block the host on the device.
        stopping = (sync_point or jax.process_count() == 1) and _any_process(stop.requested)
        if want_save or stopping:
          settle(*pending)  # never checkpoint a state whose step was not checked
          pending = None
          save(step)
          last_saved = step
        if stopping:
          status = "preempted"
          log.info("SIGTERM: saved step %d, exiting", step)
          break
        if cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < cfg.steps:
          res = evaluate(cfg, spec, mesh, eval_step, state, tokenizer)
          writer.write(step, res)
        if step < cfg.steps:
          batch = _next_batch(cfg, data_iter, mesh)
      if pending is not None:
        settle(*pending)
        pending = None
      if status == "done":
        if last_saved != step:
          save(step)
        eval_results = evaluate(cfg, spec, mesh, eval_step, state, tokenizer)
        writer.write(step, eval_results)
        for k, v in sorted(eval_results.items()):
          if k.endswith("/bpb") and primary:
            bar.write(f"final {k} = {v:.4f}")  # on its own line, above the progress bar
  finally:
    bar.close()
    writer.close()
    if sys.exc_info()[0] is None:
      ckpt.close()
    else:
      _close_after_error(ckpt)
  if status == "done" and primary and cfg.sample_bytes > 0 and jax.process_count() == 1:
    _print_sample(cfg, spec, state, tokenizer)
  return Result(step, status, eval_results)


def _close_after_error(ckpt) -> None:
  """Closes the checkpointer without hiding the error that is stopping the run."""
  try:
    ckpt.close()
  except ckpt_lib.CheckpointWriteError as e:
    log.debug("while closing the checkpointer: %s", e)  # usually the error in flight


def _print_sample(cfg, spec, state, tokenizer) -> None:
  """A short greedy continuation of `sample_prompt`, as a sanity check of the run."""
  from hat.generate import SampleOptions, make_sampler  # pylint: disable=g-import-not-at-top

  sampler = make_sampler(model_from_state(spec, state), cfg, tokenizer)
  new = sampler.generate(cfg.sample_prompt.encode(),
                         SampleOptions(temperature=0.0, max_new_bytes=cfg.sample_bytes))
  print(f"sample: {cfg.sample_prompt}{new.decode('utf-8', 'replace')!r}", flush=True)
