"""``tap-ctl``: the command line over :mod:`blktap.control`. Parsing and printing only.

Same commands, flags, output and exit codes as the C tap-ctl (reference/tap-ctl.md):
on failure ``strerror(errno)`` goes to stderr and the exit status is that errno; a usage
error exits 22 (EINVAL). ``--debug`` may appear anywhere on the command line.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shlex
import signal
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

from blktap import __version__, paths
from blktap.control import Control, OpenOptions, TapEntry
from blktap.control.spawn import TAPDISK_ENV, tapdisk_binary
from blktap.errors import BlktapError, errno_of
from blktap.proto.tcp_export import TcpExport

log = logging.getLogger("blktap.cli.tap_ctl")

PROG = "tap-ctl"

# --------------------------------------------------------------------------- parsing


class _UsageError(Exception):
    """A command line that does not parse (exit status EINVAL)."""


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors to the caller instead of exiting with 2."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


def _int_arg(name: str, low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} {value} is outside {low}..{high}")
        return value

    parse.__name__ = name
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"SECS must be a number, not {text!r}") from None
    if not 0 <= value < 1e9:
        raise argparse.ArgumentTypeError(f"SECS {text} is out of range")
    return value


_PID = _int_arg("PID", 1, 2**31 - 1)
_MINOR = _int_arg("MINOR", 0, paths.MAX_MINOR)
_REQ_TIMEOUT = _int_arg("SECS", 0, 0xFFFF)

_ENVIRONMENT = f"""\
environment:
  {paths.RUN_DIR_ENV:<16} run directory: control sockets ctl<pid>, minor markers
                   tapdisk/tapdisk-<minor>, NBD sockets nbd<pid>.<minor>
                   (default {paths.DEFAULT_RUN_DIR})
  {paths.DEV_DIR_ENV:<16} block device directory, for tapdev<minor>
                   (default {paths.DEFAULT_DEV_DIR})
  {TAPDISK_ENV:<16} the tapdisk executable to spawn (default: the tapdisk installed
                   with tap-ctl, else tapdisk on $PATH)"""

_IMAGE_STACK = """\
image stack:
  TYPE:PATH may be preceded by layers, top first: [LAYER:]...TYPE:PATH.
  null:TYPE:PATH       a layer that changes nothing
  fault:SPEC:TYPE:PATH fault injection; SPEC is comma-separated key=value, each optional:
    op=OPS             read, write, zero, trim, flush joined with +, or any (default)
    errno=NAME         EIO (default), ENOSPC, EAGAIN, EBUSY, ... or none (latency only)
    offset=START-END   only requests overlapping [START,END) (K/M/G suffixes)
    rate=P             probability 0..1 that a matching request is hit (default 1)
    after=N, count=N   let N matching requests pass first; hit at most N times
    latency=T          wait before failing/passing: 5ms, 100us, 0.2s
    seed=N             seed of the rate draws (same seed, same requests hit)
  EAGAIN and EBUSY are retried with growing waits (10 ms to 1 s) until the request
  timeout (-t), then the request fails (NBD clients get EIO).
  e.g. fault:op=write,errno=ENOSPC,offset=0-1M,rate=0.5,after=10:vhd:/srv/vm.vhd"""

_EXIT_STATUS = """\
exit status:
  0 on success; otherwise the errno of the failure, whose strerror() is printed on
  standard error: 22 (EINVAL) usage error, 2 (ENOENT) missing image or unknown pid,
  11 (EWOULDBLOCK) free of a minor still attached, 16 (EBUSY) image or VBD in use,
  110 (ETIMEDOUT) timeout."""


def _parser(name: str, usage: str, description: str, epilog: str = "") -> _Parser:
    parts = [p for p in (epilog.strip("\n"), _EXIT_STATUS, _ENVIRONMENT) if p]
    parser = _Parser(
        prog=f"{PROG} {name}",
        usage=f"{PROG} {name} {usage}".rstrip(),
        description=textwrap.dedent(description).strip(),
        epilog="\n\n".join(parts),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=True,
        allow_abbrev=False,
    )
    return parser


def _pid_minor(p: _Parser, *, minor_required: bool = True) -> None:
    p.add_argument("-p", dest="pid", type=_PID, required=True, metavar="PID",
                   help="process id of the tapdisk (as `list` shows it)")
    p.add_argument("-m", dest="minor", type=_MINOR, required=minor_required, metavar="MINOR",
                   help="minor number of the VBD (0..16383)")


def _open_flags(p: _Parser) -> None:
    p.add_argument("-R", dest="read_only", action="store_true",
                   help="open read-only (RDONLY)")
    p.add_argument("-e", dest="parent_minor", type=_MINOR, metavar="MINOR",
                   help="use the chain already open as MINOR as the parent (REUSE_PRT)")
    p.add_argument("-r", dest="local_cache", action="store_true",
                   help="turn on read caching into the leaf (ADD_LCACHE)")
    p.add_argument("-2", dest="secondary", metavar="[SETTINGS:]TYPE:PATH",
                   help="secondary image: mirror writes to it, or with -s fail over to it "
                        "on ENOSPC (SECONDARY); SETTINGS: copy=none|allocated|full (the "
                        "initial copy), timeout=SECS (before the mirror degrades)")
    p.add_argument("-s", dest="standby", action="store_true",
                   help="with -2: use the secondary only on ENOSPC (STANDBY)")
    p.add_argument("-t", dest="req_timeout", type=_REQ_TIMEOUT, default=0, metavar="SECS",
                   help="I/O request timeout in seconds: how long a request failing with "
                        "EAGAIN/EBUSY is retried (default: tapdisk's, 120)")
    p.add_argument("-D", dest="no_o_direct", action="store_true",
                   help="do not use O_DIRECT (NO_O_DIRECT)")
    p.add_argument("-C", dest="log_path", metavar="LOGPATH",
                   help="insert a log layer recording changed blocks in LOGPATH (ADD_LOG)")
    p.add_argument("--export-tcp", dest="export_tcp", metavar="HOST:PORT",
                   help="also export over NBD on TCP, bound to exactly this IP address "
                        "([V6]:PORT for IPv6); without TLS anyone who reaches it can read "
                        "and write the disk")
    p.add_argument("--tls-creds", dest="tls_creds", metavar="DIR",
                   help="with --export-tcp: require TLS (NBD_OPT_STARTTLS), X.509 "
                        "credentials in DIR: server-cert.pem, server-key.pem, ca-cert.pem")
    p.add_argument("--tls-verify-client", dest="tls_verify_client", action="store_true",
                   help="with --tls-creds: demand client certificates signed by ca-cert.pem")
    p.add_argument("--tls-psk", dest="tls_psk", metavar="FILE",
                   help="with --export-tcp: TLS-PSK with nbdkit's key file (username:hexkey "
                        "lines); not available in this Python runtime (refused)")


def _options(ns: argparse.Namespace, key: bytes | None = None) -> OpenOptions:
    if ns.standby and ns.secondary is None:
        raise _UsageError("-s needs a secondary image (-2)")
    export = None
    if ns.export_tcp is not None:
        export = TcpExport(ns.export_tcp, tls_creds=ns.tls_creds, tls_psk=ns.tls_psk,
                           tls_verify_client=ns.tls_verify_client)
    elif ns.tls_creds or ns.tls_psk or ns.tls_verify_client:
        raise _UsageError("--tls-creds, --tls-psk and --tls-verify-client need --export-tcp")
    return OpenOptions(
        read_only=ns.read_only,
        parent_minor=ns.parent_minor,
        local_cache=ns.local_cache,
        secondary=ns.secondary,
        standby=ns.standby,
        request_timeout_s=ns.req_timeout,
        no_o_direct=ns.no_o_direct,
        log_path=ns.log_path,
        key=key,
        export=export,
    )


# -------------------------------------------------------------------------- printing


def _state_text(state: int) -> str:
    """C's ``%#x``: ``0`` for zero, else ``0x`` and lowercase hex."""
    value = state & 0xFFFFFFFF
    return "0" if value == 0 else f"{value:#x}"


