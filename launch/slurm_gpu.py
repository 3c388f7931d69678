"""Slurm helper for GPU clusters: submits launch/slurm_gpu.sbatch, and starts each task.

  python launch/slurm_gpu.py submit --nodes 32 --gpus_per_node 8 --partition gpu \
      --config configs/hat_7b.py --workdir /shared/runs/hat_7b [-- --config.steps=1000]

`submit` runs `sbatch` on launch/slurm_gpu.sbatch (one task per GPU by default, or one per
node with --per_node). Inside the job, `srun` runs `slurm_gpu.py exec` once per task,
which sets the distributed environment from Slurm's variables and replaces itself with
`python -m hat.train`:
  - coordinator: the first host of SLURM_JOB_NODELIST, port 10000 + job id % 50000;
    process id / count from SLURM_PROCID / SLURM_NTASKS; passed to the trainer as
    HAT_COORDINATOR, HAT_PROCESS_ID, HAT_NUM_PROCESSES;
  - devices: one GPU per task (JAX picks GPU SLURM_LOCALID), or all of the node's GPUs
    with --per_node (JAX_LOCAL_DEVICE_IDS);
  - XLA_FLAGS for collective/compute overlap (below), and the cuDNN attention kernel
    (--config.model.attention_impl=cudnn, unless the arguments set it).
`--dry-run` prints the commands (and, for exec, the environment) instead of running them.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_dry_run_flag, split_train_args  # noqa: E402

# Latency-hiding scheduling overlaps collectives with compute; pipelined collectives and
# larger combine thresholds batch FSDP's all-gathers / reduce-scatters per layer; cuBLAS
# rather than Triton GEMMs (faster for these bf16 shapes on H100).
XLA_GPU_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
)
SBATCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm_gpu.sbatch")


def expand_nodelist(nodelist: str) -> list[str]:
  """Slurm's compressed host list ('gpu[001-003,007],login1') -> host names, in order."""
  hosts = []
  for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
      hosts.append(prefix)
      continue
    for part in ranges.split(","):
      lo, _, hi = part.partition("-")
      width = len(lo)
      for i in range(int(lo), int(hi or lo) + 1):
        hosts.append(f"{prefix}{i:0{width}d}")
  return hosts


def coordinator_port(job_id: str) -> int:
  """A port derived from the job id, so two jobs sharing a first node do not collide."""
  return 10000 + int(job_id) % 50000


def task_env(environ: dict[str, str], per_node: bool = False, port: int = 0) -> dict[str, str]:
  """Variables one task adds for jax.distributed and XLA, from Slurm's own."""
  missing = [k for k in ("SLURM_JOB_NODELIST", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID")
             if k not in environ]
  if missing:
    raise RuntimeError(f"not inside a Slurm job step (missing {', '.join(missing)}); "
                       "start it with srun from launch/slurm_gpu.sbatch")
  first = expand_nodelist(environ["SLURM_JOB_NODELIST"])[0]
  port = port or coordinator_port(environ["SLURM_JOB_ID"])
  flags = " ".join(f for f in XLA_GPU_FLAGS if f.split("=")[0] not in environ.get("XLA_FLAGS", ""))
  env = {
      "HAT_COORDINATOR": f"{first}:{port}",
      "HAT_NUM_PROCESSES": environ["SLURM_NTASKS"],
      "HAT_PROCESS_ID": environ["SLURM_PROCID"],
      "XLA_FLAGS": " ".join(filter(None, (environ.get("XLA_FLAGS", ""), flags))),
      # Leave room for cuDNN / NCCL workspaces outside JAX's pool.
      "XLA_PYTHON_CLIENT_MEM_FRACTION": environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92"),
  }
  visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
  if per_node:
    gpus = len(visible) or int(environ.get("SLURM_GPUS_ON_NODE", "8"))
    env["JAX_LOCAL_DEVICE_IDS"] = ",".join(str(i) for i in range(gpus))
  elif len(visible) == 1:
    # Slurm bound one GPU to this task (--gpus-per-task / --gpu-bind): it is device 0,
    # not device SLURM_LOCALID as JAX would otherwise assume.
    env["JAX_LOCAL_DEVICE_IDS"] = "0"
  return env


def train_argv(extra: list[str]) -> list[str]:
  """`python -m hat.train ...`, with cuDNN attention unless the arguments choose one."""
  argv = [sys.executable, "-m", "hat.train", "--no-progress", *extra]
  if not any(a.startswith("--config.model.attention_impl") for a in extra):
    # cuDNN's fused (flash) attention; the default XLA path materialises L x L scores.
    argv.append("--config.model.attention_impl=cudnn")
  return argv


def cmd_exec(args: argparse.Namespace, extra: list[str]) -> int:
  """Per-task entry: environment from Slurm, then exec the trainer."""
  env = task_env(dict(os.environ), per_node=args.per_node, port=args.port)
  argv = train_argv(extra)
  if args.dry_run:
    for k, v in env.items():
      print(f"export {k}={shlex.quote(v)}")
    print(shlex.join(argv))
    return 0
  os.execvpe(argv[0], argv, {**os.environ, **env})
  return 1  # not reached


def submit_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
  """The sbatch command for `submit`."""
  tasks = 1 if args.per_node else args.gpus_per_node
  argv = ["sbatch", f"--nodes={args.nodes}", f"--gpus-per-node={args.gpus_per_node}",
          f"--ntasks-per-node={tasks}", f"--job-name={args.job_name}", f"--time={args.time}"]
  argv += [f"--partition={args.partition}"] if args.partition else []
  argv += [f"--account={args.account}"] if args.account else []
  argv += [SBATCH] + (["--per-node"] if args.per_node else [])
  return argv + ["--config", args.config, "--workdir", args.workdir, *extra]


def build_parser() -> argparse.ArgumentParser:
  """Command-line flags."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("action", choices=("submit", "exec"))
  ap.add_argument("--nodes", type=int, default=1, help="submit: nodes")
  ap.add_argument("--gpus_per_node", type=int, default=8, help="submit: GPUs per node")
  ap.add_argument("--per_node", action="store_true",
                  help="one process per node driving all its GPUs (default: one per GPU)")
  ap.add_argument("--partition", default="", help="submit: Slurm partition")
  ap.add_argument("--account", default="", help="submit: Slurm account")
  ap.add_argument("--time", default="48:00:00", help="submit: wall-clock limit")
  ap.add_argument("--job_name", default="hat", help="submit: job name")
  ap.add_argument("--config", default="configs/hat_1b.py", help="submit: config file")
  ap.add_argument("--workdir", default="", help="submit: run directory on a shared filesystem")
  ap.add_argument("--port", type=int, default=0, help="exec: coordinator port (default: "
                                                      "from the job id)")
  add_dry_run_flag(ap)
  return ap


def main(argv: list[str] | None = None) -> int:
  """CLI entry point; arguments after `--` go to hat.train."""
  argv, extra = split_train_args(sys.argv[1:] if argv is None else argv)
  ap = build_parser()
  args = ap.parse_args(argv)
  if args.action == "exec":
    return cmd_exec(args, extra)
  if not args.workdir:
    ap.error("submit needs --workdir (on a filesystem every node shares)")
  cmd = submit_argv(args, extra)
  print(shlex.join(cmd), flush=True)
  return 0 if args.dry_run else subprocess.call(cmd)


if __name__ == "__main__":
  sys.exit(main())
