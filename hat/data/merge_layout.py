"""Byte-stream layout for the merge-gated HAT (no splitter, learned chunks).

The merge-gated model reads the packed byte stream itself, so its batches are the token
layout of `hat.data.batch` with the byte tokenizer: per segment `[S] b_1 … b_n`, targets
shifted left, `[S]` as the end-of-document target where the segment ends its document.
The keys are `TOKEN_KEYS` (`tokens_BxT`, `targets_BxT`, `target_mask_BxT`,
`segment_BxT`, `pos_BxT`, `num_bytes_B`, `overflow_B`), T = `data.max_tokens`.

Windows are made exactly as for HAT and BPE (cut at the splitter's word boundaries, so
all models see the identical bytes per sequence); the splitter plays no other role.
Overflow follows `data.overflow` like the token layout: "carry" continues the rest in
the next sequence (a new segment opening with `[S]`), "error" raises. The model's own
static capacity (chunks per sequence, `model.gate.merge.capacity`) has a separate, counted
overflow policy: see `hat.models.merge_hat`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hat.data.layout import Segment, stack, token_sequences
from hat.text.tokenizers import ByteTokenizer


def merge_batch_from_texts(docs: Sequence[bytes], *, max_tokens: int = 128,
                           overflow: str = "carry") -> dict[str, np.ndarray]:
  """Tests and tools: each document becomes one window of the byte-stream layout."""
  tok, rows = ByteTokenizer(), []
  for doc in docs:
    rows += token_sequences([Segment((doc,), True)], tok, max_tokens=max_tokens,
                            overflow=overflow)
  return stack(rows)