def _row(entry: TapEntry) -> str:
    pid = "-" if entry.pid is None else str(entry.pid)
    minor = "-" if entry.minor is None else str(entry.minor)
    state = "-" if entry.state is None else _state_text(entry.state)
    # C: printf("%8s %4s %4s %10s %s\n", pid, minor, state, type, file)
    return f"{pid:>8} {minor:>4} {state:>4} {entry.type or '-':>10} {entry.path or '-'}"


def _dict_line(entry: TapEntry) -> str:
    fields = []
    if entry.pid is not None:
        fields.append(f"pid={entry.pid}")
    if entry.minor is not None:
        fields.append(f"minor={entry.minor}")
    if entry.state is not None:
        fields.append(f"state={_state_text(entry.state)}")
    if entry.image is not None:
        fields.append(f"args={entry.image}")
    return " ".join(fields)


# -------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class _Command:
    summary: str
    build: Callable[[], _Parser]
    run: Callable[[Control, argparse.Namespace, IO[str]], int]


def _build_list() -> _Parser:
    p = _parser(
        "list", "[-p PID] [-m MINOR] [-t TYPE] [-f FILE] [--json]",
        """
        List tapdisks, their VBDs and allocated minors.

        The list is an outer join of the allocated minors (marker files), the running
        tapdisks (control sockets, each confirmed with a PID request) and each tapdisk's
        VBDs. When standard output is not a terminal, each item is one line of
        space-separated key=value fields, missing fields left out:

          pid=21012 minor=0 state=0 args=aio:/srv/x.img   a VBD with an image open
          pid=21012 minor=1 state=0                       attached, never opened
          pid=21012 minor=2 state=0x2                     opened, then closed
          minor=3                                         a minor with no tapdisk
          pid=21939                                       a tapdisk with no VBD

        A closed VBD has no args: tapdisk forgets the image at close, as the C
        tapdisk does. A paused one keeps it (state 0x2a).

        On a terminal, columns "%8s %4s %4s %10s %s" of pid, minor, state, type and
        file, with "-" for a missing value. state is the VBD state word in C's %#x
        form: 0 running, 0x2 closed, 0x2a paused (CLOSED|QUIESCED|PAUSED).

        A VBD whose tapdisk died (killed, crashed) lists as a minor with no tapdisk
        (minor=N), as in the C tap-ctl. With --json such a minor also gives
        dead_pids and leftovers: the dead tapdisk's sockets, FUSE mount, loop device
        and tapdevN link. `free -m N` (or `destroy -p DEADPID -m N`) removes them;
        so does the next `create`, which leaves the minor allocated.
        """,
    )
    p.add_argument("-p", dest="pid", type=_PID, metavar="PID", help="only this tapdisk")
    p.add_argument("-m", dest="minor", type=_MINOR, metavar="MINOR", help="only this minor")
    p.add_argument("-t", dest="type", metavar="TYPE", help="only VBDs of this image type")
    p.add_argument("-f", dest="file", metavar="FILE", help="only VBDs of this image file")
    p.add_argument("--json", action="store_true",
                   help="print a JSON array instead; each VBD also gives its NBD socket "
                        "(nbd_socket), kernel block device (block_device) and its I/O path "
                        "(block_device_io: passthrough, fuse or fuse-uring), image chain, "
                        "leaf first (chain) and changed-block log (cbt_log)")
    return p


