"""Run N local CPU processes of `hat.train` as one multi-process jax job.

    python launch/local.py --num-processes 2 --devices-per-process 2 -- \\
        --config configs/tiny_hat.py --workdir runs/mp --config.mesh=data=2,fsdp=2

Each process gets `XLA_FLAGS=--xla_force_host_platform_device_count=M`,
`JAX_PLATFORMS=cpu` and `HAT_COORDINATOR` / `HAT_NUM_PROCESSES` / `HAT_PROCESS_ID`, so
`jax.distributed.initialize` connects them over localhost and the CPU collectives run
over gloo: the same code path as a multi-host pod, on one machine. Output of process i
i > 0 goes to <log-dir>/process_<i>.log (default: the workdir, or a new local temporary
folder for a gs:// workdir), process 0's to the terminal. SIGTERM to the
launcher is passed on to every process (each saves and exits). The launcher exits with
the first non-zero exit status of any process, and then stops the others.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time


def free_port() -> int:
  """A TCP port that is free right now on localhost."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _workdir(train_args: list[str]) -> str | None:
  for i, a in enumerate(train_args):
    if a == "--workdir" and i + 1 < len(train_args):
      return train_args[i + 1]
    if a.startswith("--workdir="):
      return a.split("=", 1)[1]
  return None


def _log_dir(log_dir: str, workdir: str | None) -> pathlib.Path | None:
  """Where process i > 0 logs: --log-dir, else a local workdir, else a temporary folder."""
  if log_dir:
    return pathlib.Path(log_dir)
  if workdir is None:
    return None
  if "://" in workdir:  # gs://...: log files are appended to, so they stay local
    logs = pathlib.Path(tempfile.mkdtemp(prefix="hat-local-logs-"))
    print(f"logs of processes 1.. in {logs}", file=sys.stderr, flush=True)
    return logs
  return pathlib.Path(workdir)


def commands(num_processes: int, devices_per_process: int, port: int,
             train_args: list[str]) -> list[tuple[dict[str, str], list[str]]]:
  """(extra environment, argv) of every process."""
  out = []
  for i in range(num_processes):
    env = {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
        "HAT_COORDINATOR": f"127.0.0.1:{port}",
        "HAT_NUM_PROCESSES": str(num_processes),
        "HAT_PROCESS_ID": str(i),
    }
    out.append((env, [sys.executable, "-m", "hat.train", *train_args]))
  return out


def main(argv: list[str] | None = None) -> int:
  """CLI entry point."""
  argv = sys.argv[1:] if argv is None else argv
  if "--" in argv:
    cut = argv.index("--")
    own, train_args = argv[:cut], argv[cut + 1:]
  else:
    own, train_args = argv, []
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="%(prog)s [options] -- <hat.train arguments>")
  p.add_argument("--num-processes", type=int, default=2)
  p.add_argument("--devices-per-process", type=int, default=1)
  p.add_argument("--port", type=int, default=0, help="coordinator port (0 = pick a free one)")
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  p.add_argument("--log-dir", default="", help="local folder for the logs of processes "
                 "1..N-1 (default: the workdir; a temporary folder for a gs:// workdir)")
  args = p.parse_args(own)
  if not train_args:
    p.error("give the hat.train arguments after --")
  cmds = commands(args.num_processes, args.devices_per_process, args.port or free_port(),
                  train_args)
  if args.dry_run:
    for env, cmd in cmds:
      print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(cmd))
    return 0
  logs = _log_dir(args.log_dir, _workdir(train_args))
  if logs is not None:
    logs.mkdir(parents=True, exist_ok=True)
  root = str(pathlib.Path(__file__).resolve().parent.parent)
  procs = []
  for i, (env, cmd) in enumerate(cmds):
    full_env = {**os.environ, **env}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, full_env.get("PYTHONPATH")]))
    out = None
    if i > 0:
      out = open(logs / f"process_{i}.log", "w") if logs else subprocess.DEVNULL
    procs.append(subprocess.Popen(cmd, env=full_env, stdout=out,
                                  stderr=None if out is None else subprocess.STDOUT))
  signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in procs])
  status = 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
      if failed:
        status = failed[0]
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if status and p.poll() is None:
        p.terminate()  # the others would wait forever in a collective
    for p in procs:
      p.wait()
  return status or next((p.returncode for p in procs if p.returncode), 0)


if __name__ == "__main__":
  sys.exit(main())
