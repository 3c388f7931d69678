"""Command-line front ends: user errors in one line with exit 2, no TPU probing on CPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from hat import cli, platforms
from test_train import ROOT, reference_run, train_args, train_data, train_env  # noqa: F401

TPU_NOISE = ("Failed to find host bounds", "unexpected worker hostname", "Source Location Trace")


def _one_error_line(err: str) -> str:
  lines = [l for l in err.strip().splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
  return errors[0]


@cli.entry_point
def _main(argv):
  kind = argv[0]
  if kind == "user":
    raise cli.UserError("data.train: no such thing\nand a second line of advice")
  if kind == "path":
    raise FileNotFoundError(2, "No such file or directory", "/no/such/file")
  if kind == "internal":
    raise RuntimeError("a bug")
  return 0


def test_user_error_is_one_line_and_exit_2(capsys, monkeypatch):
  monkeypatch.delenv("HAT_DEBUG", raising=False)
  assert _main(["user"]) == cli.EXIT_USER_ERROR
  assert capsys.readouterr().err == "error: data.train: no such thing\n"
  assert _main(["path"]) == 2
  assert capsys.readouterr().err == "error: No such file or directory: /no/such/file\n"
  assert _main(["ok"]) == 0


def test_internal_errors_and_debug_keep_the_traceback(monkeypatch):
  monkeypatch.delenv("HAT_DEBUG", raising=False)
  with pytest.raises(RuntimeError):
    _main(["internal"])
  with pytest.raises(cli.UserError):
    _main(["user", "--debug"])
  monkeypatch.setenv("HAT_DEBUG", "1")
  with pytest.raises(cli.UserError):
    _main(["user"])


def test_project_errors_are_user_errors():
  from hat.config import ConfigError
  from hat.data.sources import SourceError
  from hat.data.tfds_text import CorpusError
  from hat.rundir import CheckpointMismatch, NoCheckpoint

  for kind in (ConfigError, SourceError, CorpusError, CheckpointMismatch, NoCheckpoint):
    assert issubclass(kind, cli.UserError)


@pytest.mark.parametrize("case", ["bad_key", "bad_value", "missing_dir", "empty_dir",
                                  "binary_dir", "bad_spec"])
def test_train_user_errors(case, tmp_path, train_data, monkeypatch, capsys):
  from hat.train.__main__ import main

  corpus, cache = train_data
  monkeypatch.setenv("HAT_CACHE", str(cache))
  monkeypatch.delenv("HAT_DEBUG", raising=False)
  (tmp_path / "empty").mkdir()
  (tmp_path / "binary").mkdir()
  (tmp_path / "binary" / "x.txt").write_bytes(b"\x00\x01\x02" * 100)
  override, expect = {
      "bad_key": ("model.no_such_key=1", "model.no_such_key"),
      "bad_value": ("optim.lr=fast", "optim.lr"),
      "missing_dir": ("data.train=text:/nonexistent/dir", "/nonexistent/dir"),
      "empty_dir": (f"data.train=text:{tmp_path / 'empty'}", "no *.txt files"),
      "binary_dir": (f"data.train=text:{tmp_path / 'binary'}", "no documents"),
      "bad_spec": ("data.train=hdfs:/x", "unknown kind 'hdfs'"),
  }[case]
  code = main(train_args(tmp_path / "w", corpus, "mesh=data=1", override))
  assert code == 2
  assert expect in _one_error_line(capsys.readouterr().err)


def test_inference_user_errors(tmp_path, reference_run, capsys, monkeypatch):
  from hat.evaluate import main as evaluate_main
  from hat.generate.cli import main as generate_main
  from hat.robustness import main as robustness_main

  monkeypatch.delenv("HAT_DEBUG", raising=False)
  assert evaluate_main(["--workdir", str(tmp_path / "nothing")]) == 2
  assert "no checkpoint under" in _one_error_line(capsys.readouterr().err)
  assert generate_main(["--workdir", str(tmp_path), "--prompt", "x"]) == 2
  assert "no checkpoint under" in _one_error_line(capsys.readouterr().err)
  # Sampling options are checked before the checkpoint is looked for.
  for flags, expect in ((["--temperature", "nan"], "temperature must be finite"),
                        (["--top-p", "nan"], "top_p must be in (0, 1]"),
                        (["--top-k", "-1"], "top_k must be an integer >= 0"),
                        (["--seed", str(2**40)], "seed must be an integer that fits")):
    assert generate_main(["--workdir", str(tmp_path), *flags]) == 2
    assert expect in _one_error_line(capsys.readouterr().err)
  assert robustness_main(["--run", f"a={tmp_path}", "--out", str(tmp_path / "o")]) == 2
  _one_error_line(capsys.readouterr().err)
  assert evaluate_main(["--workdir", str(reference_run), "--eval", "no_such_set",
                        "--out", str(tmp_path / "e.json")]) == 2
  assert "eval set 'no_such_set': not a set of this run" in _one_error_line(
      capsys.readouterr().err)


def _env_without_platforms(**extra):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  return {**env, **extra}


def test_train_cli_in_a_subprocess_prints_one_line_and_no_tpu_noise(tmp_path, train_data):
  corpus, cache = train_data
  proc = subprocess.run([sys.executable, "-m", "hat.train",
                         *train_args(tmp_path, corpus, "data.train=text:/nonexistent/dir")],
                        env=_env_without_platforms(HAT_CACHE=str(cache)), cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert "path does not exist: /nonexistent/dir" in _one_error_line(proc.stderr)
  assert not any(n in proc.stderr for n in TPU_NOISE), proc.stderr
  debug = subprocess.run([sys.executable, "-m", "hat.train", "--debug",
                          *train_args(tmp_path, corpus, "data.train=text:/nonexistent/dir")],
                         env=train_env(1, cache), cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
  assert debug.returncode == 1 and "Traceback" in debug.stderr and "SourceError" in debug.stderr


def test_skip_absent_tpu_sets_cpu_only_when_libtpu_is_installed_and_no_tpu(monkeypatch):
  monkeypatch.setattr(platforms, "_installed", lambda *names: "libtpu" in names)
  monkeypatch.setattr(platforms, "tpu_attached", lambda: False)
  monkeypatch.setattr(platforms.os.path, "exists", lambda p: False)  # no GPU device nodes
  env = {}
  assert platforms.skip_absent_tpu(env) == "cpu" and env == {"JAX_PLATFORMS": "cpu"}
  assert platforms.skip_absent_tpu({"JAX_PLATFORMS": "tpu"}) is None  # the user's choice
  assert platforms.skip_absent_tpu({"TPU_ACCELERATOR_TYPE": "v5p-8"}) is None
  monkeypatch.setattr(platforms, "tpu_attached", lambda: True)
  assert platforms.skip_absent_tpu({}) is None


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_import_hat_keeps_jax_off_libtpu_on_a_cpu_machine():
  if platforms.tpu_attached():
    pytest.skip("a TPU is attached")
  code = ("import logging; logging.basicConfig(level=logging.DEBUG)\n"
          "import hat, jax, os; jax.devices(); print(os.environ['JAX_PLATFORMS'])")
  proc = subprocess.run([sys.executable, "-c", code], env=_env_without_platforms(),
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() in ("cpu", "cuda,cpu", "rocm,cpu")
  assert "Initializing backend 'tpu'" not in proc.stderr
  assert not any(n in proc.stderr for n in TPU_NOISE)


def test_tool_input_errors_are_one_line(capsys, tmp_path):
  import importlib.util as iu

  def tool(name):
    spec = iu.spec_from_file_location(f"_{name}", ROOT / "tools" / f"{name}.py")
    module = iu.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

  assert tool("plan").main(["--device", "abacus"]) == 2
  assert "unknown device 'abacus'" in _one_error_line(capsys.readouterr().err)
  assert tool("plot_metrics").main([str(tmp_path), "--out", str(tmp_path / "c.png")]) == 2
  assert "no metrics.jsonl in" in _one_error_line(capsys.readouterr().err)
  with cli.user_input():
    pass
  with pytest.raises(cli.UserError, match="bad topology"):
    with cli.user_input(ValueError):
      raise ValueError("bad topology")
