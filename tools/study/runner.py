"""Runs the project's own commands for the study: training, evaluation, tools.

Every command writes a log; a finished training run leaves a `study_done` marker and a
finished evaluation its JSON, so a restarted study skips what is done and resumes a
half-trained run from its last checkpoint (`hat.train` resumes by itself).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[2]


def overrides(d: dict) -> list[str]:
  """{key: value} -> ['--config.key=value', ...]."""
  return [f"--config.{k}={v}" for k, v in d.items()]


class Runner:
  """Runs study commands with logs under `out/logs`, up to `jobs` at a time."""

  def __init__(self, out: pathlib.Path, jobs: int = 1):
    self.out, self.jobs = out, jobs
    self.py = sys.executable
    self.env = dict(os.environ, PYTHONUNBUFFERED="1")
    accel = shutil.which("nvidia-smi") or any(pathlib.Path("/dev").glob("accel*"))
    if "JAX_PLATFORMS" not in self.env and not accel:
      self.env["JAX_PLATFORMS"] = "cpu"  # no TPU probing on CPU hosts
    # Runs of one study share shapes (eval steps, same-model runs): compile them once.
    self.env.setdefault("JAX_COMPILATION_CACHE_DIR", str(out / "jax_cache"))
    self.env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

  def run(self, cmd: Sequence[str], log_name: str) -> str:
    """Runs one command; its output goes to logs/<log_name>.log; raises on failure."""
    log = self.out / "logs" / f"{log_name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    print(f"+ [{log_name}] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(list(cmd), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=self.env)
    with log.open("a") as f:
      f.write(proc.stdout)
    if proc.returncode:
      tail = "\n".join(proc.stdout.splitlines()[-15:])
      raise RuntimeError(f"{log_name} failed (exit {proc.returncode}); log: {log}\n{tail}")
    print(f"  [{log_name}] done in {time.time() - start:.0f} s", flush=True)
    return proc.stdout

  def train(self, name: str, config_file: str, over: dict) -> pathlib.Path:
    """Trains (or resumes) run `name`; returns its workdir. Skipped once done.

    The done marker holds the run's settings: a finished run of the same name with other
    settings (a preset edited between two calls) is an error, never silently reused.
    """
    workdir = self.out / "runs" / name
    marker = workdir / "study_done"
    settings = json.dumps({"config": config_file, **{k: str(v) for k, v in over.items()}},
                          sort_keys=True)
    if marker.exists():
      done = marker.read_text().strip()
      if done != "ok" and done != settings:  # "ok": a marker without settings
        raise RuntimeError(f"{workdir} was trained with other settings than this study "
                           "asks for; use another --out or remove that run")
      return workdir
    self.run([self.py, "-m", "hat.train", "--no-progress", "--config", config_file,
              "--workdir", str(workdir)] + overrides(over), f"train_{name}")
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(settings + "\n")
    return workdir

  def evaluate(self, workdir: pathlib.Path, sets: Sequence[str], max_batches: int | None,
               tag: str = "final", out: pathlib.Path | None = None) -> dict:
    """`hat.evaluate` of `workdir` (or a step folder) on `sets` -> {set: metrics}.

    `sets` are names of the run's eval sets or name=spec; the JSON goes to `out`
    (default `<workdir>/eval_<tag>.json`) and is reused when present.
    """
    out = out or workdir / f"eval_{tag}.json"
    if not out.exists():
      cmd = [self.py, "-m", "hat.evaluate", "--workdir", str(workdir), "--out", str(out)]
      for s in sets:
        cmd += ["--eval", s]
      if max_batches is not None:
        cmd += ["--max-batches", str(max_batches)]
      self.run(cmd, f"eval_{out.parent.name}_{out.stem}")
    return json.loads(out.read_text())["results"]

  def tool(self, args: Sequence[str], log_name: str, done: pathlib.Path) -> None:
    """Runs `python <args>` unless `done` exists."""
    if not done.exists():
      self.run([self.py, *args], log_name)

  def many(self, tasks: Sequence[Callable[[], object]]) -> list:
    """Runs independent tasks, up to `jobs` at once; results in order."""
    if self.jobs <= 1 or len(tasks) <= 1:
      return [t() for t in tasks]
    with concurrent.futures.ThreadPoolExecutor(self.jobs) as pool:
      return list(pool.map(lambda t: t(), tasks))


def metrics(workdir: pathlib.Path) -> list[dict]:
  """The rows of a run's metrics.jsonl."""
  path = workdir / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def eval_curve(workdir: pathlib.Path, key: str) -> dict[int, float]:
  """{step: value} of one in-training eval metric (the last value per step)."""
  return {m["step"]: m[key] for m in metrics(workdir) if key in m}
