"""BPE 7B baseline (paper Table 2): 32-layer D=4096 backbone, 64k untied vocabulary."""

from hat.config import default_config_dict


def get_config():
  """BPE 7B with the paper's DCLM recipe: the same bytes, batch and schedule as HAT."""
  c = default_config_dict()
  c.model.kind = "bpe"
  # Parameters (hat.params.paper_groups; table: 7.0B):
  #   32 x (attention 4·4096² = 67.1M + SwiGLU 3·4096·11008 = 135.3M + norms) = 6.476B
  #   + embedding 65536·4096 = 268M + head 268M = 7.013B.
  c.model.backbone.update(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=32,
                          head_dim=128, mlp_dim=11008)
  c.model.vocab_size = 65536
  c.data.tokenizer = ""  # set --config.data.tokenizer=<64k SentencePiece model>
  c.model.compute_dtype = "bfloat16"
  c.model.remat = "full"
  # "cudnn" is the fast choice on GPUs ("splash" on TPU); "xla" runs everywhere.
  c.model.attention_impl = "xla"
  # A 16,384-byte window is ~3,977 tokens at 4.12 bytes/token, plus BOS per document:
  # 4,224 tokens (~6% headroom).
  c.data.window_bytes = 16384
  c.data.max_tokens = 4224
  c.data.batch_size = 1024
  c.steps = 72_000
  c.optim.lr = 0.0  # paper rule: 3e-4 * 32 / backbone heads
  c.optim.warmup_steps = 500
  c.eval_every = 2000
  c.ckpt_every = 2000
  c.mesh = "data=1,fsdp=-1,tensor=1"
  return c
