"""One-command bootstrap: make `.venv`, install the project, then run a job in it.

    python3 tools/bootstrap.py demo   # short pretraining run, eval bpb, a generated sample
    python3 tools/bootstrap.py test   # the full test suite

Needs only Python >= 3.10 and access to the package registry. Re-running reuses the
virtualenv and only reinstalls when pyproject.toml changed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import venv

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")

DEMO_DIR = "runs/demo"
DEMO_STEPS = [
    [str(PY), "-m", "hat.train", "--config", "configs/tiny_hat.py", "--workdir", DEMO_DIR],
    [str(PY), "-m", "hat.generate", "--workdir", DEMO_DIR, "--prompt", "The ",
     "--max-new-bytes", "200", "--seed", "0"],
]
TEST_CMD = [str(PY), "-m", "pytest", "tests"]  # -q comes from pyproject addopts


def _run(cmd: list[str], **kw) -> None:
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=ROOT, check=True, **kw)


def ensure_env() -> None:
  """Creates the virtualenv and installs `.[test,aot]` when pyproject.toml changed.

  `aot` brings libtpu, so the ahead-of-time TPU compilation test runs on CPU machines.
  """
  if not PY.exists():
    print(f"creating virtualenv in {VENV}", flush=True)
    venv.EnvBuilder(with_pip=True).create(VENV)
  stamp = VENV / ".hat-installed"
  digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
  if stamp.exists() and stamp.read_text() == digest:
    return
  _run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"])
  _run([str(PY), "-m", "pip", "install", "-q", "-e", ".[test,aot]"])
  stamp.write_text(digest)


def _has_accelerator() -> bool:
  """A visible NVIDIA driver or TPU device: let jax pick its best backend."""
  return shutil.which("nvidia-smi") is not None or any(pathlib.Path("/dev").glob("accel*"))


def main(argv: list[str] | None = None) -> int:
  """Parses the job name, bootstraps and runs it; returns the exit code."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("job", choices=["demo", "test", "env"],
                      help="demo: train+eval+sample; test: run the tests; env: only install")
  parser.add_argument("extra", nargs="*", help="extra arguments for pytest (test job)")
  args = parser.parse_args(argv)
  ensure_env()
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if args.job == "demo" and "JAX_PLATFORMS" not in env and not _has_accelerator():
    env["JAX_PLATFORMS"] = "cpu"  # skip libtpu's probing (and its warnings) on CPU hosts
  try:
    if args.job == "demo":
      for cmd in DEMO_STEPS:
        _run(cmd, env=env)
    elif args.job == "test":
      _run(TEST_CMD + args.extra, env=env)
  except subprocess.CalledProcessError as e:
    return e.returncode or 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
