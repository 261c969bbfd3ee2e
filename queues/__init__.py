"""Accelerator-resident FIFO key queues for InfoNCE negatives, saved and restored with checkpoints."""
