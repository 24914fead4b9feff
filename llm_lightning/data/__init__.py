"""Raw text to token files (prepare) and token files to batches (TextDataModule)."""
