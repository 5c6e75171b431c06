"""Export of stagelm checkpoints to other formats."""
