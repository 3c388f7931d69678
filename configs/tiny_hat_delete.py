"""Tiny deletion-gated HAT: tiny_hat plus a MrT5 delete gate after backbone layer 1."""

import pathlib

from hat.config import load_config_file


def get_config():
  """tiny_hat with a delete gate (k=-30, bias 1) and a PI controller towards delta=0.5."""
  c = load_config_file(pathlib.Path(__file__).with_name("tiny_hat.py"))
  c.model.gate.update(kind="delete", controller="pi", kp=0.5, ki=1e-5)
  c.model.gate.delete.update(layer=1, k=-30.0, bias_init=1.0, target_ratio=0.5)
  return c
