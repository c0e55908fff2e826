"""Distillation from the cache: config, student, losses, data, checkpoints and the training loop."""
