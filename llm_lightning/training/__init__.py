"""The Lightning side: LanguageModel, callbacks, optimizer and the LightningCLI wiring."""
