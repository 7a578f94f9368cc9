"""Argument parsing shared by the C-style tools (vhd-util, cbt-util): usage errors exit
with EINVAL (22), as the C tools do, instead of argparse's 2."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from blktap.errors import BlktapError, errno_of


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


def run_verb(prog: str, cmd: str, run: Callable[[Sequence[str]], int],
             args: Sequence[str]) -> int:
    """Run one verb of a C-style tool and turn what it raises into the C tool's exit
    status: an argparse exit keeps its code; a closed stdout is EPIPE (quietly, as a
    pipe into ``head`` expects); a BlktapError or OSError prints ``PROG CMD: message``
    on stderr and exits with its errno; Ctrl-C is EINTR."""
    try:
        return run(args)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else errno.EINVAL
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return errno.EPIPE
    except (BlktapError, OSError) as exc:
        if isinstance(exc, BlktapError):
            message = exc.message
        else:
            message = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        sys.stderr.write(f"{prog} {cmd}: {message}\n")
        return errno_of(exc)
    except KeyboardInterrupt:
        return errno.EINTR
