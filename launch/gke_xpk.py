"""Runs `python -m hat.train` on one or more TPU slices of a GKE cluster through xpk.

  python launch/gke_xpk.py run --cluster hat-v5p --zone us-east5-a --tpu_type v5p-256 \
      --num_slices 2 --config configs/hat_7b.py --workdir gs://BUCKET/runs/hat_7b

Actions: `cluster` (xpk cluster create), `run` (xpk workload create: builds an image from
--base_image plus this checkout, installs `.[tpu,gcs]`, starts the trainer on every host of
every slice), `status` (xpk workload list), `logs` (kubectl logs of the workload's pods),
`delete` (xpk workload delete). `--dry-run` prints the commands.

With N > 1 slices, data parallelism across slices runs over the data-centre network on
the mesh's `replica` axis only: the trainer gets `--config.mesh=replica=N,...` (FSDP and
tensor parallelism stay inside a slice, on ICI). xpk's JobSet sets the multi-slice
environment (MEGASCALE_*), so the trainer's --distributed=auto (jax.distributed.initialize()
without arguments) finds every host of every slice.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_dry_run_flag, execute, split_train_args  # noqa: E402

DEFAULT_LIBTPU_ARGS = ("--xla_tpu_enable_async_collective_fusion=true "
                       "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
                       "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
                       "--xla_tpu_overlap_compute_collective_tc=true "
                       "--xla_enable_async_all_gather=true")


def xpk_tpu_type(name: str) -> str:
  """xpk spells v5e slices 'v5litepod-N'; the others as Cloud TPU does (v5p-256, v6e-64)."""
  return name.replace("v5e-", "v5litepod-")


def mesh_for(num_slices: int, ici: str) -> str:
  """Mesh spec: replica across slices (DCN), the given axes inside each slice (ICI)."""
  return f"replica={num_slices},{ici}"


def container_command(args: argparse.Namespace, extra: list[str]) -> str:
  """What every host of every slice runs inside the container."""
  env = {"LIBTPU_INIT_ARGS": args.libtpu_args} if args.libtpu_args else {}
  env.update(kv.split("=", 1) for kv in args.env)
  exports = "".join(f"export {k}={shlex.quote(v)} && " for k, v in env.items())
  train = ["python", "-m", "hat.train", "--config", args.config, "--workdir", args.workdir,
           "--distributed=auto", "--no-progress", f"--config.mesh={mesh_for(args.num_slices, args.ici_mesh)}", *extra]
  install = "" if args.docker_image else "pip install -q -e '.[tpu,gcs]' && "
  return f"{install}{exports}{shlex.join(train)}"


def commands(action: str, args: argparse.Namespace, extra: list[str]) -> list[list[str]]:
  """The argv lists an action runs, in order."""
  where = ["--cluster", args.cluster, "--zone", args.zone]
  where += ["--project", args.project] if args.project else []
  tpu = ["--tpu-type", xpk_tpu_type(args.tpu_type), "--num-slices", str(args.num_slices)]
  if action == "cluster":
    capacity = ["--reservation", args.reservation] if args.reservation else (
        ["--spot"] if args.spot else ["--on-demand"])
    return [["xpk", "cluster", "create", *where, *tpu, *capacity]]
  if action == "run":
    image = (["--docker-image", args.docker_image] if args.docker_image else
             ["--base-docker-image", args.base_image, "--script-dir", args.script_dir])
    return [["xpk", "workload", "create", *where, "--workload", args.workload, *tpu, *image,
             "--max-restarts", str(args.max_restarts),
             "--command", container_command(args, extra)]]
  if action == "status":
    return [["xpk", "workload", "list", *where]]
  if action == "logs":
    return [["kubectl", "logs", f"--selector=jobset.sigs.k8s.io/jobset-name={args.workload}",
             "--prefix", f"--tail={args.lines}", "--max-log-requests=1000"]]
  if action == "delete":
    return [["xpk", "workload", "delete", *where, "--workload", args.workload]]
  raise ValueError(f"unknown action {action!r}")


def build_parser() -> argparse.ArgumentParser:
  """Command-line flags."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("action", choices=("cluster", "run", "status", "logs", "delete"))
  ap.add_argument("--cluster", required=True, help="GKE cluster name")
  ap.add_argument("--zone", required=True, help="e.g. us-east5-a")
  ap.add_argument("--project", default="", help="GCP project (default: gcloud's)")
  ap.add_argument("--tpu_type", default="v5p-256", help="slice type: v4-N, v5p-N, v5e-N, v6e-N")
  ap.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN")
  ap.add_argument("--workload", default="hat-train", help="workload (JobSet) name")
  ap.add_argument("--config", default="configs/hat_1b.py", help="config file, repo-relative")
  ap.add_argument("--workdir", default="", help="gs://BUCKET/... run directory")
  ap.add_argument("--ici_mesh", default="data=1,fsdp=-1,tensor=1",
                  help="mesh axes inside a slice; replica=num_slices is prepended")
  ap.add_argument("--base_image", default="python:3.11", help="image this checkout is added to")
  ap.add_argument("--script_dir", default=".", help="directory copied into the image")
  ap.add_argument("--docker_image", default="", help="prebuilt image with hat installed "
                                                     "(skips the build and pip install)")
  ap.add_argument("--max_restarts", type=int, default=3,
                  help="JobSet restarts; the trainer resumes from its last checkpoint")
  ap.add_argument("--reservation", default="", help="cluster: reservation to use")
  ap.add_argument("--spot", action="store_true", help="cluster: Spot capacity")
  ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                  help="extra environment for the trainer (repeatable)")
  ap.add_argument("--libtpu_args", default=DEFAULT_LIBTPU_ARGS,
                  help="LIBTPU_INIT_ARGS ('' for libtpu's defaults)")
  ap.add_argument("--lines", type=int, default=100, help="logs: lines per pod")
  add_dry_run_flag(ap)
  return ap


def main(argv: list[str] | None = None) -> int:
  """CLI entry point; arguments after `--` go to hat.train."""
  argv, extra = split_train_args(sys.argv[1:] if argv is None else argv)
  ap = build_parser()
  args = ap.parse_args(argv)
  if args.action == "run" and not args.workdir.startswith("gs://"):
    ap.error("--workdir must be a gs:// path that every slice can reach")
  if args.num_slices < 1:
    ap.error("--num_slices must be >= 1")
  if "replica" in args.ici_mesh:
    ap.error("--ici_mesh must not set replica: it is --num_slices")
  for kv in args.env:
    if "=" not in kv:
      ap.error(f"--env {kv!r} is not KEY=VALUE")
  return execute(commands(args.action, args, extra), args.dry_run)


if __name__ == "__main__":
  sys.exit(main())
