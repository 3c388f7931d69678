"""Windows -> static-shape arrays: the HAT packed-row layout and the token layout.

See `hat.data.batch` for what every array means. A window (a list of `Segment`s) becomes
one sequence, or several when it exceeds capacity and `overflow == "carry"`: then the rest
continues in a new sequence that opens with its own START unit / BOS token. Nothing is
truncated, and every target is predicted exactly once.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from hat.cli import UserError
from hat.text.codec import PAD_ID, S_ID, W_ID

_START, _WORD, _END = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Segment:
  """The part of one document that falls in a window, already split into words."""

  words: tuple[bytes, ...]
  ends_doc: bool  # the document ends inside this window (an END unit / EOS follows)


class CapacityError(UserError, ValueError):
  """A window does not fit the layout's capacity and the overflow policy is "error"."""


# ----------------------------------------------------------------------------- HAT


def _units(segments: Sequence[Segment]):
  """Flattens segments into unit arrays: kind, byte length, segment index, byte offset."""
  kinds, lens, segs = [], [], []
  words = []
  for s, seg in enumerate(segments):
    kinds.append(_START), lens.append(0), segs.append(s)
    for w in seg.words:
      kinds.append(_WORD), lens.append(len(w)), segs.append(s)
      words.append(w)
    if seg.ends_doc:
      kinds.append(_END), lens.append(0), segs.append(s)
  lens_a = np.asarray(lens, np.int64)
  offsets = np.concatenate([[0], np.cumsum(lens_a)[:-1]]) if len(lens) else lens_a
  payload = np.frombuffer(b"".join(words), np.uint8).astype(np.int32)
  return np.asarray(kinds, np.int32), lens_a, np.asarray(segs, np.int64), offsets, payload


def _pack_rows(sizes: np.ndarray, row_len: int, num_rows: int):
  """Greedy in-order packing of units into rows; returns (n_placed, row, col)."""
  csum = np.cumsum(sizes)
  n = len(sizes)
  row = np.zeros(n, np.int64)
  col = np.zeros(n, np.int64)
  i, r = 0, 0
  while i < n and r < num_rows:
    base = csum[i - 1] if i else 0
    j = int(np.searchsorted(csum, base + row_len, side="right"))
    if j == i:
      raise CapacityError(f"a unit of {sizes[i]} slots does not fit a row of {row_len}")
    row[i:j] = r
    col[i:j] = csum[i:j] - sizes[i:j] - base
    i, r = j, r + 1
  return i, row[:i], col[:i]


def _hat_arrays(kinds, lens, segs, offsets, payload, row, col, *, max_units, num_rows,
                row_len, carried):
  """Fills one sequence's arrays from its (already packed) units."""
  n, num_slots = len(kinds), num_rows * row_len
  # Segment ids 1-based and consecutive within the sequence.
  seg_ids = np.zeros(max_units, np.int32)
  _, seg_local = np.unique(segs, return_inverse=True)
  seg_ids[:n] = seg_local + 1
  first_of_seg = np.searchsorted(seg_local, seg_local, side="left")
  unit_pos = np.zeros(max_units, np.int32)
  unit_pos[:n] = np.arange(n) - first_of_seg
  unit_slot = np.zeros(max_units, np.int32)
  unit_slot[:n] = row * row_len + col

  sizes = lens + 1
  total = int(sizes.sum())
  owner = np.repeat(np.arange(n), sizes)
  k = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # position in unit
  slot = unit_slot[:n][owner] + k
  kind_s, len_s, off_s = kinds[owner], lens[owner], offsets[owner]

  byte_in = payload[np.clip(off_s + k - 1, 0, max(len(payload) - 1, 0))] if len(payload) \
      else np.zeros(total, np.int32)
  marker = np.where(kind_s == _WORD, W_ID, S_ID)
  ids = np.where(k == 0, marker, byte_in)
  byte_tg = payload[np.clip(off_s + k, 0, max(len(payload) - 1, 0))] if len(payload) \
      else np.zeros(total, np.int32)
  tg = np.where(k < len_s, byte_tg, np.where(kind_s == _WORD, W_ID, S_ID))
  counted = kind_s != _START
  tg = np.where(counted, tg, PAD_ID)

  out = {
      "unit_segment_BxW": seg_ids,
      "unit_pos_BxW": unit_pos,
      "unit_slot_BxW": unit_slot,
      "slot_ids_BxS": np.full(num_slots, PAD_ID, np.int32),
      "slot_unit_BxS": np.full(num_slots, -1, np.int32),
      "slot_pos_BxS": np.zeros(num_slots, np.int32),
      "targets_BxS": np.full(num_slots, PAD_ID, np.int32),
      "target_mask_BxS": np.zeros(num_slots, np.int32),
      "num_bytes_B": np.int32(lens[kinds == _WORD].sum()),
      "num_units_B": np.int32(n),
      "overflow_B": np.int32(carried),
  }
  out["slot_ids_BxS"][slot] = ids
  out["slot_unit_BxS"][slot] = owner
  out["slot_pos_BxS"][slot] = k
  out["targets_BxS"][slot] = tg
  out["target_mask_BxS"][slot] = counted
  return out


