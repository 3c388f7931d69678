"""The batch contract between the data pipeline and the models.

A batch is a plain dict of numpy/jax int32 arrays (a pytree), all with static shapes from
the `DataConfig`. Leading axis B is the batch. This file is the single description of
what each key means; the data layer produces it, the models consume it.

Windows
-------
The data layer concatenates documents and cuts them into *windows* of at most
`window_bytes` bytes, at word boundaries (a word longer than the budget is never
produced: words are at most `max_word_bytes`). A window may hold the tail of one
document and the heads of others; each part is a *segment*. Both layouts below are made
from the identical windows, one window per sequence, so HAT and BPE see the same bytes.

HAT layout (families `hat`, `hat_delete`; see `hat.family`)
----------------------------
Each segment becomes a list of *units*: `START, w_1, …, w_n[, END]`. START opens every
segment; END follows the last word only where the segment ends its document. The
backbone runs over units (W = `max_units` positions). Unit j's encoder input is
`[marker] b_1 … b_n` (marker `[W]` for words, `[S]` for START and END, END and START have
no bytes); the encoder read-out is at the marker slot. The decoder decodes unit j (every
unit but START) from the backbone output of unit j−1: slot 0's input is that predictive
embedding, slots 1..n take the byte embeddings of b_1..b_n, and the targets are
`b_1 … b_n [W]` (END: just `[S]`).

Units are packed in order into R = `num_rows` rows of C = `row_len` slots (S = R·C); a
unit never straddles two rows, so byte attention is a dense C×C block per row with a
same-unit mask (bidirectional in the encoder, causal in the decoder).

  unit_segment_BxW   int32  document-segment id of each unit, 1-based; 0 = padding
  unit_pos_BxW       int32  position of the unit within its segment (START = 0); RoPE
  unit_slot_BxW      int32  flat slot index in [0, S) of the unit's marker slot; 0 for pad
  slot_ids_BxS       int32  encoder input symbols ([W]/[S] markers, bytes 0..255, [PAD])
  slot_unit_BxS      int32  unit index in [0, W) that owns the slot; -1 = padding slot
  slot_pos_BxS       int32  position within the unit (0 = marker slot); 0 for padding
  targets_BxS        int32  decoder target symbol of the slot; [PAD] where unused
  target_mask_BxS    int32  1 where the slot's target counts in the loss (not START, pad)
  num_bytes_B        int32  real text bytes in the sequence (bpb denominator)
  num_units_B        int32  units used (overflow/utilisation statistics)
  overflow_B         int32  1 if the sequence continues a window that overflowed capacity

Token layout (families `bpe`, `byte`, and `hat_merge` with the byte tokenizer)
----------------------------------------
Each segment becomes `BOS t_1 … t_m`; targets are the inputs shifted left, with `EOS`
after t_m only where the segment ends its document (otherwise the last input has no
target). T = `max_tokens`.

  tokens_BxT         int32  input ids; pad id where unused
  targets_BxT        int32  next-token targets
  target_mask_BxT    int32  1 where the target counts in the loss
  segment_BxT        int32  document-segment id, 1-based; 0 = padding
  pos_BxT            int32  position within the segment; RoPE
  num_bytes_B        int32  real text bytes predicted in the sequence (bpb denominator)
  overflow_B         int32  1 if the sequence continues a window that overflowed capacity

Overflow
--------
A window whose layout exceeds capacity (W units, S slots, T tokens) is never truncated.
With `overflow="carry"` the rest continues in the next sequence as a new segment (which
opens with its own START / BOS), and the event is counted; `overflow="error"` raises.
"""

from __future__ import annotations

HAT_KEYS = ("unit_segment_BxW", "unit_pos_BxW", "unit_slot_BxW", "slot_ids_BxS",
            "slot_unit_BxS", "slot_pos_BxS", "targets_BxS", "target_mask_BxS", "num_bytes_B",
            "num_units_B", "overflow_B")
TOKEN_KEYS = ("tokens_BxT", "targets_BxT", "target_mask_BxT", "segment_BxT", "pos_BxT",
              "num_bytes_B", "overflow_B")


def hat_shapes(batch_size: int, *, max_units: int, slots: int) -> dict[str, tuple]:
  """{key: (shape, dtype name)} of a HAT batch: W = max_units units, S = slots."""
  b, w, s = batch_size, max_units, slots
  dims = {"W": (b, w), "S": (b, s), "B": (b,)}
  return {k: (dims[k.rsplit("_", 1)[1].split("x")[-1]], "int32") for k in HAT_KEYS}


def token_shapes(batch_size: int, *, max_tokens: int) -> dict[str, tuple]:
  """{key: (shape, dtype name)} of a token batch: T = max_tokens positions."""
  dims = {"T": (batch_size, max_tokens), "B": (batch_size,)}
  return {k: (dims[k.rsplit("_", 1)[1].split("x")[-1]], "int32") for k in TOKEN_KEYS}
