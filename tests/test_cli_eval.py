"""The evaluation commands as subprocesses on a freshly trained tiny run.

Generation and robustness for every family run in-process in test_families.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_train import ROOT, run_train, train_env, write_corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli_eval")
  corpus, cache = write_corpus(d / "corpus.txt"), d / "cache"
  run_train(d / "run", (corpus, cache), "steps=4", f"data.eval=en_val=text:{corpus}",
            "eval_every=4", "eval_batches=1")
  return d / "run", corpus, cache


def _cli(args, cache):
  env = train_env(1, cache)
  proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_evaluate_named_and_adhoc_sets(trained, tmp_path):
  run, corpus, cache = trained
  out = _cli(["-m", "hat.evaluate", "--workdir", str(run), "--eval", "en_val", "--eval",
              f"again=text:{corpus}", "--max-batches", "2", "--out",
              str(tmp_path / "e.json")], cache)
  res = json.loads((tmp_path / "e.json").read_text())["results"]
  assert set(res) == {"en_val", "again"}
  assert res["en_val"]["bpb"] == pytest.approx(res["again"]["bpb"])  # same text, same split
  assert 0 < res["en_val"]["bpb"] < 12 and 0 <= res["en_val"]["word_acc"] <= 1
  assert "en_val" in out and "bpb" in out



def test_plot_metrics(trained, tmp_path):
  run, _, cache = trained
  _cli(["tools/plot_metrics.py", f"tiny={run}", "--keys", "train/bpb,eval/en_val/bpb",
        "--x", "bytes", "--out", str(tmp_path / "c.png")], cache)
  assert (tmp_path / "c.png").stat().st_size > 1000


def test_generate_cli_inputs_in_process(trained, capsys, monkeypatch):
  run, _, _ = trained
  from hat.generate.cli import main  # pylint: disable=g-import-not-at-top

  base = ["--workdir", str(run), "--temperature", "0"]
  # No new bytes: the prompts come back as they are (invalid UTF-8 replaced in print).
  assert main([*base, "--prompt", os.fsdecode(b"caf\xff "), "--prompt", "",
               "--max-new-bytes", "0"]) == 0
  out = capsys.readouterr().out
  assert "caf\ufffd \n" in out and out.count("--- prompt:") == 2
  # A stop string never produced changes nothing; a long prompt still continues.
  assert main([*base, "--prompt", "the quick bro", "--max-new-bytes", "12"]) == 0
  plain = capsys.readouterr().out
  assert main([*base, "--prompt", "the quick bro", "--max-new-bytes", "12", "--stop",
               "\x00never\x00"]) == 0
  assert capsys.readouterr().out == plain
  assert main([*base, "--prompt", "many words " * 400, "--max-new-bytes", "5"]) == 0
  with pytest.raises(SystemExit):
    main([*base, "--max-new-bytes", "-1"])
  capsys.readouterr()
  # A prompt file (one prompt per line, bytes kept) on 2 rows at a time == one batch.
  lines = [b"the quick bro", b"caf\xff ", b"once upon", b"a"]
  (run.parent / "prompts.txt").write_bytes(b"\n".join(lines) + b"\n")
  gen = [*base, "--max-new-bytes", "10"]
  assert main([*gen, "--prompt-file", str(run.parent / "prompts.txt"), "--batch-size",
               "2"]) == 0
  many = capsys.readouterr().out
  assert main([*gen, *sum((["--prompt", os.fsdecode(p)] for p in lines), [])]) == 0
  assert capsys.readouterr().out == many and many.count("--- prompt:") == 4
  for bad in (["--prompt-file", str(run.parent / "missing.txt")], ["--batch-size", "-2"]):
    with pytest.raises(SystemExit):
      main([*gen, *bad])
