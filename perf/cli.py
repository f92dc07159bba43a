"""``rpcfast-perf``: one command, one subcommand per benchmark.

A subcommand is a module named in ``SUBCOMMANDS`` that provides ``HELP``, ``add_arguments`` and
``run``. Adding a benchmark is one line here plus its module; heavy imports (grpc, capnp, the
transports) stay inside ``run`` so ``--help`` is quick and one broken peer cannot break the rest.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast


class Subcommand(Protocol):
    """What a module registered in ``SUBCOMMANDS`` must provide."""

    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


SUBCOMMANDS: dict[str, str] = {
    "rpc": "perf.rpc",
    "demo": "perf.demo",
    "memory": "perf.memory",
    "cleaner": "perf.cleaner",
    "kv": "perf.kv",
    "floor": "perf.floor",
}
"""Subcommand name -> module implementing the ``Subcommand`` protocol."""


def _load(module_name: str) -> Subcommand:
    module = importlib.import_module(module_name)
    for attr in ("HELP", "add_arguments", "run"):
        if not hasattr(module, attr):
            raise TypeError(f"perf subcommand module {module_name} lacks {attr!r}")
    return cast(Subcommand, module)


def build_parser(subcommands: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The argument parser with one subparser per registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="rpcfast-perf",
        description="Benchmarks for rpcfast; each prints a table and can write JSON.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in (subcommands if subcommands is not None else SUBCOMMANDS).items():
        command = _load(module_name)
        sub_parser = sub.add_parser(name, help=command.HELP, description=command.HELP)
        command.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rpcfast-perf`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    run = args._run
    status = run(args)
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