def hat_sequences(segments: Sequence[Segment], *, max_units: int, num_rows: int,
                  row_len: int, overflow: str = "carry") -> list[dict[str, np.ndarray]]:
  """One window -> HAT sequences (unbatched arrays); more than one only on carry."""
  kinds, lens, segs, offsets, payload = _units(segments)
  sizes = lens + 1
  out, a, n_units = [], 0, len(kinds)
  while a < n_units:
    carried = bool(out)
    synth = kinds[a] != _START  # a continuation opens with its own START unit
    idx = np.arange(a, min(n_units, a + max_units - int(synth)))
    unit_sizes = sizes[idx]
    if synth:
      unit_sizes = np.concatenate([[1], unit_sizes])
    placed, row, col = _pack_rows(unit_sizes, row_len, num_rows)
    real = placed - int(synth)
    if real <= 0:
      raise CapacityError(f"capacity max_units={max_units}, num_rows={num_rows}, "
                          f"row_len={row_len} cannot hold a START unit and one word")
    take = idx[:real]
    u_kinds, u_lens, u_segs, u_offs = kinds[take], lens[take], segs[take], offsets[take]
    if synth:
      u_kinds = np.concatenate([[_START], u_kinds])
      u_lens = np.concatenate([[0], u_lens])
      u_segs = np.concatenate([[segs[a]], u_segs])
      u_offs = np.concatenate([[0], u_offs])
    out.append(_hat_arrays(u_kinds, u_lens, u_segs, u_offs, payload, row, col,
                           max_units=max_units, num_rows=num_rows, row_len=row_len,
                           carried=carried))
    a += real
    if a < n_units and overflow == "error":
      raise CapacityError(
          f"window of {int(lens.sum())} bytes needs {n_units} units / {int(sizes.sum())} "
          f"slots, more than data.max_units={max_units} or data.num_rows*data.row_len="
          f"{num_rows * row_len}; raise them or set data.overflow='carry'")
  return out


# ---------------------------------------------------------------------------- tokens


