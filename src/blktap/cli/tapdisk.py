"""``tapdisk``: the daemon that serves VBDs. Argument parsing only; see blktap.tapdisk.

Started without arguments (as tap-ctl spawns it), it first asks the run directory's fork
server (:mod:`blktap.tapdisk.forkserver`) for the tapdisk, which spares it the imports of
the data path; only this module's light imports come before that.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from blktap import __version__, paths

if TYPE_CHECKING:
    import argparse

DESCRIPTION = """\
Serve virtual block devices (VBDs) for tap-ctl and toolstacks.

tapdisk daemonizes, creates its control socket ctl<pid> in the run directory, prints the
socket's path as one line on standard output and keeps serving control requests
(ATTACH, OPEN, PAUSE, RESUME, CLOSE, DETACH, LIST, STATS, ...) until its last VBD is
detached or it receives SIGTERM. Each opened VBD is exported over NBD on the Unix socket
nbd<pid>.<minor> in the run directory and, where the host allows, as a kernel block
device <dev-dir>/tapdev<minor>. It is normally started by `tap-ctl spawn` or
`tap-ctl create`, not by hand.

Images are named [LAYER:]...TYPE:PATH: layers over the image, top first, such as null
(pass-through) and fault:SPEC (injected errors and latency; EAGAIN/EBUSY retried until
the OPEN's request timeout). `tap-ctl create --help` describes SPEC.
"""

EPILOG = f"""\
environment:
  {paths.RUN_DIR_ENV}   run directory (default {paths.DEFAULT_RUN_DIR})
  {paths.DEV_DIR_ENV}   block device directory (default {paths.DEFAULT_DEV_DIR})
  BLKTAP_BLOCKDEV  auto, on or off: the default of --blockdev
  BLKTAP_FORKSERVER  off, or the seconds the run directory's fork server stays idle
                   (default 600): started without arguments, tapdisk is forked from it
  BLKTAP_FUSE_PASSTHROUGH  auto, on or off: whether the kernel block device of a VBD
                   on one raw file lets the kernel read and write the file itself (FUSE
                   passthrough, where the kernel has it): auto for read-only devices
                   (default), on for read-write ones too (a pause then holds writes but
                   not lone reads, and an unpause onto another file is refused), off
                   for none; STATS' blockdev.io_path says
  BLKTAP_FUSE_URING  off (default), auto or on: serve the block device's FUSE requests
                   from io_uring ring entries (FUSE over io_uring; needs root to write Y
                   to /sys/module/fuse/parameters/enable_uring) instead of reading
                   /dev/fuse: auto where the kernel offers it, on or the device fails
                   with the reason; io_path then says fuse-uring

Logs go to syslog (daemon facility) when daemonized, to standard error with -D.
"""


def build_parser() -> argparse.ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(
        prog="tapdisk", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-D", "--foreground", action="store_true",
                   help="do not daemonize; log to standard error")
    p.add_argument("-V", "--version", action="version", version=f"tapdisk {__version__}")
    p.add_argument("--run-dir", metavar="DIR",
                   help=f"run directory (overrides ${paths.RUN_DIR_ENV})")
    p.add_argument("--dev-dir", metavar="DIR",
                   help=f"block device directory (overrides ${paths.DEV_DIR_ENV})")
    p.add_argument("--blockdev", choices=("auto", "on", "off"),
                   default=os.environ.get("BLKTAP_BLOCKDEV", "auto"),
                   help="publish a kernel block device per VBD (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if not argv and os.environ.get("BLKTAP_BLOCKDEV", "auto") in ("auto", "on", "off"):
        from blktap.tapdisk.forkserver import launch

        rundir = paths.run_dir(None)
        try:
            status = launch(rundir)
        except OSError:
            status = None
        if status is not None:
            return status
    import logging

    args = build_parser().parse_args(argv)
    if args.blockdev not in ("auto", "on", "off"):
        build_parser().error(f"BLKTAP_BLOCKDEV must be auto, on or off, not {args.blockdev!r}")
    from blktap.tapdisk.daemon import DaemonOptions, run

    return run(DaemonOptions(
        foreground=args.foreground,
        run_dir=args.run_dir,
        dev_dir=args.dev_dir,
        blockdev=args.blockdev,
        log_level=logging.DEBUG if args.debug else logging.INFO,
    ))


if __name__ == "__main__":
    raise SystemExit(main())
