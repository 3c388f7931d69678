"""Adapter for EleutherAI's lm-evaluation-harness (`lm_eval`).

    import lm_eval
    from hat.eval.harness import HarnessLM
    lm = HarnessLM.from_workdir("runs/hat_en")
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

Works for HAT, BPE and byte-level runs alike: log-likelihoods come from
`hat.eval.loglik.Scorer` (byte-exact at any context/continuation split for HAT and the
byte LM; for BPE the lm-eval token convention, in distribution where the continuation
starts with a space, or `exact=True` for the exact byte-level likelihood at any split),
generation from `hat.generate`.
"""

from __future__ import annotations

from lm_eval.api.model import LM

from hat.eval.loglik import Scorer
from hat.generate import SampleOptions, make_sampler


class HarnessLM(LM):
  """`lm_eval` LM backed by a trained hat model.

  `batch_size`: rows per scoring batch and per generation batch; `max_gen_bytes`: new
  bytes per request when the task gives no `max_gen_toks`; `progress`: a bar over the
  requests of each generation group.
  """

  def __init__(self, model, cfg, tokenizer=None, batch_size: int = 8,
               max_gen_bytes: int = 256, exact: bool = False, progress: bool = True):
    super().__init__()
    self.batch_size, self.progress = batch_size, progress
    self.cfg = cfg
    self.scorer = Scorer(model, cfg, tokenizer, batch_size=batch_size, exact=exact)
    self.sampler = make_sampler(model, cfg, tokenizer)
    self.max_gen_bytes = max_gen_bytes

  @classmethod
  def from_workdir(cls, workdir: str, **kwargs) -> "HarnessLM":
    """Loads the latest checkpoint of a training run."""
    from hat.rundir import load_for_inference
    model, cfg, tokenizer = load_for_inference(workdir)
    return cls(model, cfg, tokenizer, **kwargs)

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    """(log P(continuation | context), is_greedy) per request."""
    scores = self.scorer.loglikelihood_many([r.args[:2] for r in requests])
    return [(s.logprob, s.is_greedy) for s in scores]

  def loglikelihood_rolling(self, requests) -> list[float]:
    """Log-likelihood of whole texts, scored in consecutive chunks with prior context."""
    out = []
    chunk = max(64, self.cfg.data.window_bytes // 2)
    for r in requests:
      text = r.args[0].encode("utf-8")
      pieces = [(text[max(0, i - chunk):i], text[i:i + chunk])
                for i in range(0, len(text), chunk)]
      out.append(sum(s.logprob for s in self.scorer.loglikelihood_many(pieces)))
    return out

  def generate_until(self, requests) -> list[str]:
    """Greedy (or `temperature`-sampled) continuations cut at the `until` strings.

    Requests with the same generation options are decoded together, `batch_size` rows
    at a time (`generate_many`); prompt i of a group samples with the stream of
    (seed, i), so the output does not depend on the batch size.
    """
    groups: dict[SampleOptions, list[int]] = {}
    contexts = []
    for i, r in enumerate(requests):
      context, kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      opts = SampleOptions(temperature=float(kwargs.get("temperature", 0.0)),
                           max_new_bytes=int(kwargs.get("max_gen_toks", self.max_gen_bytes)),
                           stop=tuple(until), seed=int(kwargs.get("seed", 0)))
      groups.setdefault(opts, []).append(i)
      contexts.append(context.encode("utf-8"))
    out = [""] * len(contexts)
    for opts, idx in groups.items():
      news = self.sampler.generate_many([contexts[i] for i in idx], opts,
                                        batch_size=self.batch_size, progress=self.progress)
      for i, new in zip(idx, news):
        out[i] = new.decode("utf-8", "replace")
    return out
