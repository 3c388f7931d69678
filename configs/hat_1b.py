"""HAT 1B (paper Table 2): 18-layer D=2304 word backbone, 3-layer d=768 byte stacks."""

from hat.recipes import paper_config, stack


def get_config():
  """HAT 1B with the paper's DCLM recipe: 16,384-byte windows, batch 1024, 72k steps."""
  c = paper_config("hat", remat="dots")
  # Parameters (hat.params.paper_groups; table: backbone 1.1B, enc/dec 23M each):
  #   backbone 18 x (attention 4·2304² = 21.2M + SwiGLU 3·2304·5760 = 39.8M + norms)
  #     + final norm = 1.099B. mlp_dim = 2.5·D: the usual 8/3·D (6144) would give 1.147B.
  #   encoder 3 x (4·768² + 3·768·2048 = 7.08M) = 21.2M + byte table 259·768 = 0.2M
  #     + W_E 768·2304 = 1.77M = 23.2M; decoder the same + byte head 0.2M = 23.4M.
  c.model.backbone.update(**stack(18, 2304, 5760))
  byte_stack = stack(3, 768, 2048)
  c.model.encoder.update(**byte_stack)
  c.model.decoder.update(**byte_stack)
  return c
