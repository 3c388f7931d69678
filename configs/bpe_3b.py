"""BPE 3B baseline (paper Table 2): 24-layer D=3072 backbone, 64k untied vocabulary."""

from hat.recipes import paper_config, stack


def get_config():
  """BPE 3B with the paper's DCLM recipe: the same bytes, batch and schedule as HAT."""
  c = paper_config("bpe", remat="full")
  # Parameters (hat.params.paper_groups; table: 3.1B):
  #   24 x (attention 4·3072² = 37.7M + SwiGLU 3·3072·8192 = 75.5M + norms) = 2.718B
  #   + embedding 65536·3072 = 201M + head 201M = 3.121B.
  c.model.backbone.update(**stack(24, 3072, 8192))
  return c
