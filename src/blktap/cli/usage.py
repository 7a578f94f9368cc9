"""Argument parsing shared by the C-style tools (vhd-util, cbt-util): usage errors exit
with EINVAL (22), as the C tools do, instead of argparse's 2."""

from __future__ import annotations

import argparse
import errno
import sys
from typing import NoReturn


class EinvalParser(argparse.ArgumentParser):
    """argparse that exits with EINVAL (22) on usage errors, as the C tools."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(errno.EINVAL, f"{self.prog}: error: {message}\n")


def command_parser(prog: str, name: str, description: str, epilog: str = "") -> EinvalParser:
    """The parser of one verb (``prog name``), its help text laid out as written."""
    return EinvalParser(
        prog=f"{prog} {name}",
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
