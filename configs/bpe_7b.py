"""BPE 7B baseline (paper Table 2): 32-layer D=4096 backbone, 64k untied vocabulary."""

from hat.recipes import paper_config, stack


def get_config():
  """BPE 7B with the paper's DCLM recipe: the same bytes, batch and schedule as HAT."""
  c = paper_config("bpe", remat="full")
  # Parameters (hat.params.paper_groups; table: 7.0B):
  #   32 x (attention 4·4096² = 67.1M + SwiGLU 3·4096·11008 = 135.3M + norms) = 6.476B
  #   + embedding 65536·4096 = 268M + head 268M = 7.013B.
  c.model.backbone.update(**stack(32, 4096, 11008))
  return c
