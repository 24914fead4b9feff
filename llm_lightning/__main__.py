"""`python -m llm_lightning` is the same entry point as the `llm-lightning` script (torchrun needs it)."""

from llm_lightning.cli import main

if __name__ == "__main__":
    main()
