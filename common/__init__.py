"""Helpers shared by both stages: config system, command line, checkpoints, run logging, PNG grids."""
