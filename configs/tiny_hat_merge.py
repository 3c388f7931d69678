"""Tiny merge-gated HAT: tiny_hat's stacks, no splitter, learned chunks of ~5.5 bytes."""

import pathlib

from hat.config import load_config_file


def get_config():
  """tiny_hat's stacks over the byte stream; a boundary gate cuts chunks of ~5.5 bytes.

  The target chunk length is the English corpus's bytes per whitespace word (spaces
  included), so the backbone sees about as many positions as tiny_hat's.
  """
  c = load_config_file(pathlib.Path(__file__).with_name("tiny_hat.py"))
  c.model.gate.update(kind="merge", target_bytes_per_chunk=5.5, max_chunk_bytes=31,
                      controller="ratio", ratio_loss_weight=0.03, capacity=128)
  c.data.max_tokens = 544  # 512 bytes + [S] of up to 32 segments (as tiny_byte)
  return c
