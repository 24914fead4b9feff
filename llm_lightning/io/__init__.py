"""Files on disk: atomic writes, and reading checkpoints outside of Lightning."""