def _keep(entry: TapEntry, ns: argparse.Namespace) -> bool:
    # The C filters: an entry without the field passes a type/file filter.
    if ns.minor is not None and entry.minor != ns.minor:
        return False
    if ns.pid is not None and entry.pid != ns.pid:
        return False
    if ns.type is not None and entry.type is not None and entry.type != ns.type:
        return False
    return not (ns.file is not None and entry.path is not None and entry.path != ns.file)


def _orphan_fields(ctl: Control, entry: TapEntry) -> dict[str, Any]:
    """For a minor with no tapdisk: the dead tapdisks that had it and what they left."""
    if entry.pid is not None or entry.minor is None:
        return {}
    found = ctl.leftovers(entry.minor)
    if found is None:
        return {}
    return {"dead_pids": list(found.dead_pids), "leftovers": found.paths()}


def _supervisor_fields(ctl: Control, entry: TapEntry) -> dict[str, Any]:
    """For a supervised VBD: its supervisor's pid, restarts and stable NBD path."""
    if entry.minor is None:
        return {}
    state = ctl.supervision(entry.minor)
    if state is None or (entry.pid is not None and entry.pid not in state.pids):
        return {}
    return {"supervisor": {"pid": state.supervisor_pid, "running": ctl.supervised(entry.minor),
                           "restarts": state.restarts, "tapdisk_pids": list(state.pids),
                           "nbd_path": state.nbd_path}}


