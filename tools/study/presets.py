"""Study presets: model sizes, training budgets, sweeps and evaluation sizes.

A preset is data. `cpu` is sized to about 75 minutes on a 2-core CPU, `quick` to a few
minutes (a smoke test of every stage), `gpu` to about eight minutes on one H100/H200
(bf16, the fast attention path, the shared corpora for one to two epochs).
"""

from __future__ import annotations

import dataclasses

# HAT knobs given one try at the smallest budget (each alone, at the best learning rate).
# Byte stacks of the tiny configs: 1 layer x 64 wide, 2 heads of 32, SwiGLU 176.
KNOBS = {
    "decoder_depth_2": {"model.decoder.num_layers": 2},
    "encoder_depth_2": {"model.encoder.num_layers": 2},
    "byte_width_96": {f"model.{s}.{k}": v for s in ("encoder", "decoder")
                      for k, v in (("d_model", 96), ("num_heads", 3), ("num_kv_heads", 3),
                                   ("mlp_dim", 256))},
    # The unicode rule gives ~4.9 bytes/word on English against ~5.7: more units per
    # window, so more unit and slot headroom (overflow would carry, never truncate).
    "unicode_splitter": {"data.splitter": "unicode", "data.max_units": 144,
                         "data.num_rows": 12},
}


@dataclasses.dataclass(frozen=True)
class Preset:
  """How big and how long every stage of the study is."""

  name: str
  budgets: tuple[int, ...]  # pretraining steps per ladder rung (same batch: FLOPs ~ steps)
  lrs: tuple[float, ...]  # swept at budgets[0] for each family
  vocabs: tuple[int, ...]  # BPE vocabularies; vocabs[0] is swept and compute-matched
  knobs: tuple[str, ...]  # HAT knobs (KNOBS) tried at budgets[0]
  cpt_steps: int  # continued pretraining on German from the ladder top
  replay: float  # English share during continued pretraining
  rob_examples: int
  rob_seeds: int
  final_eval_batches: int | None  # per set; None = the whole validation split
  curve_batches: int  # in-training eval batches (curves, matched-quality checkpoint)
  curve_points: int  # in-training evals per run
  bpe_checkpoints: int  # checkpoints kept along the top BPE run
  decompose_bytes: int  # validation bytes scored by the loss decomposition
  rob_rates: str  # perturbation rates of the robustness suite
  tokenizer_bytes: int  # English bytes the BPE tokenizers are trained on
  common: dict = dataclasses.field(default_factory=dict)  # overrides for both families
  bpe: dict = dataclasses.field(default_factory=dict)  # BPE backbone (and head) overrides
  hat: dict = dataclasses.field(default_factory=dict)  # HAT byte-stack overrides
  match_layers: tuple[int, int] = (2, 7)  # HAT backbone depths tried by compute matching
  match_head_dim: int = 32
  match_aspect: float = 64.0


_TINY = {"data.window_bytes": 512, "data.batch_size": 8}

PRESETS = {
    "cpu": Preset(
        name="cpu", budgets=(200, 400, 800), lrs=(1e-3, 2e-3, 4e-3), vocabs=(4096, 1024),
        knobs=tuple(KNOBS), cpt_steps=300, replay=0.1, rob_examples=150, rob_seeds=2,
        rob_rates="0,0.1",
        final_eval_batches=64, curve_batches=8, curve_points=5, bpe_checkpoints=8,
        decompose_bytes=200_000, tokenizer_bytes=20_000_000, common=_TINY),
    "quick": Preset(
        name="quick", budgets=(20, 40, 80), lrs=(4e-3,), vocabs=(1024, 512),
        knobs=("decoder_depth_2",), cpt_steps=20, replay=0.1, rob_examples=16, rob_seeds=2,
        rob_rates="0,0.1",
        final_eval_batches=4, curve_batches=2, curve_points=2, bpe_checkpoints=4,
        decompose_bytes=8_000, tokenizer_bytes=2_000_000, common=_TINY),
    # One H100/H200: the ladder top only (one budget, the paper's lr rule), bf16 and
    # cuDNN attention, 8 grain workers to feed it; 1,000 steps of 64 x 1,024 bytes are
    # ~1.8 epochs of the 36 MB English corpus.
    "gpu": Preset(
        name="gpu", budgets=(1000,), lrs=(0.0,), vocabs=(8192,), knobs=(), cpt_steps=300,
        replay=0.1, rob_examples=500, rob_seeds=3, rob_rates="0,0.05,0.1,0.2",
        final_eval_batches=None,
        curve_batches=8, curve_points=5, bpe_checkpoints=10, decompose_bytes=400_000,
        tokenizer_bytes=20_000_000,
        common={"data.window_bytes": 1024, "data.batch_size": 64, "data.num_workers": 8,
                "model.compute_dtype": "bfloat16", "model.attention_impl": "auto"},
        bpe={"model.backbone.num_layers": 8, "model.backbone.d_model": 512,
             "model.backbone.num_heads": 8, "model.backbone.num_kv_heads": 8,
             "model.backbone.head_dim": 64, "model.backbone.mlp_dim": 1408},
        hat={"data.max_units": 256, "data.num_rows": 22,  # tiny_hat's layout x2
             **{f"model.{s}.{k}": v for s in ("encoder", "decoder")
                for k, v in (("num_layers", 2), ("d_model", 256), ("num_heads", 4),
                             ("num_kv_heads", 4), ("head_dim", 64), ("mlp_dim", 704))}},
        match_layers=(4, 13), match_head_dim=64, match_aspect=64.0),
}
