"""llm-lightning: train decoder-only language models from raw text with PyTorch Lightning."""

__version__ = "0.1.0"
