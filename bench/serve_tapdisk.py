#!/usr/bin/env python3
"""Serve one image with a real tapdisk, in the foreground, on a given NBD socket path.

For bench/nbd-compare, which wants a server command that stays in the
foreground and listens on {socket}:

    bench/serve_tapdisk.py --socket {socket} [--no-direct] [--read-only] aio:{image}

It spawns `tapdisk -D` in a private run directory, attaches minor 0, opens the image (with
NO_O_DIRECT / RDONLY as asked) through control messages, links {socket} to the VBD's
nbd<pid>.0 socket, and waits. SIGTERM/SIGINT stop the tapdisk and remove everything.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from blktap.control import client, minors
from blktap.control.options import OpenOptions
from blktap.control.rundir import RunDir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True, help="where to expose the NBD socket")
    ap.add_argument("--no-direct", action="store_true", help="open with NO_O_DIRECT")
    ap.add_argument("--read-only", action="store_true", help="open read-only")
    ap.add_argument("image", help="type:path, e.g. aio:/srv/disk.raw")
    args = ap.parse_args()

    run_dir = tempfile.mkdtemp(prefix="td-bench-", dir="/tmp")
    env = dict(os.environ, BLKTAP_RUN_DIR=run_dir, BLKTAP_BLOCKDEV="off")
    tapdisk = str(Path(sys.executable).parent / "tapdisk")
    proc = subprocess.Popen([tapdisk, "-D"], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the control socket path: tapdisk is listening
        rundir = RunDir(Path(run_dir), Path(run_dir) / "dev")
        minor = minors.allocate(rundir)
        client.attach(rundir, proc.pid, minor)
        client.open(rundir, proc.pid, minor, args.image,
                    OpenOptions(read_only=args.read_only, no_o_direct=args.no_direct))
        if os.path.lexists(args.socket):
            os.unlink(args.socket)
        os.symlink(rundir.nbd_socket(proc.pid, minor), args.socket)
        # Become a small shell that cleans up on SIGTERM, so that the memory nbd-compare
        # sums over the server's processes is the tapdisk's, not this Python wrapper's.
        script = ('trap \'kill "$1"; rm -f "$2"; rm -rf "$3"; exit 0\' TERM INT HUP; '
                  'while :; do sleep 0.2; done')
        os.execvp("sh", ["sh", "-c", script, "sh", str(proc.pid), args.socket, run_dir])
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        if os.path.islink(args.socket):
            os.unlink(args.socket)
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
