"""Information flow: no logit sees the symbol it predicts, a later word, or another document.

Each test puts the original and all its edited variants in one batch (one forward pass),
then compares every variant's logits with the original's where they must be equal.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import forward, rngs, tiny_model_config
from hat.data.layout import Segment, hat_sequences, stack, token_sequences
from hat.models import build_model, model_vocab_size
from hat.text.tokenizers import ByteTokenizer

ROW_LEN = 16
WORDS = (b"ab ", b"cde ", b"fg ", b"hij")
OTHER_DOC = (b"xy ", b"zw.")


def _swap(byte: int) -> int:
  return ord("q") if byte != ord("q") else ord("r")


def _hat(rows):
  model = build_model(tiny_model_config("hat", scan_layers=True), vocab_size=259, rngs=rngs(1),
                      row_len=ROW_LEN)
  batch = {k: jnp.asarray(v) for k, v in stack(rows).items()}
  return np.asarray(forward(model, batch)), {k: np.asarray(v) for k, v in batch.items()}


def _hat_rows(*segments):
  rows = hat_sequences(list(segments), max_units=12, num_rows=4, row_len=ROW_LEN,
                       overflow="error")
  assert len(rows) == 1
  return rows[0]


def _by_unit(logits_SxV, batch, b, segment):
  """{(unit position in segment, slot position): logits} for one segment of row b."""
  out = {}
  for s in np.nonzero(batch["slot_unit_BxS"][b] >= 0)[0]:
    u = batch["slot_unit_BxS"][b, s]
    if batch["unit_segment_BxW"][b, u] == segment:
      out[(int(batch["unit_pos_BxW"][b, u]), int(batch["slot_pos_BxS"][b, s]))] = logits_SxV[s]
  return out


def _assert_same(a, b, keys=None):
  keys = a.keys() if keys is None else keys
  for key in keys:
    np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=str(key))


def test_hat_logits_never_see_the_predicted_byte_or_later_words():
  variants = [(None, None)]
  for i, word in enumerate(WORDS):
    for k, byte in enumerate(word):
      if byte != ord(" "):  # whitespace would change the split
        variants.append((i, k))
  rows = []
  for i, k in variants:
    words = list(WORDS)
    if i is not None:
      w = bytearray(words[i])
      w[k] = _swap(w[k])
      words[i] = bytes(w)
    rows.append(_hat_rows(Segment(tuple(words), True)))
  logits, batch = _hat(rows)
  base = _by_unit(logits[0], batch, 0, 1)
  for b, (i, k) in enumerate(variants[1:], start=1):
    got = _by_unit(logits[b], batch, b, 1)
    unit, slot = i + 1, k + 1  # START is unit 0; byte k of a word sits at slot position k+1
    # Everything predicting a symbol before the edited byte is unchanged ...
    _assert_same(base, got, [key for key in base if key < (unit, slot)])
    # ... and the edit is visible to everything after it (the test is not vacuous).
    later = [key for key in base if key >= (unit, slot)]
    assert all(not np.allclose(base[key], got[key], atol=1e-5) for key in later), (i, k)


def test_hat_packed_documents_do_not_leak():
  edited = tuple(w.replace(b"y", b"k").replace(b"w", b"ooo") for w in OTHER_DOC)
  rows = [_hat_rows(Segment(WORDS, True), Segment(OTHER_DOC, True)),
          _hat_rows(Segment(WORDS, True), Segment(edited, True)),
          _hat_rows(Segment((b"abc ", b"d "), True), Segment(OTHER_DOC, True)),
          _hat_rows(Segment(OTHER_DOC, True))]
  logits, batch = _hat(rows)
  doc1 = _by_unit(logits[0], batch, 0, 1)
  doc2 = _by_unit(logits[0], batch, 0, 2)
  _assert_same(doc1, _by_unit(logits[1], batch, 1, 1))  # later document edited
  _assert_same(doc2, _by_unit(logits[2], batch, 2, 2))  # earlier document edited
  _assert_same(doc2, _by_unit(logits[3], batch, 3, 1))  # packed == alone


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_token_lm_logits_never_see_the_predicted_token(kind):
  tok = ByteTokenizer()
  text = b"abc de"
  cfg = tiny_model_config(kind, vocab_size=259 if kind == "bpe" else 0)
  model = build_model(cfg, vocab_size=model_vocab_size(cfg, tok), rngs=rngs(2))
  docs = [text] + [text[:j] + bytes([_swap(text[j])]) + text[j + 1:] for j in range(len(text))]
  rows = [token_sequences([Segment((d,), True)], tok, max_tokens=12)[0] for d in docs]
  batch = {k: jnp.asarray(v) for k, v in stack(rows).items()}
  logits = np.asarray(forward(model, batch))
  for j in range(len(text)):
    edited_input = j + 1  # position 0 holds BOS
    np.testing.assert_allclose(logits[j + 1, :edited_input], logits[0, :edited_input],
                               atol=1e-5)
    assert not np.allclose(logits[j + 1, edited_input], logits[0, edited_input], atol=1e-5)


def test_token_lm_packed_documents_do_not_leak():
  tok = ByteTokenizer()
  model = build_model(tiny_model_config("byte"), vocab_size=259, rngs=rngs(3))
  a, b, b_edit = b"abc d", b"xyz", b"qrs"

  def row(*docs):
    return token_sequences([Segment((d,), True) for d in docs], tok, max_tokens=16)[0]

  batch = {k: jnp.asarray(v) for k, v in stack([row(a, b), row(a, b_edit), row(b_edit, b),
                                                 row(b)]).items()}
  logits = np.asarray(forward(model, batch))
  n_a = len(a) + 1  # BOS + bytes
  np.testing.assert_allclose(logits[1, :n_a], logits[0, :n_a], atol=1e-5)
  np.testing.assert_allclose(logits[2, len(b_edit) + 1:len(b_edit) + len(b) + 2],
                             logits[0, n_a:n_a + len(b) + 1], atol=1e-5)
  np.testing.assert_allclose(logits[3, :len(b) + 1], logits[0, n_a:n_a + len(b) + 1],
                             atol=1e-5)
