"""The shared command line of both stages: ``--config FILE key.sub=value ... [--resume auto|DIR]``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from common.config import ConfigError, describe, load_config

T = TypeVar("T")


@dataclass
class Invocation(Generic[T]):
    """What a run was asked to do: the validated config plus the non-config flags."""

    cfg: T
    config_path: str | None
    resume: str | None  # None, "auto" or a checkpoint directory


def parse_run_args(schema: type[T], argv: list[str] | None, prog: str, default_config: str | Path | None = None,
                   description: str = "") -> Invocation[T]:
    """Parse the stage entry-point arguments; ``--help-config`` lists every key with type, default and advice."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML config (default: {default_config or 'the schema defaults'})")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="'auto' (the default when the flag has no value) continues from the newest checkpoint"
                             " of the run folder; or a checkpoint folder")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    if args.help_config:
        for key, tp, default, text in describe(schema):
            print(f"{key:<36} {tp:<22} {default!r:<18} {text}")
        raise SystemExit(0)
    path = args.config or (str(default_config) if default_config else None)
    try:
        cfg = load_config(schema, path, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    return Invocation(cfg=cfg, config_path=path, resume=args.resume)
