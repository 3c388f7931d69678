"""HAT 7B (paper Table 2): 36-layer D=4608 word backbone, 4-layer d=1024 byte stacks."""

from hat.recipes import paper_config, stack


def get_config():
  """HAT 7B with the paper's DCLM recipe: 16,384-byte windows, batch 1024, 72k steps."""
  c = paper_config("hat", remat="full")
  # Parameters (hat.params.paper_groups; table: backbone 9.2B, enc/dec 55M each):
  #   backbone 36 x (attention 4·4608² = 84.9M + SwiGLU 3·4608·12288 = 169.9M + norms)
  #     + final norm = 9.173B (mlp_dim = 8/3·D).
  #   encoder 4 x (4·1024² + 3·1024·2688 = 12.45M) = 49.8M + byte table 259·1024 = 0.27M
  #     + W_E 1024·4608 = 4.72M = 54.8M; decoder the same + byte head 0.27M = 55.1M.
  c.model.backbone.update(**stack(36, 4608, 12288))
  byte_stack = stack(4, 1024, 2688)
  c.model.encoder.update(**byte_stack)
  c.model.decoder.update(**byte_stack)
  return c