def _run_list(ctl: Control, ns: argparse.Namespace, out: IO[str]) -> int:
    entries = [e for e in ctl.list(pid=ns.pid) if _keep(e, ns)]
    if ns.json:
        docs: list[dict[str, Any]] = []
        for entry in entries:
            info = ctl.details(entry)
            docs.append({
                "pid": entry.pid,
                "minor": entry.minor,
                "state": entry.state,
                "type": entry.type,
                "path": entry.path,
                "args": entry.image,
                "nbd_socket": None if info.nbd_socket is None else str(info.nbd_socket),
                "block_device": None if info.block_device is None else str(info.block_device),
                "block_device_io": info.block_device_io,
                "nbd_tcp": info.nbd_tcp,
                "chain": list(info.chain),
                "cbt_log": info.cbt_log,
                **_orphan_fields(ctl, entry),
                **_supervisor_fields(ctl, entry),
            })
        out.write(json.dumps(docs, indent=2) + "\n")
        return 0
    tty = out.isatty()
    for entry in entries:
        out.write((_row(entry) if tty else _dict_line(entry)) + "\n")
    return 0


def _build_allocate() -> _Parser:
    p = _parser(
        "allocate", "[-d DEVNAME]",
        """
        Reserve the lowest free minor (0..16383) and print its marker file
        <run-dir>/tapdisk/tapdisk-<minor>, as the current C tap-ctl does (toolstacks
        parse the minor from that path).
        """,
    )
    p.add_argument("-d", dest="devname", metavar="DEVNAME",
                   help="accepted for compatibility with the C tap-ctl; ignored")
    return p


def _run_allocate(ctl: Control, ns: argparse.Namespace, out: IO[str]) -> int:
    if ns.devname:
        log.debug("ignoring -d %s: device names are fixed", ns.devname)
    minor = ctl.allocate()
    out.write(f"{ctl.rundir.marker(minor)}\n")
    return 0


def _build_free() -> _Parser:
    p = _parser(
        "free", "-m MINOR",
        """
        Release an allocated minor (remove its marker). Fails with EWOULDBLOCK (11)
        while a tapdisk has the minor attached, ENOENT (2) if it is not allocated.

        What a dead tapdisk left for the minor goes too: its nbd<pid>.<minor> and
        ctl<pid> sockets, the FUSE mount <run-dir>/fuse/<minor>, the loop device and
        the <dev-dir>/tapdev<minor> link. A loop device that still has a mounted file
        system (or is held open) cannot go yet: it fails every I/O, is marked to
        detach itself on its last close, and a warning names it and its mount point.
        Unmount it (umount MOUNTPOINT) and the loop device disappears; the file
        system's unwritten data is lost with the tapdisk.
        """,
    )
    p.add_argument("-m", dest="minor", type=_MINOR, required=True, metavar="MINOR",
                   help="the minor to release")
    return p


def _run_free(ctl: Control, ns: argparse.Namespace, out: IO[str]) -> int:
    ctl.free(ns.minor)
    return 0


