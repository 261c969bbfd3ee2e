"""Stage-2 preparation commands (``python -m finetune.tools.<name> --help``)."""
