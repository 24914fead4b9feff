"""Subcommands beyond fit/validate: generate, export, monitor, setup, bench, demo."""
