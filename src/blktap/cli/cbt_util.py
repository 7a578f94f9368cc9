"""``cbt-util``: the changed block tracking log tool. Argument parsing and printing only;
the operations live in :mod:`blktap.cbtutil`.

Exit status: 0 on success, otherwise a positive errno (22, EINVAL, for usage errors), as
the C tool's ``main`` returns it.
"""

from __future__ import annotations

import argparse
import base64
import errno
import re
import sys
import uuid
from collections.abc import Callable, Sequence

from blktap import __version__
from blktap.cli.usage import EinvalParser, command_parser, run_verb

PROG = "cbt-util"

OVERVIEW = """\
Create, read, update and merge changed block tracking (CBT) logs: the .cbtlog files
in which tapdisk's log layer (tap-ctl create -C LOGFILE) records which 64 KiB
blocks of a virtual disk were written.

A log is a 48-byte header (parent and child log UUIDs, a "consistent" flag, the
disk size in bytes) followed by a bitmap with one bit per 64 KiB block, least
significant bit first. Files are byte for byte those of the C blktap cbt-util, and
every command here reads logs the C tools wrote.
"""

COMMANDS_EPILOG = """\
commands:
  create     create a log for a disk of SIZE bytes, no block marked
  get        print one header field, or the bitmap
  set        set header fields; grow the log for a larger disk
  coalesce   OR a parent log's bitmap into its child's

Run "cbt-util COMMAND -h" for the options of one command.

files:
  Logs are checked before use: a file shorter than the header, a header no log has
  (disk size 0, a flag other than 0 or 1), a bitmap shorter than the disk needs, or
  bytes past the bitmap are reported with the numbers involved.

exit status:
  0 on success; otherwise a positive errno: 22 (EINVAL) for usage errors, an invalid
  value or a file that is not a CBT log; 5 (EIO) for a file cut short; the system's
  errno (2 ENOENT, 13 EACCES, ...) when a file cannot be opened.
"""

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


_Parser = EinvalParser


def _parser(name: str, description: str, epilog: str = "") -> _Parser:
    return command_parser(PROG, name, description, epilog)


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _size(text: str) -> int:
    """A disk size in bytes: decimal digits, 1..2**64-1."""
    if not text.isdigit() or not text.isascii():
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: a number of bytes")
    value = int(text)
    if not 0 < value < 1 << 64:
        raise argparse.ArgumentTypeError(f"invalid size {text}: must be 1..2**64-1 bytes")
    return value


def _uuid(text: str) -> uuid.UUID:
    """A UUID in its 36-character form (as libuuid's uuid_parse accepts it)."""
    if not _UUID.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid UUID {text!r}: expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")
    return uuid.UUID(text)


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"invalid flag {text!r}: 0 or 1")
    return text == "1"


# ----------------------------------------------------------------------------- create
def _create(argv: Sequence[str]) -> int:
    p = _parser(
        "create",
        "Create NAME, a new CBT log for a disk of SIZE bytes: no parent or child log,\n"
        "consistent 0, no block marked. An existing NAME is overwritten.",
        "The file is 48 + ceil(ceil(SIZE / 65536) / 8) bytes. (The C tool's usage text\n"
        "calls SIZE \"Num blocks in bitmap\"; both tools take it in bytes.)\n\n"
        "example:\n  cbt-util create -n vdi.cbtlog -s 10737418240",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="log file to create")
    p.add_argument("-s", dest="size", type=_size, required=True, metavar="SIZE",
                   help="virtual disk size in bytes")
    a = p.parse_args(argv)
    from blktap.cbtutil.create import create

    create(a.name, a.size)
    return 0


# -------------------------------------------------------------------------------- get
def _get(argv: Sequence[str]) -> int:
    p = _parser(
        "get",
        "Print one field of the log NAME on standard output: exactly one of -p, -c, -f,\n"
        "-s, -b.",
        "output formats (as the C cbt-util):\n"
        "  -p, -c  the UUID in lower case, 00000000-0000-0000-0000-000000000000 when\n"
        "          none is set\n"
        "  -f      0 or 1\n"
        "  -s      the disk size in bytes\n"
        "  -b      the bitmap's raw bytes, ceil(ceil(size / 65536) / 8) of them, with no\n"
        "          newline; bit n (block n, bytes n*65536 to n*65536+65535) is bit n % 8,\n"
        "          least significant first, of byte n / 8\n"
        "  -b -E   the bitmap in base64 on one line, for callers that read text (the\n"
        "          storage manager's newer calls use it; not in the reference C tool)\n\n"
        "examples:\n"
        "  cbt-util get -n vdi.cbtlog -s\n"
        "  cbt-util get -n vdi.cbtlog -b | xxd",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="the log file")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("-p", dest="field", action="store_const", const="parent",
                       help="print the parent log's UUID")
    which.add_argument("-c", dest="field", action="store_const", const="child",
                       help="print the child log's UUID")
    which.add_argument("-f", dest="field", action="store_const", const="consistent",
                       help="print the consistent flag")
    which.add_argument("-s", dest="field", action="store_const", const="size",
                       help="print the disk size in bytes")
    which.add_argument("-b", dest="field", action="store_const", const="bitmap",
                       help="write the bitmap to standard output")
    p.add_argument("-E", dest="base64", action="store_true",
                   help="with -b: write the bitmap base64-encoded, then a newline")
    a = p.parse_args(argv)
    if a.base64 and a.field != "bitmap":
        p.error("-E goes with -b")
    from blktap.cbtutil.query import get_header, iter_bitmap

    if a.field == "bitmap":
        # Streamed: nothing is written before the file is validated (the first chunk).
        # Chunks are a multiple of 3 bytes so that base64 needs no carry between them.
        out = sys.stdout.buffer
        sys.stdout.flush()
        for chunk in iter_bitmap(a.name, 3 << 18):
            out.write(base64.b64encode(chunk) if a.base64 else chunk)
        if a.base64:
            out.write(b"\n")
        out.flush()
        return 0
    header = get_header(a.name)
    if a.field == "parent":
        _out(str(header.parent))
    elif a.field == "child":
        _out(str(header.child))
    elif a.field == "consistent":
        _out(str(int(header.consistent)))
    else:
        _out(str(header.size))
    return 0


