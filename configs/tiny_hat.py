"""Tiny HAT for CPU demos and tests: 2-layer backbone over words, 1-layer byte stacks."""

from hat.config import default_config_dict


def get_config():
  """Tiny HAT: ~0.57M parameters, 512-byte windows, batch 8; sized for CPU runs."""
  c = default_config_dict()
  c.model.kind = "hat"
  c.model.backbone.update(num_layers=2, d_model=128, num_heads=4, num_kv_heads=4,
                          head_dim=32, mlp_dim=352)
  byte_stack = dict(num_layers=1, d_model=64, num_heads=2, num_kv_heads=2, head_dim=32,
                    mlp_dim=176)
  c.model.encoder.update(**byte_stack)
  c.model.decoder.update(**byte_stack)
  # 512 bytes of English at ~5-5.7 bytes/word is 90-100 words; short documents (one per
  # paragraph) add a START and END unit each: 128 units (the English corpus needs 112 at
  # the 99th percentile). Slots: 512 bytes + one marker per unit, plus row-end waste
  # (units never straddle rows) -> 11 rows x 64: 86% of slots hold a real symbol on the
  # English corpus, and no window of 1,600 overflowed (overflow carries, never truncates).
  c.data.window_bytes = 512
  c.data.max_units = 128
  c.data.row_len = 64
  c.data.num_rows = 11
  c.data.batch_size = 8
  c.steps = 1000
  c.optim.warmup_steps = 100
  c.eval_every = 250
  return c