def _build_create() -> _Parser:
    p = _parser(
        "create", "-a TYPE:PATH [-d DEV] [-R] [-e MINOR] [-r] [-2 TYPE:PATH] [-s] [-t SECS] "
                  "[-D] [-C LOGPATH] [-c SLICE] [--supervise] [--export-tcp HOST:PORT "
                  "[--tls-creds DIR [--tls-verify-client] | --tls-psk FILE]]",
        """
        Create a VBD: allocate a minor, spawn a tapdisk, attach the minor to it and
        open the image on it; print the device path (see `allocate`). If a step fails,
        the earlier ones are undone: no tapdisk, minor or socket is left behind.

        An image that another VBD has open is refused with EBUSY (16) unless this open
        is read-only (-R) and the other VBD does not report itself read-write. The VBD
        is exported over NBD on the Unix socket <run-dir>/nbd<pid>.<minor>; use `list`
        to find the pid.

        Before creating, what dead tapdisks left in the run directory is removed
        (sockets, FUSE mounts, loop devices, tapdev links of minors no tapdisk
        holds; see `free`); their minors stay allocated until freed.
        """,
        """
supervision (--supervise):
  A supervisor process (one per VBD, no terminal, logging to syslog) starts the
  tapdisk and, when it dies (killed, crashed), starts a new one on the same minor,
  image and options, usually within a second. The NBD socket path of the first
  tapdisk, <run-dir>/nbd<first pid>.<minor>, stays valid: after a restart it is a
  symbolic link to the new tapdisk's nbd<pid>.<minor>. An NBD client that
  reconnects (qemu's reconnect-delay=SECS) sees no error and loses no acknowledged
  write; one that does not (nbdcopy) fails and can run again on the same path.
  A kernel block device gets a new loop device: a file
  system mounted on the old one must be mounted again. `list` shows the current pid
  (`list --json`: the supervisor, restarts and stable nbd_path); `destroy -p PID`
  accepts the first pid or any later one. A tapdisk that exits on purpose (last VBD
  detached, SIGTERM) is not restarted. The supervisor's state is
  <run-dir>/supervise<minor>.json, its lock <run-dir>/supervise<minor>.lock;
  `destroy` stops it and removes both.

examples:
  tap-ctl create -a aio:/srv/vm1.img
  tap-ctl create -R -a vhd:/srv/base.vhd
  tap-ctl create --supervise -a vhd:/srv/vm2.vhd
  tap-ctl create -t 5 -a fault:op=write,errno=EAGAIN,rate=0.1:aio:/srv/vm1.img
""" + "\n" + _IMAGE_STACK,
    )
    p.add_argument("-a", dest="image", required=True, metavar="TYPE:PATH",
                   help="the image, e.g. aio:/srv/disk.img or vhd:/srv/disk.vhd")
    p.add_argument("-d", dest="devname", metavar="DEV",
                   help="accepted for compatibility with the C tap-ctl; ignored")
    p.add_argument("-c", dest="slice", metavar="SLICE",
                   help="cgroup slice for the tapdisk: not supported, ignored with a warning")
    p.add_argument("--supervise", action="store_true",
                   help="restart the tapdisk on the same minor, image and NBD socket path "
                        "whenever it dies, until `destroy` (see below)")
    _open_flags(p)
    return p


def _ignored_slice(ns: argparse.Namespace) -> None:
    if getattr(ns, "slice", None):
        log.warning("cgroup slices are not supported; ignoring -c %s", ns.slice)


def _run_create(ctl: Control, ns: argparse.Namespace, out: IO[str]) -> int:
    _ignored_slice(ns)
    created = ctl.create(ns.image, _options(ns), supervised=ns.supervise)
    out.write(f"{created.device}\n")
    return 0


def _build_destroy() -> _Parser:
    p = _parser(
        "destroy", "-p PID -m MINOR [-t SECS]",
        """
        Destroy a VBD: close the image, detach the minor from the tapdisk (which exits
        when that was its last VBD) and free the minor. Stops at the first error.

        If tapdisk PID is dead but left its sockets here, the minor is freed as by
        `free -m MINOR`, with everything the tapdisk left (see `free`: a loop device
        with a file system still mounted stays until it is unmounted).
        """,
    )
    _pid_minor(p)
    p.add_argument("-t", dest="timeout", type=_seconds, metavar="SECS",
                   help="give up the close after SECS seconds (ETIMEDOUT, 110)")
    return p


def _run_destroy(ctl: Control, ns: argparse.Namespace, out: IO[str]) -> int:
    ctl.destroy(ns.pid, ns.minor, timeout=ns.timeout)
    return 0


def _build_spawn() -> _Parser:
    p = _parser(
        "spawn", "[-c SLICE]",
        f"""
        Start a tapdisk with no VBD and print its pid (on a terminal: "tapdisk spawned
        with pid N"). It runs until killed or until the last VBD attached to it is
        detached. The executable is ${TAPDISK_ENV}, else the tapdisk installed with
        tap-ctl, else tapdisk on $PATH.
        """,
    )
    p.add_argument("-c", dest="slice", metavar="SLICE",
                   help="cgroup slice: not supported, ignored with a warning")
    return p


def _run_spawn(ctl: Control, ns: argparse.Namespace, out: IO[str]) -> int:
    _ignored_slice(ns)
    pid = ctl.spawn()
    out.write(f"tapdisk spawned with pid {pid}\n" if out.isatty() else f"{pid}\n")
    return 0


def _build_attach() -> _Parser:
    p = _parser(
        "attach", "-p PID -m MINOR",
        """
        Add a VBD for an allocated minor to a tapdisk; the tapdisk then holds the minor
        (an exclusive lock on its marker). Fails with ENOENT if the minor is not
        allocated.
        """,
    )
    _pid_minor(p)
    return p


