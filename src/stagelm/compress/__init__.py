"""Compressing a trained stagelm model for deployment (`stagelm-compress`): structured pruning that really shrinks
the shapes in `ModelConfig` (activation, redundancy and MoE expert pruning), magnitude pruning, low-rank SVD and
int8 / int4 weight-only quantization stored packed, each step measured (`stagelm.compress.measure`) and reported.

A compressed checkpoint is an ordinary stagelm checkpoint: its tensors may be stored in a compact encoding
(`stagelm.compress.storage`) that `stagelm.checkpoint.load_checkpoint` decodes, so every command loads it."""
