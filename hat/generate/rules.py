"""Which symbols may be sampled when: the rules every sampler shares, written once.

Byte-hierarchy (word) models spell a word byte by byte and end it with `[W]`:
- `[PAD]` is never sampled;
- `[S]` (end of document) only after a finished word, never inside one;
- `[W]` never ends an empty word (it would loop forever);
- a word of `max_word_bytes` bytes must end: the splitter cuts words there.

Token and byte-stream models: `[PAD]`, a BOS that is not also EOS, and ids past the
tokenizer's vocabulary are never sampled;
in a byte stream `[W]` (which such models never see) is not sampled either.

Each rule takes an array module (`numpy` for the reference samplers, `jax.numpy` inside
jit), so the cached and the reference samplers apply the very same code.
"""

from __future__ import annotations

from typing import Any

from hat.text.codec import BYTE_VOCAB_SIZE, PAD_ID, S_ID, W_ID


def word_banned(nbytes_B: Any, max_word: int, xp: Any, vocab: int = BYTE_VOCAB_SIZE) -> Any:
  """(B, V) bool: symbols a word model may not emit after `nbytes_B` bytes of its word."""
  sym_1xV = xp.arange(vocab)[None]
  n_Bx1 = xp.asarray(nbytes_B)[:, None]
  return ((sym_1xV == PAD_ID)
          | ((sym_1xV == S_ID) & (n_Bx1 > 0))
          | ((sym_1xV == W_ID) & (n_Bx1 == 0))
          | ((sym_1xV < 256) & (n_Bx1 >= max_word)))


def token_banned_ids(tokenizer: Any) -> tuple[int, ...]:
  """Token ids a token or byte-stream model may never emit."""
  ids = {tokenizer.pad_id}
  if tokenizer.bos_id != tokenizer.eos_id:
    ids.add(tokenizer.bos_id)
  if tokenizer.vocab_size == BYTE_VOCAB_SIZE and tokenizer.eos_id == S_ID:
    ids.add(W_ID)  # a byte stream has no word markers
  return tuple(sorted(ids))


def token_banned(tokenizer: Any, vocab: int, xp: Any) -> Any:
  """(1, V) bool mask of `token_banned_ids`, and of ids past the tokenizer's vocabulary.

  A head wider than the tokenizer (a config's padded vocabulary, e.g. 65,536 rows with a
  smaller tokenizer) has rows no text decodes to: they are never sampled.
  """
  sym_1xV = xp.arange(vocab)[None]
  banned = sym_1xV >= tokenizer.vocab_size
  for i in token_banned_ids(tokenizer):
    banned = banned | (sym_1xV == i)
  return banned
