"""Runs `python -m hat.train` on every worker of a Cloud TPU VM pod slice.

  python launch/tpu_pod.py up --name hat-1b --zone us-east5-a --accelerator v5p-64 \
      --config configs/hat_1b.py --workdir gs://BUCKET/runs/hat_1b [-- --config.steps=1000]

Actions: `create` (the TPU VM), `setup` (copy this checkout, or clone --repo, to every
worker and `pip install -e .[tpu,gcs]`), `train` (start the trainer on all workers, detached,
logs in ~/hat_logs), `logs` (tail worker logs), `collect` (copy every worker's log
here), `stop`, `delete`, and `up` = create + setup + train. `--dry-run` prints the
commands instead of running them. The trainer runs with --distributed=auto:
jax.distributed.initialize() needs no arguments on a TPU pod, each worker learns its id
and the coordinator from the TPU metadata.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_dry_run_flag, execute, split_train_args  # noqa: E402

# Software images per generation (Cloud TPU "runtime versions").
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
# Collective/compute overlap on TPU (async collectives fused with compute).
DEFAULT_LIBTPU_ARGS = ("--xla_tpu_enable_async_collective_fusion=true "
                       "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
                       "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
                       "--xla_tpu_overlap_compute_collective_tc=true "
                       "--xla_enable_async_all_gather=true")
REMOTE_DIR = "hat"  # relative to the worker's home directory
LOG_DIR = "hat_logs"  # relative to the worker's home directory
SOURCE_TARBALL = "/tmp/hat_src.tar.gz"


def parse_accelerator(name: str) -> tuple[str, int, str]:
  """'v5p-64' -> ('v5p', chips, gcloud accelerator type); v4/v5p names count TensorCores."""
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
  if not m:
    raise ValueError(f"accelerator {name!r}: expected v4-N, v5p-N, v5e-N (v5litepod-N) or v6e-N")
  gen, n = m.group(1), int(m.group(2))
  gen = "v5e" if gen == "v5litepod" else gen
  chips = n // 2 if gen in ("v4", "v5p") else n
  return gen, chips, f"v5litepod-{n}" if gen == "v5e" else f"{gen}-{n}"


def num_workers(gen: str, chips: int) -> int:
  """TPU VM hosts in a slice: 4 chips per host, except single-host v5e/v6e slices of <= 8."""
  if gen in ("v5e", "v6e") and chips <= 8:
    return 1
  return max(1, chips // 4)


def train_command(args: argparse.Namespace, extra: list[str]) -> str:
  """The shell line each worker runs: env, trainer detached, pid and log in LOG_DIR."""
  env = {"LIBTPU_INIT_ARGS": args.libtpu_args} if args.libtpu_args else {}
  env.update(kv.split("=", 1) for kv in args.env)
  exports = "".join(f"export {k}={shlex.quote(v)} && " for k, v in env.items())
  run = shlex.join(["python", "-m", "hat.train", "--config", args.config,
                    "--workdir", args.workdir, "--distributed=auto", "--no-progress", *extra])
  prefix = f"cd && mkdir -p {LOG_DIR} && cd {REMOTE_DIR} && . .venv/bin/activate && {exports}"
  if args.foreground:
    return f"{prefix}{run} 2>&1 | tee {LOG_DIR}/train.log"
  # setsid + nohup: the trainer must outlive the ssh session that starts it.
  return (f"{prefix}(setsid nohup {run} > {LOG_DIR}/train.log 2>&1 < /dev/null & "
          f"echo $! > {LOG_DIR}/train.pid)")


def commands(action: str, args: argparse.Namespace, extra: list[str]) -> list[list[str]]:
  """The argv lists an action runs, in order."""
  gen, chips, accel = parse_accelerator(args.accelerator)
  where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]

  def ssh(command: str, worker: str = "all") -> list[str]:
    return tpu + ["ssh", args.name, *where, f"--worker={worker}", f"--command={command}"]

  if action == "create":
    create = tpu + ["create", args.name, *where, f"--accelerator-type={accel}",
                    f"--version={args.version or RUNTIME_VERSIONS[gen]}"]
    return [create + (["--spot"] if args.spot else [])]
  if action == "setup":
    install = (f"cd && cd {REMOTE_DIR} && python3 -m venv .venv && . .venv/bin/activate && "
               "pip install -q -U pip && pip install -q -e '.[tpu,gcs]'")
    if args.repo:
      fetch = (f"cd && (test -d {REMOTE_DIR}/.git || git clone {shlex.quote(args.repo)} {REMOTE_DIR})"
               f" && cd {REMOTE_DIR} && git fetch -q origin && "
               f"git checkout -q {shlex.quote(args.branch)} && (git pull -q --ff-only || true)")
      return [ssh(f"{fetch} && {install}")]
    # This checkout as it is (tracked and untracked, not ignored files) to every worker.
    pack = ["bash", "-c", "git ls-files -co --exclude-standard -z | "
            f"tar --null -czf {SOURCE_TARBALL} -T -"]
    copy = tpu + ["scp", SOURCE_TARBALL, f"{args.name}:hat_src.tar.gz", *where, "--worker=all"]
    unpack = f"cd && mkdir -p {REMOTE_DIR} && tar -xzf hat_src.tar.gz -C {REMOTE_DIR}"
    return [pack, copy, ssh(f"{unpack} && {install}")]
  if action == "train":
    return [ssh(train_command(args, extra))]
  if action == "logs":
    return [ssh(f"cd && tail -n {args.lines} {LOG_DIR}/train.log", worker=args.worker)]
  if action == "collect":
    out = os.path.join(args.log_dir, args.name)
    cmds = [["mkdir", "-p", out]]
    for w in range(num_workers(gen, chips)):
      cmds.append(tpu + ["scp", f"{args.name}:{LOG_DIR}/train.log",
                         os.path.join(out, f"worker-{w}.log"), *where, f"--worker={w}"])
    return cmds
  if action == "stop":
    return [ssh(f"cd && test -f {LOG_DIR}/train.pid && kill $(cat {LOG_DIR}/train.pid) || true")]
  if action == "delete":
    return [tpu + ["delete", args.name, *where, "--quiet"]]
  if action == "up":
    return [c for a in ("create", "setup", "train") for c in commands(a, args, extra)]
  raise ValueError(f"unknown action {action!r}")


def build_parser() -> argparse.ArgumentParser:
  """Command-line flags."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("action", choices=("up", "create", "setup", "train", "logs", "collect",
                                     "stop", "delete"))
  ap.add_argument("--name", required=True, help="TPU VM name")
  ap.add_argument("--zone", required=True, help="e.g. us-east5-a (v5p), us-east1-d (v6e)")
  ap.add_argument("--project", default="", help="GCP project (default: gcloud's)")
  ap.add_argument("--accelerator", default="v5p-64", help="v4-N, v5p-N, v5e-N, v6e-N")
  ap.add_argument("--version", default="", help="TPU runtime version (default per generation)")
  ap.add_argument("--spot", action="store_true", help="create as a Spot TPU")
  ap.add_argument("--repo", default="", help="git URL to clone on workers (default: copy "
                                             "this checkout)")
  ap.add_argument("--branch", default="main", help="branch or commit with --repo")
  ap.add_argument("--config", default="configs/hat_1b.py", help="config file, repo-relative")
  ap.add_argument("--workdir", default="", help="run directory, gs://BUCKET/... on pods")
  ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                  help="extra environment for the trainer (repeatable)")
  ap.add_argument("--libtpu_args", default=DEFAULT_LIBTPU_ARGS,
                  help="LIBTPU_INIT_ARGS for the trainer ('' for libtpu's defaults)")
  ap.add_argument("--foreground", action="store_true",
                  help="train attached to the ssh session, logs streamed from all workers")
  ap.add_argument("--worker", default="0", help="logs: which worker ('all' for every one)")
  ap.add_argument("--lines", type=int, default=50, help="logs: lines to show")
  ap.add_argument("--log_dir", default="logs", help="collect: local directory")
  add_dry_run_flag(ap)
  return ap


def main(argv: list[str] | None = None) -> int:
  """CLI entry point; arguments after `--` go to hat.train."""
  argv, extra = split_train_args(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  if args.action in ("up", "train") and not args.workdir:
    build_parser().error("--workdir is required to train (gs://... so every worker shares it)")
  for kv in args.env:
    if "=" not in kv:
      build_parser().error(f"--env {kv!r} is not KEY=VALUE")
  return execute(commands(args.action, args, extra), args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