def _run_attach(ctl: Control, ns: argparse.Namespace, out: IO[str]) -> int:
    ctl.attach(ns.pid, ns.minor)
    return 0


def _build_detach() -> _Parser:
    p = _parser(
        "detach", "-p PID -m MINOR",
        """
        Remove a VBD from a tapdisk (EBUSY while an image is open on it). A tapdisk
        exits when its last VBD is detached. The minor stays allocated; see `free`.
        """,
    )
    _pid_minor(p)
    return p


def _run_detach(ctl: Control, ns: argparse.Namespace, out: IO[str]) -> int:
    ctl.detach(ns.pid, ns.minor)
    return 0


def _build_open() -> _Parser:
    p = _parser(
        "open", "-p PID -m MINOR -a TYPE:PATH [-R] [-e MINOR] [-r] [-2 TYPE:PATH] [-s] "
                "[-t SECS] [-D] [-C LOGPATH] [-E] [--export-tcp HOST:PORT "
                "[--tls-creds DIR [--tls-verify-client] | --tls-psk FILE]]",
        """
        Open an image on an attached VBD and export it (NBD socket
        <run-dir>/nbd<pid>.<minor>, and a kernel block device where the host allows).
        A missing image fails with ENOENT (2), an unknown image type with ENOENT too.
        """,
        _IMAGE_STACK,
    )
    _pid_minor(p)
    p.add_argument("-a", dest="image", required=True, metavar="TYPE:PATH",
                   help="the image, e.g. aio:/srv/disk.img")
    _open_flags(p)
    p.add_argument("-E", dest="encrypted", action="store_true",
                   help="read a 256- or 512-bit encryption key (32 or 64 bytes) from "
                        "standard input (OPEN_ENCRYPTED)")
    return p


def _run_open(ctl: Control, ns: argparse.Namespace, out: IO[str]) -> int:
    key = None
    if ns.encrypted:
        key = sys.stdin.buffer.read(1024)
        if len(key) not in (32, 64):
            raise _UsageError(
                f"-E: read a {len(key)}-byte key; use a 256-bit or 512-bit key (32 or 64 bytes)"
            )
    ctl.open(ns.pid, ns.minor, ns.image, _options(ns, key))
    return 0


def _build_close() -> _Parser:
    p = _parser(
        "close", "-p PID -m MINOR [-f] [-t SECS]",
        """
        Close the image of a VBD: stop its exports, wait for in-flight I/O and close the
        chain. The VBD stays attached (state 0x2).
        """,
    )
    _pid_minor(p)
    p.add_argument("-f", dest="force", action="store_true",
                   help="force: do not wait for in-flight I/O (FORCE_SHUTDOWN)")
    p.add_argument("-t", dest="timeout", type=_seconds, metavar="SECS",
                   help="give up after SECS seconds (ETIMEDOUT, 110)")
    return p


def _run_close(ctl: Control, ns: argparse.Namespace, out: IO[str]) -> int:
    ctl.close(ns.pid, ns.minor, force=ns.force, timeout=ns.timeout)
    return 0


def _build_pause() -> _Parser:
    p = _parser(
        "pause", "-p PID -m MINOR [-t SECS]",
        """
        Pause a VBD: stop taking new I/O, wait for in-flight requests and close the
        image chain, so that the image files may be snapshotted or replaced. I/O that
        arrives meanwhile waits. The VBD lists with state 0x2a. See `unpause`.
        """,
    )
    _pid_minor(p)
    p.add_argument("-t", dest="timeout", type=_seconds, metavar="SECS",
                   help="give up after SECS seconds (ETIMEDOUT, 110); the C tap-ctl "
                        "rejects -t, this one honours it")
    return p


def _run_pause(ctl: Control, ns: argparse.Namespace, out: IO[str]) -> int:
    ctl.pause(ns.pid, ns.minor, timeout=ns.timeout)
    return 0


def _build_unpause() -> _Parser:
    p = _parser(
        "unpause", "-p PID -m MINOR [-a TYPE:PATH] [-2 TYPE:PATH] [-c LOGPATH]",
        """
        Resume a paused VBD: reopen its image chain, or with -a a new leaf image (the
        live-snapshot primitive: pause, snapshot, unpause -a on the new leaf), and let
        waiting I/O proceed. The size must not change (EMEDIUMTYPE).
        """,
    )
    _pid_minor(p)
    p.add_argument("-a", dest="image", metavar="TYPE:PATH",
                   help="reopen on this image instead of the current one")
    p.add_argument("-2", dest="secondary", metavar="[SETTINGS:]TYPE:PATH",
                   help="secondary image to mirror writes to from now on (SECONDARY): "
                        "how a live VBD starts mirroring; SETTINGS as for create -2")
    p.add_argument("-c", dest="log_path", metavar="LOGPATH",
                   help="insert a log layer recording changed blocks in LOGPATH (ADD_LOG)")
    return p


