"""Command-line entry points (Hydra)."""
