"""The shared command line of both stages: ``--config FILE key.sub=value ... [--resume auto|DIR]
[--allow-inexact-resume]``, and how entry points report errors of the user's input (the message alone;
``QGNET_DEBUG=1`` adds the traceback)."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Iterator, TypeVar

from common.checkpoint import CheckpointError
from common.config import ConfigError, describe, load_config
from common.errors import InputError

# what a user can fix from the message: bad config, data, weights, checkpoints, paths, values
USER_ERRORS = (InputError, ConfigError, CheckpointError, FileNotFoundError, ValueError)

T = TypeVar("T")


@dataclass
class Invocation(Generic[T]):
    """What a run was asked to do: the validated config plus the non-config flags."""

    cfg: T
    config_path: str | None
    resume: str | None  # None, "auto" or a checkpoint directory
    allow_inexact: bool = False  # --allow-inexact-resume: resume despite setting / RNG differences


def parse_run_args(schema: type[T], argv: list[str] | None, prog: str, default_config: str | Path | None = None,
                   description: str = "") -> Invocation[T]:
    """Parse the stage entry-point arguments; ``--help-config`` lists every key with type, default and advice."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"YAML config (default: {default_config or 'the schema defaults'})")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="'auto' (the default when the flag has no value) continues from the newest checkpoint"
                             " of the run folder; or a checkpoint folder")
    parser.add_argument("--allow-inexact-resume", action="store_true",
                        help="with --resume: continue even when the checkpoint was written with other settings "
                             "(global batch, arch, total steps, ...) or its RNG state cannot be restored; the run "
                             "is then no longer an exact continuation (each difference is warned about)")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may sit on both sides of --config
    if args.help_config:
        for key, tp, default, text in describe(schema):
            print(f"{key:<36} {tp:<22} {default!r:<18} {text}")
        raise SystemExit(0)
    if args.allow_inexact_resume and not args.resume:
        parser.error("--allow-inexact-resume only applies with --resume [auto|DIR]")
    path = args.config or (str(default_config) if default_config else None)
    try:
        cfg = load_config(schema, path, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    return Invocation(cfg=cfg, config_path=path, resume=args.resume, allow_inexact=args.allow_inexact_resume)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn an error of the user's input into ``error: <message>`` on stderr and exit status 2.

    Other exceptions (bugs) keep their traceback; ``QGNET_DEBUG=1`` keeps it for every error.
    """
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("QGNET_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
