"""Training and evaluation metrics: derived quantities, throughput, MFU, and their writers.

Steps return metric SUMS (`hat.models.losses`), so a log window or an eval pass is
summarised by adding them up and dividing once. Throughput counts real text bytes and
words (not padded positions); FLOPs are the analytic count of the padded shapes the
device executes (`hat.flops`), so MFU says how busy the device was, and bytes/s says how
much of that work was useful. HFU counts the hardware FLOPs instead (remat recompute and
the masked half of dense causal attention included), so HFU >= MFU.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np

from hat import storage
from hat.models.losses import derived_metrics

log = logging.getLogger(__name__)

_LAST = ("lr", "gate_alpha")  # reported as the window's last value, not its mean
_MEAN = ("loss", "grad_norm")


def is_finite_step(host_metrics: dict[str, Any]) -> bool:
  """False when the step's loss or gradient norm is NaN or infinite."""
  return all(math.isfinite(float(host_metrics[k])) for k in ("loss", "grad_norm")
             if k in host_metrics)


def derived(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
  """bpb, per-target loss and accuracies from summed metrics (see losses.derived_metrics)."""
  return derived_metrics(sums, prefix)


class Window:
  """Accumulates host-side step metrics between two log points."""

  def __init__(self, flops_per_step: float, num_devices: int, peak_flops: float | None,
               hardware_flops_per_step: float | None = None):
    self.flops_per_step = flops_per_step
    self.hardware_flops_per_step = hardware_flops_per_step
    self.num_devices = num_devices
    self.peak_flops = peak_flops
    self._reset(time.perf_counter())

  def _reset(self, now: float) -> None:
    self.sums: dict[str, float] = {}
    self.steps = 0
    self.start = now

  def add(self, host_metrics: dict[str, Any]) -> None:
    """Adds one step's fetched metrics."""
    for k, v in host_metrics.items():
      v = float(v)
      self.sums[k] = v if k in _LAST else self.sums.get(k, 0.0) + v
    self.steps += 1

  def summary(self) -> dict[str, float]:
    """Window metrics (train/...), then starts a new window."""
    now = time.perf_counter()
    dt, n, s = max(now - self.start, 1e-9), max(self.steps, 1), self.sums
    out = {f"train/{k}": s[k] / n for k in _MEAN if k in s}
    out.update({f"train/{k}": s[k] for k in _LAST if k in s})
    out.update(derived(s, "train/"))
    out["perf/steps_per_s"] = self.steps / dt
    out["perf/bytes_per_s"] = s.get("num_bytes", 0.0) / dt
    if s.get("num_words"):
      out["perf/words_per_s"] = s["num_words"] / dt
    out["perf/targets_per_s"] = s.get("num_targets", 0.0) / dt
    flops_per_s_dev = self.flops_per_step * self.steps / dt / self.num_devices
    out["perf/tflops_per_s_per_device"] = flops_per_s_dev / 1e12
    if self.peak_flops:
      out["perf/mfu"] = flops_per_s_dev / self.peak_flops
      if self.hardware_flops_per_step:
        out["perf/hfu"] = (self.hardware_flops_per_step * self.steps / dt / self.num_devices
                           / self.peak_flops)
    self._reset(now)
    return out


class MetricsWriter:
  """metrics.jsonl and TensorBoard event files in the workdir; inert off process 0.

  A remote workdir (gs://) cannot be appended to: both files are written in a local
  stage and uploaded whole at most every `upload_every_s` seconds, at `flush()` (the
  loop calls it at each checkpoint, so the bucket's metrics reach at least the newest
  checkpoint) and at `close()`.
  """

  def __init__(self, workdir: storage.PathLike, enabled: bool = True,
               upload_every_s: float = 30.0):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    self._stage = None
    self._upload_every_s = upload_every_s
    self._uploaded = time.monotonic()
    if not enabled:
      return
    self._stage = storage.LocalStage(storage.path(workdir))
    self._jsonl = open(self._stage.fetch("metrics.jsonl"), "a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      self._tb = SummaryWriter(str(self._stage.dir / "tb"))
    except ImportError:
      log.warning("tensorboardX is not installed: no TensorBoard event files")

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    """Appends one record (numbers only; None values are kept in JSON, skipped in TB)."""
    if not self.enabled:
      return
    clean = {k: (None if v is None else float(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        if v is not None and math.isfinite(v):
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()
    if self._stage.remote and time.monotonic() - self._uploaded >= self._upload_every_s:
      self.flush()

  def flush(self) -> None:
    """Makes the records so far visible in the workdir (uploads them to a remote one)."""
    if self.enabled and self._stage.remote:
      self._jsonl.flush()
      if self._tb is not None:
        self._tb.flush()
      self._stage.upload()
      self._uploaded = time.monotonic()

  def close(self) -> None:
    """Flushes and closes the files."""
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    if self._stage is not None:
      self._stage.close()


def to_host(device_metrics: dict[str, Any]) -> dict[str, float]:
  """Fetches a step's metrics (blocks until that step is done)."""
  return {k: float(np.asarray(v)) for k, v in device_metrics.items()}


def format_line(step: int, metrics: dict[str, float]) -> str:
  """A compact one-line log record."""
  keys = ("train/loss", "train/bpb", "train/word_acc", "train/lr", "train/grad_norm",
          "perf/bytes_per_s", "perf/tflops_per_s_per_device", "perf/mfu", "perf/hfu")
  parts = [f"step {step}"]
  for k in keys:
    if metrics.get(k) is not None:
      v = metrics[k]
      parts.append(f"{k.split('/')[1]}={v:.4g}" if abs(v) < 1e5 else f"{k.split('/')[1]}={v:.3e}")
  return " ".join(parts)
