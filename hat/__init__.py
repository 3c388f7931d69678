"""HAT: hierarchical autoregressive byte/word language models with BPE baselines."""

__version__ = "0.1.0"
