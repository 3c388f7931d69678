"""BPE 1B baseline (paper Table 2): 16-layer D=2048 backbone, 64k untied vocabulary."""

from hat.recipes import paper_config, stack


def get_config():
  """BPE 1B with the paper's DCLM recipe: the same bytes, batch and schedule as HAT."""
  c = paper_config("bpe", remat="dots")
  # Parameters (hat.params.paper_groups; table: 1.1B):
  #   16 x (attention 4·2048² = 16.8M + SwiGLU 3·2048·5632 = 34.6M + norms) = 822M
  #   + embedding 65536·2048 = 134M + head 134M = 1.091B.
  c.model.backbone.update(**stack(16, 2048, 5632))
  return c
