"""The `tierkv` command: subcommands live in their own modules and register here."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .._version import __version__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 2 with the argument named, as argparse does, but briefer
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import batch, demo, profile, roundtrip

    p = _Parser(prog="tierkv", description="Tiered GPU / CPU / disk KV-cache offloading for LLM inference.")
    p.add_argument("--version", action="version", version=f"tierkv {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in (demo, batch, roundtrip, profile):
        mod.register(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
