"""Sampling text from a trained run (HAT, BPE or byte LM).

    python -m hat.generate --workdir runs/demo --prompt "The quick bro" --max-new-bytes 200

HAT generation follows the paper's nested loop: the decoder spells bytes of the current
word until it emits `[W]`, then the word is committed and the next one begins; `[S]` ends
the document. A prompt whose last word is incomplete is continued from inside that word,
so output does not depend on where the prompt was cut.

This sampler recomputes the whole context each step with one jit-compiled forward pass
of fixed shape (no recompilation per step). Contexts longer than the layout's capacity
keep their most recent words.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hat.data import layout
from hat.data.layout import Segment
from hat.text.codec import PAD_ID, S_ID, W_ID


@dataclasses.dataclass(frozen=True)
class SampleOptions:
  """How to pick each symbol."""

  temperature: float = 0.8
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off
  max_new_bytes: int = 200
  stop: tuple[str, ...] = ()
  seed: int = 0

  @property
  def greedy(self) -> bool:
    return self.temperature <= 0.0


def pick(logits_V: np.ndarray, opts: SampleOptions, rng: np.random.Generator) -> int:
  """Greedy, or temperature + top-k + top-p sampling from one logit vector (fp32)."""
  logits_V = np.asarray(logits_V, np.float64)
  if opts.greedy:
    return int(np.argmax(logits_V))
  z = logits_V / opts.temperature
  if opts.top_k > 0:
    kth = np.sort(z)[-min(opts.top_k, len(z))]
    z = np.where(z < kth, -np.inf, z)
  p = np.exp(z - z.max())
  p /= p.sum()
  if opts.top_p < 1.0:
    order = np.argsort(-p)
    keep = np.cumsum(p[order]) - p[order] < opts.top_p
    mask = np.zeros_like(p, bool)
    mask[order[keep]] = True
    p = np.where(mask, p, 0.0)
    p /= p.sum()
  return int(rng.choice(len(p), p=p))


def _forward_fn(model: nnx.Module):
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, batch):
    return nnx.merge(graphdef, state)(batch)

  return lambda batch: forward(state, {k: jnp.asarray(v) for k, v in batch.items()})


class HATSampler:
  """Samples bytes from a HAT model word by word."""

  def __init__(self, model: nnx.Module, cfg, splitter):
    self.cfg, self.splitter = cfg, splitter
    self.forward = _forward_fn(model)

  def _logits(self, words: list[bytes], partial: bytes) -> tuple[np.ndarray, list[bytes]]:
    d = self.cfg.data
    while True:
      try:
        seqs = layout.hat_sequences([Segment(tuple(words) + (partial,), False)],
                                    max_units=d.max_units, num_rows=d.num_rows,
                                    row_len=d.row_len, overflow="error")
        break
      except layout.CapacityError:
        words = words[1:]  # keep the most recent context that fits
    seq = seqs[0]
    unit = int(seq["num_units_B"]) - 1
    slot = int(seq["unit_slot_BxW"][unit]) + len(partial)
    logits = self.forward(layout.stack([seq]))
    return np.array(logits[0, slot], np.float32), words

  def generate(self, prompt: bytes, opts: SampleOptions) -> bytes:
    """Continues `prompt`; returns only the new bytes."""
    rng = np.random.default_rng(opts.seed)
    words = list(self.splitter.split(prompt))
    partial = words.pop() if words else b""
    out = b""
    max_word = self.cfg.data.max_word_bytes
    while len(out) < opts.max_new_bytes:
      logits, words = self._logits(words, partial)
      logits[PAD_ID] = -np.inf
      if partial:
        logits[S_ID] = -np.inf  # [S] only follows a finished word
      else:
        logits[W_ID] = -np.inf  # an empty word would loop forever
      if len(partial) >= max_word:
        logits[:256] = -np.inf  # words are cut at max_word_bytes
      sym = pick(logits, opts, rng)
      if sym == S_ID:
        break
      if sym == W_ID:
        words.append(partial)
        partial = b""
        continue
      partial += bytes([sym])
      out += bytes([sym])
      if any(s.encode() in out for s in opts.stop):
        break
    return _cut_at_stop(out, opts.stop)


class TokenSampler:
  """Samples from a BPE or byte-level LM."""

  def __init__(self, model: nnx.Module, cfg, tokenizer):
    self.cfg, self.tok = cfg, tokenizer
    self.forward = _forward_fn(model)

  def _batch(self, ctx: list[int]) -> dict[str, np.ndarray]:
    t, n = self.cfg.data.max_tokens, len(ctx)
    tokens = np.full((1, t), self.tok.pad_id, np.int32)
    tokens[0, :n] = ctx
    segment = np.zeros((1, t), np.int32)
    segment[0, :n] = 1
    pos = np.zeros((1, t), np.int32)
    pos[0, :n] = np.arange(n)
    zeros = np.zeros((1, t), np.int32)
    return {"tokens_BxT": tokens, "targets_BxT": zeros, "target_mask_BxT": zeros,
            "segment_BxT": segment, "pos_BxT": pos, "num_bytes_B": np.zeros(1, np.int32)}

  def generate(self, prompt: bytes, opts: SampleOptions) -> bytes:
    """Continues `prompt`; returns only the new bytes."""
    rng = np.random.default_rng(opts.seed)
    ids = list(self.tok.encode(prompt))
    new: list[int] = []
    cap = self.cfg.data.max_tokens - 1
    while len(self.tok.decode(new)) < opts.max_new_bytes:
      ctx = [self.tok.bos_id] + (ids + new)[-cap:]
      logits = np.array(self.forward(self._batch(ctx))[0, len(ctx) - 1], np.float32)
      logits[self.tok.pad_id] = -np.inf
      if self.tok.bos_id != self.tok.eos_id:
        logits[self.tok.bos_id] = -np.inf
      t = pick(logits, opts, rng)
      if t == self.tok.eos_id:
        break
      new.append(t)
      if any(s.encode() in self.tok.decode(new) for s in opts.stop):
        break
    return _cut_at_stop(self.tok.decode(new)[:opts.max_new_bytes], opts.stop)


def _cut_at_stop(out: bytes, stop: Sequence[str]) -> bytes:
  for s in stop:
    i = out.find(s.encode())
    if i >= 0:
      out = out[:i]
  return out


def make_sampler(model, cfg, tokenizer=None):
  """The sampler for `cfg.model.kind`."""
  if cfg.model.kind == "hat":
    from hat.text.splitter import Splitter
    return HATSampler(model, cfg, Splitter(cfg.data.splitter, cfg.data.max_word_bytes))
  return TokenSampler(model, cfg, tokenizer)


def main(argv: list[str] | None = None) -> int:
  """CLI: load the latest checkpoint of a run and print continuations of the prompt."""
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="run directory written by hat.train")
  parser.add_argument("--prompt", action="append", default=None,
                      help="prompt text; repeat for several (default: the config's)")
  parser.add_argument("--max-new-bytes", type=int, default=200)
  parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  parser.add_argument("--top-k", type=int, default=0)
  parser.add_argument("--top-p", type=float, default=1.0)
  parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  from hat.train.checkpoint import load_for_inference
  model, cfg, tokenizer = load_for_inference(args.workdir)
  sampler = make_sampler(model, cfg, tokenizer)
  opts = SampleOptions(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       max_new_bytes=args.max_new_bytes, stop=tuple(args.stop),
                       seed=args.seed)
  for prompt in args.prompt or [cfg.sample_prompt]:
    new = sampler.generate(prompt.encode(), opts)
    sys.stdout.write(f"--- prompt: {prompt!r}\n{prompt}{new.decode('utf-8', 'replace')}\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