def _run_unpause(ctl: Control, ns: argparse.Namespace, out: IO[str]) -> int:
    ctl.unpause(ns.pid, ns.minor, image=ns.image, secondary=ns.secondary,
                log_path=ns.log_path)
    return 0


def _build_stats() -> _Parser:
    p = _parser(
        "stats", "-p PID -m MINOR",
        """
        Print a VBD's statistics as JSON: name, secs [sectors read, written], images
        (leaf first; each name, hits [r, w], fail [r, w], driver {type, name, status}),
        reqs_outstanding, read_caching, FIXME_enospc_redirect_count, nbd_mirror_failed.
        Minor 65535 prints an array for every VBD of the tapdisk.
        """,
    )
    p.add_argument("-p", dest="pid", type=_PID, required=True, metavar="PID",
                   help="process id of the tapdisk")
    p.add_argument("-m", dest="minor", type=_int_arg("MINOR", 0, 0xFFFF), required=True,
                   metavar="MINOR", help="minor of the VBD; 65535 for all")
    return p


def _run_stats(ctl: Control, ns: argparse.Namespace, out: IO[str]) -> int:
    out.write(ctl.stats_text(ns.pid, ns.minor) + "\n")
    return 0


_INSTALL_MARK = "installed by tap-ctl install-tapdisk (blktap for Python)"


def _build_install() -> _Parser:
    p = _parser(
        "install-tapdisk", "[--prefix DIR | --target PATH] [--run-dir DIR] [--force] "
                           "[--uninstall]",
        """
        Make toolstacks that use the C libblktapctl (libxl's tap_ctl_create, xenopsd,
        SM) spawn this tapdisk. The C library runs $TAPDISK (or $TAPDISK2) if set, else
        <libexecdir>/tapdisk of its build: /usr/libexec/tapdisk in the XenServer and
        XCP-ng packages. This command writes a small executable shell script there that
        execs this installation's tapdisk ({tapdisk}). An existing file that is not
        such a script is kept as PATH.orig (only with --force); --uninstall puts it
        back. Older blktap2 builds (OpenXT) run `tapdisk2` from $PATH instead: use
        --target /usr/sbin/tapdisk2 for them, and --run-dir /var/run/blktap-control,
        since they expect the control socket path under /var/run.

        Without installing anything, exporting TAPDISK=<path of this tapdisk>
        (TAPDISK2 for older blktap2) in the toolstack's environment has the same effect.
        """.replace("{tapdisk}", _safe_binary()),
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--prefix", default="/usr", metavar="DIR",
                       help="install as DIR/libexec/tapdisk (default: /usr)")
    where.add_argument("--target", metavar="PATH", help="install exactly as PATH")
    p.add_argument("--run-dir", metavar="DIR",
                   help=f"set {paths.RUN_DIR_ENV} for the tapdisks the script starts")
    p.add_argument("--force", action="store_true",
                   help="replace an existing tapdisk (kept as PATH.orig)")
    p.add_argument("--uninstall", action="store_true",
                   help="remove the script and restore PATH.orig if there is one")
    return p


def _safe_binary() -> str:
    try:
        return tapdisk_binary()
    except BlktapError:
        return "not found"


def _run_install(ctl: Control, ns: argparse.Namespace, out: IO[str]) -> int:
    target = Path(ns.target) if ns.target else Path(ns.prefix) / "libexec" / "tapdisk"
    backup = target.with_name(target.name + ".orig")
    ours = target.is_file() and _INSTALL_MARK in target.read_text(errors="replace")
    if ns.uninstall:
        if not ours:
            raise BlktapError(f"{target} was not installed by tap-ctl", errno=errno.ENOENT)
        target.unlink()
        if backup.exists():
            backup.rename(target)
        out.write(f"{target}\n")
        return 0
    if (target.exists() or target.is_symlink()) and not ours:
        if not ns.force:
            raise BlktapError(f"{target} exists; use --force to replace it (kept as "
                              f"{backup.name})", errno=errno.EEXIST)
        target.rename(backup)
    binary = os.path.abspath(tapdisk_binary())
    lines = ["#!/bin/sh", f"# {_INSTALL_MARK}"]
    if ns.run_dir:
        lines.append(f"{paths.RUN_DIR_ENV}={shlex.quote(ns.run_dir)}; export {paths.RUN_DIR_ENV}")
    lines.append(f'exec {shlex.quote(binary)} "$@"')
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.chmod(0o755)
    tmp.replace(target)
    out.write(f"{target}\n")
    return 0


