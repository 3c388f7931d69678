"""HAT 3B (paper Table 2): 28-layer D=3584 word backbone, 3-layer d=768 byte stacks."""

from hat.recipes import paper_config, stack


def get_config():
  """HAT 3B with the paper's DCLM recipe: 16,384-byte windows, batch 1024, 72k steps."""
  c = paper_config("hat", remat="full")
  # Parameters (hat.params.paper_groups; table: backbone 4.3B, enc/dec 24M each):
  #   backbone 28 x (attention 4·3584² = 51.4M + SwiGLU 3·3584·9472 = 101.8M + norms)
  #     + final norm = 4.290B (mlp_dim ~ 8/3·D rounded to 128).
  #   encoder 3 x 7.08M = 21.2M + byte table 0.2M + W_E 768·3584 = 2.75M = 24.2M;
  #   decoder the same + byte head 0.2M = 24.4M.
  c.model.backbone.update(**stack(28, 3584, 9472))
  byte_stack = stack(3, 768, 2048)
  c.model.encoder.update(**byte_stack)
  c.model.decoder.update(**byte_stack)
  return c