# -------------------------------------------------------------------------------- set
def _set(argv: Sequence[str]) -> int:
    p = _parser(
        "set",
        "Set fields of the log NAME: at least one of -p, -c, -f, -s.",
        "-s grows the log for a disk grown to SIZE bytes: the bitmap is extended with\n"
        "clear bits and existing bits are kept. A SIZE smaller than the log's is refused\n"
        "(\"Size smaller than current file size\") and nothing is changed.\n\n"
        "The storage manager sets -f 0 while a disk is attached and -f 1 after a clean\n"
        "detach; a log left at 0 means \"assume every block changed\".\n\n"
        "examples:\n"
        "  cbt-util set -n child.cbtlog -p 11111111-2222-3333-4444-555555555555\n"
        "  cbt-util set -n vdi.cbtlog -f 1\n"
        "  cbt-util set -n vdi.cbtlog -s 21474836480",
    )
    p.add_argument("-n", dest="name", required=True, metavar="NAME", help="the log file")
    p.add_argument("-p", dest="parent", type=_uuid, metavar="UUID",
                   help="the parent log's UUID")
    p.add_argument("-c", dest="child", type=_uuid, metavar="UUID",
                   help="the child log's UUID")
    p.add_argument("-f", dest="consistent", type=_flag, metavar="0|1",
                   help="the consistent flag")
    p.add_argument("-s", dest="size", type=_size, metavar="SIZE",
                   help="the disk size in bytes (grow only)")
    a = p.parse_args(argv)
    if a.parent is None and a.child is None and a.consistent is None and a.size is None:
        p.error("give at least one of -p, -c, -f, -s")
    from blktap.cbtutil.setfield import set_fields

    set_fields(a.name, parent=a.parent, child=a.child, consistent=a.consistent, size=a.size)
    return 0


# --------------------------------------------------------------------------- coalesce
def _coalesce(argv: Sequence[str]) -> int:
    p = _parser(
        "coalesce",
        "Merge the log PARENT into the log CHILD: every block marked in PARENT becomes\n"
        "marked in CHILD. PARENT is not changed; CHILD keeps its header.",
        "Refused when PARENT's bitmap is larger than CHILD's (a parent log covers a disk\n"
        "no larger than its child's).\n\n"
        "example:\n  cbt-util coalesce -p old.cbtlog -c new.cbtlog",
    )
    p.add_argument("-p", dest="parent", required=True, metavar="PARENT",
                   help="the parent log file")
    p.add_argument("-c", dest="child", required=True, metavar="CHILD",
                   help="the child log file (updated)")
    a = p.parse_args(argv)
    from blktap.cbtutil.coalesce import coalesce

    coalesce(a.parent, a.child)
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "create": _create,
    "set": _set,
    "get": _get,
    "coalesce": _coalesce,
}


def _top_parser() -> _Parser:
    p = _Parser(
        prog=PROG,
        usage=f"{PROG} COMMAND [OPTIONS]\nCOMMAND := {{ {' | '.join(COMMANDS)} }}",
        description=OVERVIEW,
        epilog=COMMANDS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not args:
        top.print_usage(sys.stderr)
        return errno.EINVAL
    if args[0] in ("-h", "--help", "-V", "--version"):
        try:
            top.parse_args(args[:1])
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 0
        return 0
    cmd = args[0]
    run = COMMANDS.get(cmd)
    if run is None:
        # The C tool prints "Invalid COMMAND X" and the usage (and exits 0); this one
        # exits EINVAL, so that a caller's typo is not taken for success.
        sys.stderr.write(f"Invalid COMMAND {cmd}\n")
        top.print_usage(sys.stderr)
        return errno.EINVAL
    return run_verb(PROG, cmd, run, args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
