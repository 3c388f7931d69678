"""Timing of real training steps, shared by the benchmark tools.

A few real batches are put on the device first and cycled, so the timing is the jitted
step alone (no input pipeline); compile time is reported separately.
"""

from __future__ import annotations

import pathlib
import time

import jax
import numpy as np

from hat import flops, storage
from hat.config import resolve
from hat.data import pipeline
from hat.models import model_vocab_size
from hat.train.checkpoint import Checkpointer
from hat.train.loop import make_run_mesh
from hat.train.state import init_state, state_spec
from hat.train.step import make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = {"hat": "configs/tiny_hat.py", "bpe": "configs/tiny_bpe.py",
           "byte": "configs/tiny_byte.py"}


class _NoData:
  def get_state(self):
    return {}


def bpe_tokenizer(data: str, workdir: pathlib.Path, overrides: list[str],
                  vocab_size: int = 1024) -> str:
  """A small BPE model trained on the benchmark's own training text."""
  from hat.text.bpe import train_bpe  # pylint: disable=g-import-not-at-top

  cfg = resolve(str(ROOT / CONFIGS["hat"]), [f"data.train={data}", *overrides])
  from hat.data.sources import open_from_config, parse_mixture  # pylint: disable=g-import-not-at-top

  docs = open_from_config(cfg.data, parse_mixture(data)[0], "train")
  texts = [docs[i] for i in range(min(len(docs), 5000))]
  path = workdir / f"bench_bpe{vocab_size}.model"
  train_bpe(texts, vocab_size=vocab_size, model_path=path)
  return str(path)


def time_model(kind: str, overrides: list[str], steps: int,
               ckpt_dir: storage.PathLike | None = None) -> dict:
  """Compile + timed steps of one model kind; optionally the async-save overhead."""
  return time_config(resolve(str(ROOT / CONFIGS[kind]), overrides), steps, ckpt_dir,
                     kind=kind)


def time_config(cfg, steps: int, ckpt_dir: pathlib.Path | None = None, *,
                kind: str = "", tokenizer=None, settle: int = 2) -> dict:
  """Compile + timed steps of any run config (real batches from its data source)."""
  kind = kind or cfg.model.kind
  mesh = make_run_mesh(cfg)
  tokenizer = tokenizer or pipeline.default_tokenizer(cfg)
  vocab = model_vocab_size(cfg, tokenizer)
  spec = state_spec(cfg, vocab, mesh)
  state = init_state(cfg, vocab, mesh, spec)
  it = pipeline.make_train_iterator(cfg, tokenizer)
  batches = [pipeline.global_batch(next(it), mesh) for _ in range(4)]
  step_fn = make_train_step(cfg, spec, mesh, batches[0])
  one = np.float32(1.0)

  def run(n, state, start=0):
    m = None
    for i in range(n):
      state, m = step_fn(state, batches[(start + i) % len(batches)], one)
    jax.block_until_ready(m)
    return state

  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    state = run(1, state)
    compile_s = time.perf_counter() - t0
    state = run(settle, state)  # settle
    t0 = time.perf_counter()
    state = run(steps, state)
    dt = time.perf_counter() - t0
    bytes_per_batch = np.mean([float(np.sum(np.asarray(b["num_bytes_B"]))) for b in batches])
    flops_step = flops.train_flops_per_step(cfg, vocab)
    kind_dev = jax.devices()[0].device_kind
    per_dev = flops_step * steps / dt / jax.device_count()
    hw_step = flops.hardware_train_flops_per_step(cfg, vocab,
                                                  impl=flops.executed_attention_impl(cfg))
    out = {"kind": kind, "compile_s": compile_s, "steps_per_s": steps / dt,
           "step_ms": 1e3 * dt / steps, "bytes_per_batch": bytes_per_batch,
           "bytes_per_s": bytes_per_batch * steps / dt,
           "tflops_per_s_per_device": per_dev / 1e12, "mfu": flops.mfu(per_dev, kind_dev),
           "hfu": flops.hfu(hw_step * steps / dt / jax.device_count(), kind_dev),
           "hardware_flops_per_step": hw_step,
           "train_flops_per_step": flops_step, "_cfg": cfg, "_batches": batches,
           "_vocab": vocab}
    if ckpt_dir is not None:
      out.update(_ckpt_overhead(cfg, state, run, storage.path(ckpt_dir)))
  return out


def _ckpt_overhead(cfg, state, run, ckpt_dir, reps: int = 9, window: int = 5):
  """A save followed by `window` steps vs `window + 1` plain steps (medians of `reps`).

  The save's blocking part (device->host copy) and the background write competing with
  the following steps are both inside the timed window. Measured twice, interleaved:
  the default Checkpointer (device snapshot, host copy and hand-off in a background
  thread) and the previous one (orbax's per-array device->host transfer in the training
  thread: `background=False, host_copy=False`), the latter as `..._previous`. The whole
  save (`ckpt_save_total_ms`) is a separate save with no steps beside it, from the call
  until the checkpoint is committed.
  """
  out = {}
  ckpts = {"": Checkpointer(ckpt_dir / "default", keep=2),
           "_previous": Checkpointer(ckpt_dir / "previous", keep=2, host_copy=False,
                                     background=False)}
  base, with_save = [], {k: [] for k in ckpts}
  blocking, total = {k: [] for k in ckpts}, {k: [] for k in ckpts}
  for rep in range(reps):
    t0 = time.perf_counter()
    state = run(window + 1, state)
    base.append(time.perf_counter() - t0)
    for suffix, ckpt in ckpts.items():
      t0 = time.perf_counter()
      ckpt.save(1000 + rep, state, _NoData(), cfg)
      blocking[suffix].append(time.perf_counter() - t0)
      state = run(window, state)
      with_save[suffix].append(time.perf_counter() - t0)
      ckpt.wait()
      t0 = time.perf_counter()  # a save alone, from the call until it is committed
      ckpt.save(2000 + rep, state, _NoData(), cfg)
      ckpt.wait()
      total[suffix].append(time.perf_counter() - t0)
  b = float(np.median(base))
  step_s = b / (window + 1)
  out["ckpt_step_ms"] = 1e3 * step_s
  for suffix, ckpt in ckpts.items():
    ckpt.close()
    w = float(np.median(with_save[suffix]))
    # (save + `window` steps) - `window` plain steps: everything the save adds, its
    # blocking part and the slowdown of the steps its background write overlaps.
    extra = w - (b - step_s)
    out.update({f"ckpt_save_blocking_ms{suffix}": 1e3 * float(np.median(blocking[suffix])),
                f"ckpt_save_total_ms{suffix}": 1e3 * float(np.median(total[suffix])),
                f"ckpt_extra_ms{suffix}": 1e3 * extra,
                f"ckpt_overhead_one_step{suffix}": extra / step_s,
                f"ckpt_overhead_amortised_at_ckpt_every{suffix}":
                    extra / (cfg.ckpt_every * step_s) if cfg.ckpt_every else None})
  return out
