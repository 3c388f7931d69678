"""The HAT packed-row layout and the token layout: exact bytes, targets, capacity, carry."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hat.data import layout
from hat.data.layout import CapacityError, Segment
from hat.text.codec import PAD_ID, S_ID, W_ID


class _WS:
  """Minimal whitespace splitter so these tests do not depend on the text layer."""

  def __init__(self, max_word_bytes=31):
    self.m = max_word_bytes

  def split(self, data):
    out = []
    for w in re.findall(rb"[^ \t\n\r\x0b\x0c]*[ \t\n\r\x0b\x0c]*", data):
      out += [w[i:i + self.m] for i in range(0, len(w), self.m)]
    return [w for w in out if w]


class _Bytes:
  bos_id = eos_id = S_ID
  pad_id = PAD_ID

  def encode(self, data):
    return list(data)

  def decode(self, ids):
    return bytes(i for i in ids if i < 256)


def _decoded_units(seq):
  """Per decoded unit: (input bytes after the marker, target symbols), in unit order."""
  units = {}
  for s in np.argsort(seq["slot_unit_BxS"] * 10_000 + seq["slot_pos_BxS"], kind="stable"):
    u = seq["slot_unit_BxS"][s]
    if u < 0:
      continue
    ins, tgs = units.setdefault(int(u), ([], []))
    if seq["slot_pos_BxS"][s] > 0:
      ins.append(int(seq["slot_ids_BxS"][s]))
    if seq["target_mask_BxS"][s]:
      tgs.append(int(seq["targets_BxS"][s]))
  return [units[u] for u in sorted(units)]


def _hat(segs, **kw):
  kw = {"max_units": 16, "num_rows": 4, "row_len": 16, **kw}
  return layout.hat_sequences(segs, **kw)


def test_hat_units_targets_and_markers():
  seqs = _hat([Segment((b"Hello ", b"world"), True)])
  assert len(seqs) == 1
  seq = seqs[0]
  units = _decoded_units(seq)
  # START (no bytes, no target), two words, END.
  assert units[0] == ([], [])
  assert units[1] == (list(b"Hello "), list(b"Hello ") + [W_ID])
  assert units[2] == (list(b"world"), list(b"world") + [W_ID])
  assert units[3] == ([], [S_ID])
  slots = seq["unit_slot_BxW"][:4]
  assert list(seq["slot_ids_BxS"][slots]) == [S_ID, W_ID, W_ID, S_ID]
  assert seq["num_bytes_B"] == 11 and seq["num_units_B"] == 4
  assert list(seq["unit_pos_BxW"][:4]) == [0, 1, 2, 3]
  assert list(seq["unit_segment_BxW"][:5]) == [1, 1, 1, 1, 0]


def test_units_never_straddle_rows():
  words = tuple(b"w" * n + b" " for n in (3, 7, 2, 9, 1, 5, 6))
  seq = _hat([Segment(words, False)], row_len=12, num_rows=8)[0]
  for u in range(seq["num_units_B"]):
    rows = {int(s) // 12 for s in np.nonzero(seq["slot_unit_BxS"] == u)[0]}
    assert len(rows) == 1


def test_segments_restart_positions_and_no_end_without_doc_end():
  seq = _hat([Segment((b"a ", b"b"), True), Segment((b"c ", b"d "), False)])[0]
  n = seq["num_units_B"]
  assert list(seq["unit_segment_BxW"][:n]) == [1, 1, 1, 1, 2, 2, 2]
  assert list(seq["unit_pos_BxW"][:n]) == [0, 1, 2, 3, 0, 1, 2]
  targets = [t for _, t in _decoded_units(seq)]
  assert targets.count([S_ID]) == 1  # only the first segment ends its document


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=80), min_size=1, max_size=4),
       st.integers(2, 6), st.integers(1, 3))
def test_hat_carry_keeps_every_byte_and_target_once(docs, max_units, num_rows):
  sp = _WS(max_word_bytes=7)
  segs = [Segment(tuple(sp.split(d)), True) for d in docs]
  seqs = _hat(segs, max_units=max_units, num_rows=num_rows, row_len=9)
  got_bytes, got_targets = b"", 0
  for seq in seqs:
    for ins, tgs in _decoded_units(seq):
      got_bytes += bytes(ins)
      got_targets += len(tgs)
    assert seq["num_bytes_B"] == sum(seq["slot_pos_BxS"] > 0)
  assert got_bytes == b"".join(docs)
  # Each word is predicted as its bytes + [W]; each document end as [S].
  n_words = sum(len(s.words) for s in segs)
  assert got_targets == len(b"".join(docs)) + n_words + len(docs)
  assert [int(s["overflow_B"]) for s in seqs] == [0] + [1] * (len(seqs) - 1)


def test_hat_overflow_error_names_the_keys():
  words = tuple(b"ab " for _ in range(40))
  with pytest.raises(CapacityError, match="data.max_units"):
    _hat([Segment(words, True)], overflow="error")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=50), min_size=1, max_size=4),
       st.integers(2, 20))
def test_token_carry_predicts_each_target_once(docs, max_tokens):
  tok = _Bytes()
  segs = [Segment((d,), True) for d in docs]
  seqs = layout.token_sequences(segs, tok, max_tokens=max_tokens)
  predicted = []
  for seq in seqs:
    m = seq["target_mask_BxT"].astype(bool)
    predicted += list(seq["targets_BxT"][m])
  expected = []
  for d in docs:
    expected += list(d) + [S_ID]
  assert predicted == expected
  assert sum(int(s["num_bytes_B"]) for s in seqs) == sum(map(len, docs))


def test_token_positions_and_segments():
  tok = _Bytes()
  seq = layout.token_sequences([Segment((b"ab",), True), Segment((b"cde",), False)], tok,
                               max_tokens=10)[0]
  assert list(seq["tokens_BxT"][:7]) == [S_ID, 97, 98, S_ID, 99, 100, 101]
  assert list(seq["targets_BxT"][:7]) == [97, 98, S_ID, 99, 100, 101, PAD_ID]
  assert list(seq["target_mask_BxT"][:7]) == [1, 1, 1, 1, 1, 1, 0]
  assert list(seq["pos_BxT"][:7]) == [0, 1, 2, 0, 1, 2, 3]
  assert list(seq["segment_BxT"][:8]) == [1, 1, 1, 2, 2, 2, 2, 0]


def test_more_capacity_changes_only_padding():
  segs = [Segment((b"one ", b"two ", b"three"), True)]
  a = _hat(segs, max_units=8, num_rows=2, row_len=16)[0]
  b = _hat(segs, max_units=12, num_rows=3, row_len=16)[0]
  assert _decoded_units(a) == _decoded_units(b)
  assert a["num_bytes_B"] == b["num_bytes_B"]
