"""Command-line parsing shared by the ``tlsrelay`` commands: options anywhere after the command.

argparse fills an optional positional (``queue retry [ID]``) with nothing as soon as an option
comes first, so ``queue retry --config F ID`` failed with "unrecognized arguments" while ``trace
--config F ID`` worked. :func:`parse_anywhere` picks the (sub)command by its name and parses the
rest with ``parse_intermixed_args``: options and positionals in any order, for every command.

Failure: as argparse's: a usage message and exit 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence


def parse_anywhere(
    parser: argparse.ArgumentParser,
    commands: Mapping[str, argparse.ArgumentParser],
    argv: Sequence[str],
    dest: str = "command",
) -> argparse.Namespace:
    """``argv`` parsed by ``parser``, whose subcommands are ``commands`` (``add_subparsers()
    .choices``, stored in ``dest``), none with subcommands of its own; the subcommand is the
    first word that names one."""
    index = next((i for i, word in enumerate(argv) if word in commands), None)
    if index is None:
        return parser.parse_args(argv)  # no command: argparse says what is missing
    rest = [*argv[:index], *argv[index + 1 :]]
    if any(word in ("-h", "--help") for word in rest):
        return parser.parse_args(argv)
    args = commands[argv[index]].parse_intermixed_args(rest)
    setattr(args, dest, argv[index])
    return args
