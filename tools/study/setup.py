"""The study's fixed ingredients: tokenizers, corpus statistics, the two families' configs.

Both families read the identical byte windows (same window size, batch, seed and steps),
so every budget feeds them the same bytes; the HAT backbone is sized to the BPE model's
training FLOPs per byte (`hat.flops.match_hat_to_bpe`) at the corpus's measured bytes per
word and bytes per token.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from hat import config as config_lib
from hat import flops

from study import analysis
from study.presets import KNOBS, Preset
from study.runner import ROOT, Runner, overrides

HAT_CONFIG, BPE_CONFIG = "configs/tiny_hat.py", "configs/tiny_bpe.py"


def corpus_sample(path: str, max_bytes: int = 2_000_000) -> bytes:
  """Up to `max_bytes` of a text file or directory (a slice of each file, sorted)."""
  p = pathlib.Path(path) if pathlib.Path(path).is_absolute() else ROOT / path
  if p.is_file():
    return p.read_bytes()[:max_bytes]
  files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ""))
  per = max(1, max_bytes // max(1, len(files)))
  return b"".join(f.read_bytes()[:per] for f in files)[:max_bytes]


@dataclasses.dataclass
class Setup:
  """Tokenizer paths, measured corpus statistics and the matched HAT backbone."""

  tokenizers: dict[int, str]  # vocab size -> model path
  bytes_per_word: dict[str, float]  # splitter -> bytes/word on English
  bytes_per_token: dict[int, float]  # vocab -> bytes/token on English
  bytes_per_token_de: dict[int, float]
  matched: dict  # HAT backbone overrides
  match_ratio: float  # HAT / BPE analytic training FLOPs per byte
  # Per HAT knob: the backbone re-matched with that knob's byte stacks / splitter, and
  # its FLOPs ratio, so that every variant is compared at the base's compute.
  matched_knobs: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def prepare(runner: Runner, preset: Preset, en: str, de: str) -> Setup:
  """Trains the tokenizers, measures the corpora and sizes the HAT backbone (cached)."""
  cache = runner.out / "setup.json"
  if cache.exists():
    d = json.loads(cache.read_text())
    d = {k: ({int(a) if a.isdigit() else a: b for a, b in v.items()}
             if isinstance(v, dict) and k not in ("matched", "matched_knobs") else v)
         for k, v in d.items()}
    setup = Setup(**d)
    if set(preset.knobs) - set(setup.matched_knobs):
      _match_knobs(setup, preset)
      cache.write_text(json.dumps(setup.to_json(), indent=2))
    return setup
  toks = {}
  for vocab in preset.vocabs:
    path = runner.out / f"bpe{vocab}.model"
    runner.tool(["tools/train_tokenizer.py", en, "--vocab-size", str(vocab), "--out",
                 str(path), "--max-bytes", str(preset.tokenizer_bytes)],
                f"tokenizer_{vocab}", path)
    toks[vocab] = str(path)

  from hat.text.bpe import BPETokenizer
  from hat.text.splitter import Splitter
  sample_en, sample_de = corpus_sample(en), corpus_sample(de)
  bpw = {rule: len(sample_en) / len(Splitter(rule, 31).split(sample_en))
         for rule in ("whitespace", "unicode")}
  bpt, bpt_de = {}, {}
  for vocab, path in toks.items():
    tok = BPETokenizer.load(path)
    bpt[vocab] = len(sample_en) / len(tok.encode(sample_en))
    bpt_de[vocab] = len(sample_de) / len(tok.encode(sample_de))
  setup = Setup(toks, bpw, bpt, bpt_de, {}, 0.0)
  setup.matched, setup.match_ratio = _match(setup, preset, {})
  _match_knobs(setup, preset)
  cache.write_text(json.dumps(setup.to_json(), indent=2))
  return setup


def _match(setup: Setup, preset: Preset, knob_over: dict) -> tuple[dict, float]:
  """HAT backbone overrides with the BPE model's FLOPs per byte, and the ratio achieved."""
  vocab = preset.vocabs[0]
  bpe_cfg = config_lib.resolve(BPE_CONFIG, overrides(bpe_overrides(preset, setup, vocab)))
  hat_cfg = config_lib.resolve(HAT_CONFIG, overrides({**preset.common, **preset.hat,
                                                      **knob_over}))
  m = flops.match_hat_to_bpe(bpe_cfg, setup.bytes_per_word[hat_cfg.data.splitter],
                             setup.bytes_per_token[vocab], hat_cfg,
                             vocab_size=_vocab(setup.tokenizers[vocab]),
                             layers=range(*preset.match_layers),
                             head_dim=preset.match_head_dim, aspect=preset.match_aspect,
                             tolerance=0.1)
  bb = m.backbone
  return ({f"model.backbone.{k}": getattr(bb, k) for k in
           ("num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")},
          m.ratio)


def _match_knobs(setup: Setup, preset: Preset) -> None:
  """Re-matches the backbone for each knob (a bigger byte stack gets a smaller backbone)."""
  for knob in preset.knobs:
    over, ratio = _match(setup, preset, KNOBS[knob])
    setup.matched_knobs[knob] = {"backbone": over, "ratio": ratio}


def _vocab(tokenizer_path: str) -> int:
  from hat.text.bpe import BPETokenizer
  return BPETokenizer.load(tokenizer_path).vocab_size


def bpe_overrides(preset: Preset, setup: Setup, vocab: int) -> dict:
  """The BPE model of this preset with tokenizer `vocab` (layout sized to its bytes/token)."""
  return {**preset.common, **preset.bpe, "data.tokenizer": setup.tokenizers[vocab],
          "data.max_tokens": analysis.max_tokens_for(
              int(preset.common["data.window_bytes"]), setup.bytes_per_token[vocab])}


def hat_overrides(preset: Preset, setup: Setup, knob: str | None = None) -> dict:
  """The compute-matched HAT of this preset, with one knob from KNOBS (its backbone
  re-matched to the BPE model's FLOPs per byte) or none."""
  if knob is None:
    return {**preset.common, **preset.hat, **setup.matched}
  return {**preset.common, **preset.hat, **setup.matched_knobs[knob]["backbone"],
          **KNOBS[knob]}


def schedule(preset: Preset, steps: int, checkpoints: int = 1) -> dict:
  """Steps, warmup, in-training eval and checkpoint cadence for a run of `steps`."""
  # With checkpoints kept along the run, every checkpoint is evaluated (matched quality).
  every = steps // checkpoints if checkpoints > 1 else steps // preset.curve_points
  return {"steps": steps, "optim.warmup_steps": max(5, steps // 10),
          "eval_every": max(1, every),
          "eval_batches": preset.curve_batches,
          "ckpt_every": max(1, steps // checkpoints),
          "keep_checkpoints": checkpoints + 1, "sample_bytes": 0}


def flops_per_step(config_file: str, over: dict) -> float:
  """Analytic training FLOPs per step of a config (padded shapes, `hat.flops`)."""
  cfg = config_lib.resolve(config_file, overrides(over))
  vocab = _vocab(cfg.data.tokenizer) if config_file == BPE_CONFIG else None
  return flops.train_flops_per_step(cfg, vocab)
