"""Hydra configuration files (a package so that `@hydra.main(config_path="../conf")` finds them when installed)."""
