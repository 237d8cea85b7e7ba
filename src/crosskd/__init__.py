"""crosskd: cross-tokenizer knowledge distillation for causal language models."""

__version__ = "0.1.0"