COMMANDS: dict[str, _Command] = {
    "list": _Command("list tapdisks, VBDs and minors", _build_list, _run_list),
    "allocate": _Command("reserve the lowest free minor", _build_allocate, _run_allocate),
    "free": _Command("release a minor", _build_free, _run_free),
    "create": _Command("allocate + spawn + attach + open", _build_create, _run_create),
    "destroy": _Command("close + detach + free", _build_destroy, _run_destroy),
    "spawn": _Command("start a tapdisk", _build_spawn, _run_spawn),
    "attach": _Command("add a VBD for a minor to a tapdisk", _build_attach, _run_attach),
    "detach": _Command("remove a VBD from a tapdisk", _build_detach, _run_detach),
    "open": _Command("open an image on a VBD", _build_open, _run_open),
    "close": _Command("close the image of a VBD", _build_close, _run_close),
    "pause": _Command("quiesce a VBD and close its chain", _build_pause, _run_pause),
    "unpause": _Command("reopen a paused VBD's chain", _build_unpause, _run_unpause),
    "stats": _Command("print a VBD's statistics (JSON)", _build_stats, _run_stats),
    "install-tapdisk": _Command(
        "make C toolstacks spawn this tapdisk", _build_install, _run_install
    ),
}


def _top_help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        f"usage: {PROG} COMMAND [OPTIONS] [--debug]",
        f"       {PROG} COMMAND -h",
        "",
        "Control tapdisk processes and their virtual block devices (VBDs): the command",
        "line of blktap for Python, compatible with the C tap-ctl.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()),
        "",
        "options:",
        "  -h, --help   show this help; COMMAND -h shows a command's",
        "  --version    show the version",
        "  --debug      log what is done on standard error (anywhere on the line)",
        "",
        _EXIT_STATUS,
        "",
        _ENVIRONMENT,
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ main


def _fail(code: int, text: str | None = None) -> int:
    if text:
        sys.stderr.write(f"{PROG}: {text}\n")
    sys.stderr.write(os.strerror(code) + "\n")
    return code if 0 < code < 256 else errno.EIO


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tap-ctl`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    # SIGTERM/SIGHUP interrupt like Ctrl-C, so that a half-done create is undone.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _dispatch(args)
    finally:
        for sig, handler_ in previous.items():
            signal.signal(sig, handler_)
        root.handlers[:], level = saved
        root.setLevel(level)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _dispatch(args: list[str]) -> int:
    if not args:
        sys.stderr.write(_top_help())
        return errno.EINVAL
    name = args[0]
    if name in ("-h", "--help", "help"):
        if name == "help" and len(args) > 1 and args[1] in COMMANDS:
            sys.stdout.write(COMMANDS[args[1]].build().format_help())
        else:
            sys.stdout.write(_top_help())
        return 0
    if name == "--version":
        sys.stdout.write(f"{PROG} (blktap for Python) {__version__}\n")
        return 0
    command = COMMANDS.get(name)
    if command is None:
        sys.stderr.write(f"{PROG}: unknown command {name!r}\n\n{_top_help()}")
        return errno.EINVAL
    parser = command.build()
    try:
        ns = parser.parse_args(args[1:])
        return command.run(Control(), ns, sys.stdout)
    except _Exit as exit_:
        return exit_.status
    except _UsageError as exc:
        sys.stderr.write(parser.format_usage())
        return _fail(errno.EINVAL, f"{name}: {exc}")
    except BlktapError as exc:
        return _fail(errno_of(exc), exc.message)
    except OSError as exc:
        return _fail(errno_of(exc), str(exc))
    except KeyboardInterrupt:
        return _fail(errno.EINTR)

if __name__ == "__main__":
    raise SystemExit(main())
