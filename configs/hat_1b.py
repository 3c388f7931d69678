"""HAT 1B (paper Table 2): 18-layer D=2304 word backbone, 3-layer d=768 byte stacks."""

from hat.config import default_config_dict


def get_config():
  """HAT 1B with the paper's DCLM recipe: 16,384-byte windows, batch 1024, 72k steps."""
  c = default_config_dict()
  c.model.kind = "hat"
  # Parameters (hat.params.paper_groups; table: backbone 1.1B, enc/dec 23M each):
  #   backbone 18 x (attention 4·2304² = 21.2M + SwiGLU 3·2304·5760 = 39.8M + norms)
  #     + final norm = 1.099B. mlp_dim = 2.5·D: the usual 8/3·D (6144) would give 1.147B.
  #   encoder 3 x (4·768² + 3·768·2048 = 7.08M) = 21.2M + byte table 259·768 = 0.2M
  #     + W_E 768·2304 = 1.77M = 23.2M; decoder the same + byte head 0.2M = 23.4M.
  c.model.backbone.update(num_layers=18, d_model=2304, num_heads=18, num_kv_heads=18,
                          head_dim=128, mlp_dim=5760)
  byte_stack = dict(num_layers=3, d_model=768, num_heads=6, num_kv_heads=6,
                    head_dim=128, mlp_dim=2048)
  c.model.encoder.update(**byte_stack)
  c.model.decoder.update(**byte_stack)
  c.model.compute_dtype = "bfloat16"
  c.model.remat = "dots"
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
