"""Helpers shared by the cluster launchers (standalone: no jax or hat import needed)."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys


def split_train_args(argv: list[str]) -> tuple[list[str], list[str]]:
  """(launcher arguments, arguments after `--` that go to hat.train)."""
  if "--" not in argv:
    return list(argv), []
  i = argv.index("--")
  return list(argv[:i]), list(argv[i + 1:])


def add_dry_run_flag(ap: argparse.ArgumentParser) -> None:
  """The launchers' common `--dry-run` flag (print the commands, run nothing)."""
  ap.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                  help="print the commands without running them")


def execute(cmds: list[list[str]], dry_run: bool) -> int:
  """Prints each command; runs it unless dry_run; stops at the first failure."""
  for argv in cmds:
    print(shlex.join(argv), flush=True)
    if not dry_run:
      rc = subprocess.call(argv)
      if rc:
        print(f"failed with exit status {rc}", file=sys.stderr)
        return rc
  return 0
