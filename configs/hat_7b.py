"""HAT 7B (paper Table 2): 36-layer D=4608 word backbone, 4-layer d=1024 byte stacks."""

from hat.config import default_config_dict


def get_config():
  """HAT 7B with the paper's DCLM recipe: 16,384-byte windows, batch 1024, 72k steps."""
  c = default_config_dict()
  c.model.kind = "hat"
  # Parameters (hat.params.paper_groups; table: backbone 9.2B, enc/dec 55M each):
  #   backbone 36 x (attention 4·4608² = 84.9M + SwiGLU 3·4608·12288 = 169.9M + norms)
  #     + final norm = 9.173B (mlp_dim = 8/3·D).
  #   encoder 4 x (4·1024² + 3·1024·2688 = 12.45M) = 49.8M + byte table 259·1024 = 0.27M
  #     + W_E 1024·4608 = 4.72M = 54.8M; decoder the same + byte head 0.27M = 55.1M.
  c.model.backbone.update(num_layers=36, d_model=4608, num_heads=36, num_kv_heads=36,
                          head_dim=128, mlp_dim=12288)
  byte_stack = dict(num_layers=4, d_model=1024, num_heads=8, num_kv_heads=8,
                    head_dim=128, mlp_dim=2688)
  c.model.encoder.update(**byte_stack)
  c.model.decoder.update(**byte_stack)
  c.model.compute_dtype = "bfloat16"
  c.model.remat = "full"
  # "cudnn" is the fast choice on GPUs ("splash" on TPU); "xla" runs everywhere.
  c.model.attention_impl = "xla"
  # A 16,384-byte DCLM window holds ~2,744 words at 5.97 bytes/word, plus START/END
  # units per document: 2,944 units (~7% headroom). Slots: 16,384 bytes + ~2,750
  # markers ~= 19,140, rows of 128 lose ~3% to row ends (units never straddle rows):
  # 164 x 128 = 20,992 slots (~6% headroom).
  c.data.window_bytes = 16384
  c.data.max_units = 2944
  c.data.row_len = 128
  c.data.num_rows = 164
  c.data.batch_size = 1024
  c.steps = 72_000
  c.optim.lr = 0.0  # paper rule: 3e-4 * 32 / backbone heads
  c.optim.warmup_steps = 500
  c.eval_every = 2000
  c.ckpt_every = 2000
  c.mesh = "data=1,fsdp=-1,tensor=1"
  return c
