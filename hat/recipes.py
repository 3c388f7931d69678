"""The paper's training recipe and layouts, shared by the paper-size config files.

Config files stay data: each sets its model's shape and calls these once.
"""

from __future__ import annotations

import ml_collections

from hat.config import default_config_dict

PAPER_WINDOW_BYTES = 16_384  # DCLM documents of at most 16,384 bytes (paper)


def paper_config(kind: str, remat: str) -> ml_collections.ConfigDict:
  """Defaults + the paper's DCLM recipe: batch 1024, 72k steps, bf16, lr 3e-4·32/heads."""
  c = default_config_dict()
  c.model.kind = kind
  c.model.compute_dtype = "bfloat16"
  c.model.remat = remat
  # cuDNN flash attention on GPUs, splash on TPUs, XLA elsewhere (hat.models.layers).
  c.model.attention_impl = "auto"
  c.data.window_bytes = PAPER_WINDOW_BYTES
  c.data.batch_size = 1024
  c.steps = 72_000
  c.optim.lr = 0.0  # paper rule: 3e-4 * 32 / backbone heads
  c.optim.warmup_steps = 500
  c.eval_every = 2000
  c.ckpt_every = 2000
  c.mesh = "data=1,fsdp=-1,tensor=1"
  if kind == "hat":
    # A 16,384-byte DCLM window holds ~2,744 words at 5.97 bytes/word, plus START/END
    # units per document: 2,944 units (~7% headroom). Slots: 16,384 bytes + ~2,750
    # markers ~= 19,140; rows of 128 lose ~3% to row ends (units never straddle rows):
    # 164 x 128 = 20,992 slots (~6% headroom).
    c.data.update(max_units=2944, row_len=128, num_rows=164)
  else:
    # ~3,977 tokens at 4.12 bytes/token, plus BOS per document: 4,224 (~6% headroom).
    c.data.max_tokens = 4224
    c.model.vocab_size = 65536
    c.data.tokenizer = ""  # set --config.data.tokenizer=<64k SentencePiece model>
  return c


def stack(num_layers: int, d_model: int, mlp_dim: int, head_dim: int = 128) -> dict:
  """A multi-head stack shape with `d_model / head_dim` heads."""
  heads = d_model // head_dim
  return dict(num_layers=num_layers, d_model=d_model, num_heads=heads, num_kv_heads=heads,
              head_dim=head_dim, mlp_dim=mlp_dim)
