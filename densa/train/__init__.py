"""Pretraining: the recipe's train section (config), optimizers and schedule (optim), the loop (loop), crash-safe
checkpoints (state) and the measured matmul peak for MFU (peak). See docs/training.md."""
