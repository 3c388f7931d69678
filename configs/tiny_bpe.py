"""Tiny BPE baseline on the same backbone as tiny_hat (token embedding + untied head)."""

from hat.config import default_config_dict


def get_config():
  """Tiny BPE LM: 512-byte windows, vocabulary taken from the SentencePiece model."""
  c = default_config_dict()
  c.model.kind = "bpe"
  c.model.backbone.update(num_layers=2, d_model=128, num_heads=4, num_kv_heads=4,
                          head_dim=32, mlp_dim=352)
  c.model.vocab_size = 0  # from the tokenizer
  # Made by tools/train_tokenizer.py; override with --config.data.tokenizer=<path>.
  c.data.tokenizer = "runs/tokenizer/tiny_bpe.model"
  # 512 bytes at ~4 bytes/token is ~128 tokens, plus one BOS per segment.
  c.data.window_bytes = 512
  c.data.max_tokens = 160
  c.data.batch_size = 8
  c.steps = 1000
  c.optim.warmup_steps = 100
  c.eval_every = 250
  return c
