"""Hydra configs of `stagelm-compress`: the primary config, recipes (`recipe/`) and the steps they compose (`step/`)."""