def token_sequences(segments: Sequence[Segment], tokenizer, *, max_tokens: int,
                    overflow: str = "carry") -> list[dict[str, np.ndarray]]:
  """One window -> token sequences (BOS t_1..t_m per segment, EOS target at doc end)."""
  inputs, targets, mask, seg, pos, tok_bytes = [], [], [], [], [], []
  for s, sgm in enumerate(segments):
    data = b"".join(sgm.words)
    ids = list(tokenizer.encode(data))
    nbytes = _token_byte_lengths(tokenizer, ids, len(data))
    inputs += [tokenizer.bos_id] + ids
    targets += ids + [tokenizer.eos_id if sgm.ends_doc else tokenizer.pad_id]
    mask += [1] * len(ids) + [1 if sgm.ends_doc else 0]
    seg += [s] * (len(ids) + 1)
    pos += list(range(len(ids) + 1))
    tok_bytes += nbytes + [0]  # bytes of the *target* at each position
  inputs_a, targets_a = np.asarray(inputs, np.int32), np.asarray(targets, np.int32)
  mask_a, seg_a = np.asarray(mask, np.int32), np.asarray(seg, np.int64)
  pos_a, bytes_a = np.asarray(pos, np.int32), np.asarray(tok_bytes, np.int64)

  out, a, n = [], 0, len(inputs_a)
  while a < n:
    carried = bool(out)
    synth = pos_a[a] != 0  # continuation: prepend BOS whose target was already counted
    room = max_tokens - int(synth)
    take = slice(a, min(n, a + room))
    t_in, t_tg = inputs_a[take], targets_a[take]
    t_mask, t_seg, t_pos, t_b = mask_a[take], seg_a[take], pos_a[take], bytes_a[take]
    if synth:
      t_in = np.concatenate([[tokenizer.bos_id], t_in])
      t_tg = np.concatenate([[inputs_a[a]], t_tg])
      t_mask = np.concatenate([[0], t_mask])
      # Positions of the continued segment restart after the new BOS.
      t_pos = np.concatenate([[0], np.where(t_seg == seg_a[a], t_pos - pos_a[a] + 1, t_pos)])
      t_seg = np.concatenate([[seg_a[a]], t_seg])
      t_b = np.concatenate([[0], t_b])
    m = len(t_in)
    _, seg_local = np.unique(t_seg, return_inverse=True)
    row = {
        "tokens_BxT": np.full(max_tokens, tokenizer.pad_id, np.int32),
        "targets_BxT": np.full(max_tokens, tokenizer.pad_id, np.int32),
        "target_mask_BxT": np.zeros(max_tokens, np.int32),
        "segment_BxT": np.zeros(max_tokens, np.int32),
        "pos_BxT": np.zeros(max_tokens, np.int32),
        "num_bytes_B": np.int32((t_b * t_mask).sum()),
        "overflow_B": np.int32(carried),
    }
    row["tokens_BxT"][:m] = t_in
    row["targets_BxT"][:m] = t_tg
    row["target_mask_BxT"][:m] = t_mask
    row["segment_BxT"][:m] = seg_local + 1
    row["pos_BxT"][:m] = t_pos
    out.append(row)
    a = take.stop
    if a < n and overflow == "error":
      raise CapacityError(f"window needs {n} tokens, more than data.max_tokens={max_tokens};"
                          " raise it or set data.overflow='carry'")
  return out


def _token_byte_lengths(tokenizer, ids: list[int], total: int) -> list[int]:
  """Bytes each token spells, summing to `total` (needed to split bpb across a carry)."""
  if hasattr(tokenizer, "token_byte_lengths"):
    lengths = list(tokenizer.token_byte_lengths(ids))
  else:
    lengths = [len(tokenizer.decode([i])) for i in ids]
  if sum(lengths) != total:
    raise ValueError(f"tokenizer pieces spell {sum(lengths)} bytes, the text has {total}")
  return lengths


# ----------------------------------------------------------------------------- glue


def stack(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks unbatched sequences into a batch dict (leading axis B)."""
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _doc_segments(doc: bytes, splitter) -> list[Segment]:
  return [Segment(tuple(splitter.split(doc)), True)]


def hat_batch_from_texts(docs: Sequence[bytes], *, splitter="whitespace", max_word_bytes=31,
                         max_units=64, num_rows=4, row_len=32,
                         overflow="carry") -> dict[str, np.ndarray]:
  """Tests and tools: each document becomes one window (more sequences on carry)."""
  from hat.text.splitter import Splitter  # local: keeps layout importable on its own

  sp = Splitter(splitter, max_word_bytes) if isinstance(splitter, str) else splitter
  rows = []
  for doc in docs:
    rows += hat_sequences(_doc_segments(doc, sp), max_units=max_units, num_rows=num_rows,
                          row_len=row_len, overflow=overflow)
  return stack(rows)


def token_batch_from_texts(docs: Sequence[bytes], tokenizer, *, max_tokens=64,
                           overflow="carry") -> dict[str, np.ndarray]:
  """Tests and tools: each document becomes one window of the token layout."""
  rows = []
  for doc in docs:
    rows += token_sequences([Segment((doc,), True)], tokenizer, max_tokens=max_tokens,
                            overflow=overflow)
  return stack(rows)
