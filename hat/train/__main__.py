"""Train a HAT, BPE or byte-level LM.

    python -m hat.train --config configs/tiny_hat.py --workdir runs/tiny_hat \\
        [--config.steps=2000 --config.optim.lr=1e-3 ...]

Config overrides are `--config.<dotted.key>=<value>`, typed like the default. Restarting
with the same --workdir resumes from its newest checkpoint (model, optimizer, data
order). `--config.init_from=<workdir or checkpoint folder>` starts a new run from
another run's parameters (continued pretraining), with this run's data and schedule.
SIGTERM saves a checkpoint at the current step and exits cleanly.

Several processes (multi-host): every process runs the same command.
  TPU pods, Slurm and other clusters jax can detect:  --distributed=auto
  explicit (GPU clusters, local CPU tests):           --coordinator HOST:PORT
      --num-processes N --process-id I   (or env HAT_COORDINATOR, HAT_NUM_PROCESSES,
      HAT_PROCESS_ID). With JAX_PLATFORMS=cpu the CPU collectives use gloo.
  launch/local.py starts N local CPU processes this way.

A checkpoint that does not restore (truncated, corrupt, half written) is moved to
<workdir>/bad_checkpoints/ and the run resumes from the newest one that does; if none
does, it stops and moves nothing.

Test hooks (environment): HAT_INJECT_NAN_AT_STEP=k makes the loss of step k NaN;
HAT_DEBUG_STEP_DELAY_S=x sleeps x seconds after every step; HAT_FAULT_SAVE_STEP=k with
HAT_FAULT_SAVE_DELAY_S=x and/or HAT_FAULT_SAVE_ERRNO=ENOSPC stalls or fails the
checkpoint write of step k.
Exit status: 0 done or preempted; 2 user error (config, data path, source, a checkpoint
of another model or none that restores), printed as one `error:` line (HAT_DEBUG=1 or
--debug for the traceback); 3 non-finite loss; 4 a checkpoint could not be written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from hat.cli import debug_enabled, entry_point

EXIT_NON_FINITE = 3
EXIT_WRITE_FAILED = 4


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  """Known flags, and the `--config.key=value` overrides."""
  p = argparse.ArgumentParser(prog="python -m hat.train", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", help="config file with get_config() (default: built-in defaults)")
  p.add_argument("--workdir", required=True,
                 help="run directory (local or gs://...): checkpoints, metrics, logs")
  p.add_argument("--distributed", choices=("off", "auto"), default="off",
                 help="auto: jax.distributed.initialize() with cluster auto-detection")
  p.add_argument("--coordinator", default=os.environ.get("HAT_COORDINATOR"),
                 help="HOST:PORT of process 0 [env HAT_COORDINATOR]")
  p.add_argument("--num-processes", type=int, default=_env_int("HAT_NUM_PROCESSES"),
                 help="total processes [env HAT_NUM_PROCESSES]")
  p.add_argument("--process-id", type=int, default=_env_int("HAT_PROCESS_ID"),
                 help="this process's index [env HAT_PROCESS_ID]")
  p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    p.error(f"unrecognised arguments: {' '.join(bad)}")
  return args, rest


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value else None


def init_distributed(args: argparse.Namespace) -> None:
  """Connects the processes of a multi-process run (before any other jax call)."""
  import jax  # pylint: disable=g-import-not-at-top

  if args.coordinator:
    if args.num_processes is None or args.process_id is None:
      raise SystemExit("--coordinator needs --num-processes and --process-id")
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  elif args.distributed == "auto":
    jax.distributed.initialize()


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever `sys.stderr` is at each record: a caller that runs `main`
  in-process and then swaps or closes its stderr (a notebook, a test) would otherwise
  leave the root logger writing to a closed stream ("--- Logging error ---")."""

  def __init__(self):
    super().__init__(sys.stderr)

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, _):
    pass


def _drop_orbax_writer_traceback(record: logging.LogRecord) -> bool:
  """Orbax logs its writer thread's exception with a traceback, then re-raises it to the
  trainer, which reports it as one CheckpointWriteError line naming the folder."""
  return not (record.exc_info and "orbax" in record.pathname and "futures" in record.pathname)


@entry_point
def main(argv: list[str]) -> int:
  """CLI entry point."""
  args, overrides = parse_args(argv)
  init_distributed(args)
  # pylint: disable=g-import-not-at-top
  import jax

  from hat.config import resolve
  from hat.train.checkpoint import CheckpointWriteError, SaveFault
  from hat.train.loop import NonFiniteError, StopFlag, train
  # pylint: enable=g-import-not-at-top

  primary = jax.process_index() == 0
  logging.basicConfig(level=logging.INFO if primary else logging.WARNING,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                      handlers=[_StderrHandler()], force=True)
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if not debug_enabled():
    logging.getLogger("absl").addFilter(_drop_orbax_writer_traceback)
  stop = StopFlag()
  stop.install()
  inject = _env_int("HAT_INJECT_NAN_AT_STEP")
  try:
    cfg = resolve(args.config, overrides)
    delay = float(os.environ.get("HAT_DEBUG_STEP_DELAY_S") or 0.0)
    result = train(cfg, args.workdir, inject_nan_at_step=inject, stop=stop,
                   progress=not args.no_progress, step_delay_s=delay,
                   save_fault=SaveFault.from_env())
  except NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_NON_FINITE
  except CheckpointWriteError as e:
    if debug_enabled():
      raise
    # Not the user's typo, but nothing to debug either: the folder and the OS error say it.
    print(f"error: {e}; the newest committed checkpoint is intact: restart to resume "
          f"from it", file=sys.stderr, flush=True)
    return EXIT_WRITE_FAILED
  if primary:
    print(f"{result.status} at step {result.step}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
