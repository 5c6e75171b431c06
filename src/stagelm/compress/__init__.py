"""Compressing a trained stagelm model for deployment (`stagelm-compress`), one module per technique:

- `activation`, `redundancy`, `experts`: structured pruning that really shrinks the shapes in `ModelConfig`;
- `magnitude`: zero pruning, stored sparse;
- `lowrank`: (whitened) SVD factorization;
- `quantize`: int8 per-channel and int4 group-wise weight-only quantization, every expert included, and its
  fake-quantized training forward (quantization-aware distillation);
- `recovery`: distillation recovery (`stage=distill`) after pruning;
- `base`: the `Compression` being built and the calibration statistics the steps score with;
- `storage`: the packed encodings in a checkpoint and their decoding at load;
- `measure`, `report`: every step measured (size, held-out quality, KL, decode speed) and reported.

A compressed checkpoint is an ordinary stagelm checkpoint: `stagelm.checkpoint.load_checkpoint` decodes its packed
tensors, so every command loads it."""
