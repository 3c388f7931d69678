"""Tiny flat byte-level LM on the same backbone as tiny_hat: the cheap third baseline."""

from hat.config import default_config_dict


def get_config():
  """Tiny byte LM: one position per byte (plus BOS per segment), 512-byte windows."""
  c = default_config_dict()
  c.model.kind = "byte"
  c.model.backbone.update(num_layers=2, d_model=128, num_heads=4, num_kv_heads=4,
                          head_dim=32, mlp_dim=352)
  c.data.window_bytes = 512
  c.data.max_tokens = 544  # 512 bytes + BOS of up to 32 segments
  c.data.batch_size = 8
  c.steps = 1000
  c.optim.warmup_steps = 100
  c.eval_every = 250
  return c
