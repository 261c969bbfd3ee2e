"""Helpers shared by both stages: config system, command line and user-facing errors, the run scaffold, atomic
writes, image reading, weights and architectures, verified checkpoints, run logs."""
