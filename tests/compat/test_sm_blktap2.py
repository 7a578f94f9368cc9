"""The storage manager's tapdisk wrapper (xapi-project/sm ``libs/sm/blktap2.py``) against us.

Each helper below builds exactly the ``tap-ctl`` command line that the storage manager's
``TapCtl`` class builds (the function is cited in each) and parses the output the way it
does: ``list`` lines split with ``split(' ', 3)``, ``key=value`` fields with pid and minor
in base 10 and state in base 16, ``Tapdisk.list`` keeping only rows with pid, minor, state
and ``args``; ``allocate``'s output matched against ``<run>/tapdisk/tapdisk-(N)$``;
``spawn``'s first line as an int; ``stats``' first line as JSON. The parsing is written
here from what that module does (it needs XenAPI and cannot be imported). The storage
manager hard-codes ``/usr/sbin/tap-ctl`` and ``/run/blktap-control``; the tests run our
``tap-ctl`` in a private run directory instead.

The live-snapshot test runs the sequence the storage manager drives on a running VDI:
the ``tapdisk-pause`` plugin's Pause and Unpause around ``vhd-util snapshot`` and
``vhd-util set -f hidden`` (``vhdutil.snapshot``/``setHidden``), then the garbage
collector's coalesce of a hidden parent with ``vhd-util coalesce`` and relink
(``cleanup.py``: ``_coalesceVHD``, ``_relinkSkip``, ``_reloadChildren``), with I/O
through the VBD's NBD socket between the steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import TAP_CTL, VHD_UTIL
from tests.system.test_tap_ctl import QEMU_IO, assert_clean, nbd_uri, qemu_io

MiB = 1 << 20
ENOENT, EWOULDBLOCK, EBUSY, EOPNOTSUPP = 2, 11, 16, 95

needs_qemu_io = pytest.mark.skipif(
    QEMU_IO is None, reason="qemu-io is not installed (scripts/setup.sh installs qemu-utils)"
)

# ------------------------------------------------------------ the storage manager's TapCtl


class CommandFailure(Exception):
    """``TapCtl.CommandFailure``: a non-zero exit, with its status and stderr lines."""

    def __init__(self, cmd: list[str], status: int, errmsg: str) -> None:
        super().__init__(f"{cmd} failed: status={status}, errmsg={errmsg}")
        self.cmd, self.status, self.errmsg = cmd, status, errmsg


def _call(args: list[object], stdin: bytes | None = None) -> tuple[list[str], str]:
    """``TapCtl._call`` + ``_wait``: ``[tap-ctl] + [str(x) for x in args]`` with all three
    standard streams on pipes; a non-zero status raises (``errmsg`` = stderr lines joined
    with "; ", as ``_errmsg``). Returns stdout's lines and the raw stderr."""
    cmd = [TAP_CTL, *(str(a) for a in args)]
    proc = subprocess.run(cmd, input=stdin if stdin is not None else b"", capture_output=True,
                          timeout=180)
    out = proc.stdout.decode()
    err = proc.stderr.decode()
    if proc.returncode != 0:
        raise CommandFailure(cmd, proc.returncode, "; ".join(x.rstrip() for x in err.splitlines()))
    return out.splitlines(keepends=True), err


def _pread(args: list[object], stdin: bytes | None = None) -> str:
    """``TapCtl._pread``: the first line of stdout, right-stripped."""
    lines, _ = _call(args, stdin)
    return lines[0].rstrip() if lines else ""


def _maybe(opt: str, parm: object) -> list[object]:
    """``TapCtl._maybe``."""
    return [opt, parm] if parm is not None else []


def tap_list(minor: int | None = None, pid: int | None = None, type_: str | None = None,
             path: str | None = None) -> list[dict[str, Any]]:
    """``TapCtl.__list``: ``list [-m MINOR] [-p PID] [-t TYPE] [-f PATH]``, in that order,
    each line parsed into a row dict."""
    args: list[object] = ["list"]
    args += _maybe("-m", minor) + _maybe("-p", pid) + _maybe("-t", type_) + _maybe("-f", path)
    lines, _ = _call(args)
    rows = []
    for line in lines:
        row: dict[str, Any] = {}
        for field in line.rstrip().split(" ", 3):
            bits = field.split("=")
            if len(bits) != 2:
                raise AssertionError(f"SM would log 'unexpected tap-ctl output': {field!r}")
            key, val = bits
            if key in ("pid", "minor"):
                row[key] = int(val, 10)
            elif key in "state":  # sic: SM writes ('state'), a string, not a tuple
                row[key] = int(val, 0x10)
            else:
                row[key] = val
        rows.append(row)
    return rows


def allocate(run_dir: str) -> int:
    """``Blktap.allocate``: ``allocate``, then ``Tapdisk._parse_minor`` on the printed path
    (SM's TAP_MINOR_BASE is /run/blktap-control/tapdisk; here the private run dir's)."""
    devname = _pread(["allocate"])
    pattern = re.escape(f"{run_dir}/tapdisk") + r"/tapdisk-(\d+)$"
    match = re.search(pattern, devname)
    assert match, f"SM: malformed tap device: {devname!r}"
    return int(match.group(1))


def free(minor: int) -> None:
    """``TapCtl.free``."""
    _pread(["free", "-m", minor])


def spawn() -> int:
    """``TapCtl.spawn``: the first line as an int."""
    return int(_pread(["spawn"]))


def attach(pid: int, minor: int) -> None:
    """``TapCtl.attach``."""
    _pread(["attach", "-p", pid, "-m", minor])


def detach(pid: int, minor: int) -> None:
    """``TapCtl.detach``."""
    _pread(["detach", "-p", pid, "-m", minor])


def tap_open(pid: int, minor: int, type_: str, file: str, options: dict[str, Any],
             key: bytes | None = None) -> None:
    """``TapCtl.open``: the options in SM's order (-R, -r, -e, -2, -s, -t, -D, -C, -E)."""
    args: list[object] = ["open", "-p", pid, "-m", minor, "-a", f"{type_}:{file}"]
    if options.get("rdonly"):
        args.append("-R")
    if options.get("lcache"):
        args.append("-r")
    if options.get("existing_prt") is not None:
        args += ["-e", str(options["existing_prt"])]
    if options.get("secondary"):
        args += ["-2", options["secondary"]]
    if options.get("standby"):
        args.append("-s")
    if options.get("timeout"):
        args += ["-t", str(options["timeout"])]
    if not options.get("o_direct", True):
        args.append("-D")
    if options.get("cbtlog"):
        args += ["-C", options["cbtlog"]]
    if key is not None:
        args.append("-E")
    _pread(args, key)


def close(pid: int, minor: int, force: bool = False) -> None:
    """``TapCtl.close``: always ``-t 120``, then ``-f`` if forced."""
    args: list[object] = ["close", "-p", pid, "-m", minor, "-t", "120"]
    if force:
        args += ["-f"]
    _pread(args)


def pause(pid: int, minor: int) -> None:
    """``TapCtl.pause``."""
    _pread(["pause", "-p", pid, "-m", minor])


def unpause(pid: int, minor: int, type_: str | None = None, file: str | None = None,
            mirror: str | None = None, cbtlog: str | None = None) -> None:
    """``TapCtl.unpause``: ``-2`` before ``-a``, ``-c`` last."""
    args: list[object] = ["unpause", "-p", pid, "-m", minor]
    if mirror:
        args += ["-2", mirror]
    if type_ and file:
        args += ["-a", f"{type_}:{file}"]
    if cbtlog:
        args += ["-c", cbtlog]
    _pread(args)


def stats(pid: int, minor: int) -> Any:
    """``Tapdisk.stats``: ``json.loads`` of ``TapCtl.stats``' first line."""
    return json.loads(_pread(["stats", "-p", pid, "-m", minor]))


# ------------------------------------------------------------ the storage manager's Tapdisk

TYPES = ("aio", "vhd")  # Tapdisk.TYPES
PAUSED, PAUSE_REQUESTED = 0x20, 0x10  # Tapdisk.Flags


@dataclass(frozen=True)
class Tapdisk:
    """``blktap2.Tapdisk`` as ``Tapdisk.list`` builds it."""

    pid: int
    minor: int
    type: str
    path: str
    state: int

    def is_paused(self) -> bool:
        return bool(self.state & PAUSED)

    def is_running(self) -> bool:
        return not self.state & (PAUSE_REQUESTED | PAUSED)


def tapdisks(**args: Any) -> list[Tapdisk]:
    """``Tapdisk.list``: rows lacking any of pid, minor, state or args are skipped; args
    is split at the first colon and its type must be one of ``Tapdisk.TYPES``."""
    out = []
    for row in tap_list(**args):
        if "args" not in row or not {"pid", "minor", "state"} <= set(row):
            continue
        type_, path = row["args"].split(":", 1)
        assert type_ in TYPES, f"SM: Not a Tapdisk type: {type_}"
        out.append(Tapdisk(row["pid"], row["minor"], type_, path, row["state"]))
    return out


def find(**args: Any) -> Tapdisk | None:
    """``Tapdisk.find``: at most one match (``TapdiskNotUnique`` otherwise)."""
    found = tapdisks(**args)
    assert len(found) <= 1, f"SM: Found multiple tapdisks: {found}"
    return found[0] if found else None


# ------------------------------------------------------------------------------ fixtures


def vhd_util(*args: str) -> str:
    proc = subprocess.run([VHD_UTIL, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (args, proc.returncode, proc.stderr)
    return proc.stdout


@dataclass
class Launched:
    pid: int
    minor: int


@pytest.fixture
def sm_run_dir(run_dir: str) -> Iterator[str]:
    """``run_dir`` that must be left clean: no tapdisk, socket or marker."""
    yield run_dir
    assert_clean(run_dir)


def launch(run_dir: str, type_: str, path: str, options: dict[str, Any]) -> Launched:
    """``VDI._tap_activate`` → ``Blktap.allocate`` + ``Tapdisk.launch_on_tap``: refuse a
    path some tapdisk already serves, then spawn, attach, open; undo on failure."""
    assert find(path=path) is None, "SM: TapdiskExists"
    minor = allocate(run_dir)
    try:
        pid = spawn()
        try:
            attach(pid, minor)
            try:
                tap_open(pid, minor, type_, path, options)
            except BaseException:
                detach(pid, minor)
                raise
        except BaseException:
            _shutdown_pid(pid)
            raise
    except BaseException:
        free(minor)
        raise
    return Launched(pid, minor)


def _shutdown_pid(pid: int) -> None:
    """``TapCtl.shutdown`` sends SIGTERM (its waitpid fails for a daemonized tapdisk)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def shutdown(tap: Tapdisk | Launched, force: bool = False) -> None:
    """``Tapdisk.shutdown``: close, detach, free."""
    close(tap.pid, tap.minor, force)
    detach(tap.pid, tap.minor)
    free(tap.minor)


# ------------------------------------------------------------------------- step by step


@needs_qemu_io
def test_launch_step_by_step_with_list_after_each_step(sm_run_dir: str, tmp_path: Path) -> None:
    img = str(tmp_path / "a.vhd")
    vhd_util("create", "--debug", "-n", img, "-s", "16")  # vhdutil.create
    assert tap_list() == []

    minor = allocate(sm_run_dir)
    assert tap_list() == [{"minor": minor}]
    assert tapdisks() == []

    pid = spawn()
    assert tap_list() == [{"pid": pid}, {"minor": minor}]  # tapdisks, then orphan minors

    attach(pid, minor)
    # Attached, never opened: state 0 and no args, so Tapdisk.list skips it.
    assert tap_list() == [{"pid": pid, "minor": minor, "state": 0}]
    assert tap_list(minor=minor) == [{"pid": pid, "minor": minor, "state": 0}]
    assert find(path=img) is None and find(minor=minor) is None

    tap_open(pid, minor, "vhd", img, {"rdonly": False, "o_direct": False})
    running = Tapdisk(pid, minor, "vhd", img, 0)
    assert tap_list() == [{"pid": pid, "minor": minor, "state": 0, "args": f"vhd:{img}"}]
    assert find(path=img) == running  # Tapdisk.find_by_path (launch's TapdiskExists check)
    assert find(minor=minor) == running  # Tapdisk.from_minor
    assert find(pid=pid, minor=minor) == running  # Blktap.find_tapdisk
    assert running.is_running()

    uri = nbd_uri(sm_run_dir, pid, minor)
    qemu_io(uri, f"write -P 0x5a 0 {MiB}")
    # VDI.linkNBD links <run>/nbd/<sr>/<vdi> to nbd<pid>.<minor>; the tapdisk-pause plugin
    # reads the minor back (NBDLink.read_minor_from_path) and _is_tapdisk_in_use matches
    # open sockets against ^/.*/nbd\d+\.<minor>.
    link = tmp_path / "nbd" / "sr" / "vdi"
    link.parent.mkdir(parents=True)
    link.symlink_to(f"{sm_run_dir}/nbd{pid}.{minor}")
    match = re.search(r".*/nbd\d+.(\d+)$", os.path.realpath(link))
    assert match is not None and int(match.group(1)) == minor
    assert re.match(r"^/.*/nbd\d+\." + str(minor), os.path.realpath(link))
    doc = stats(pid, minor)
    # What tapdisk-cache-stats reads: images[-1] name and driver name, hits, secs,
    # FIXME_enospc_redirect_count.
    assert doc["images"][-1]["name"] == img
    assert doc["images"][-1]["driver"]["name"] == "vhd"
    assert doc["images"][0]["hits"][1] > 0  # in sectors, as in C (see the test below)
    assert doc["secs"] == [0, MiB // 512]
    assert doc["FIXME_enospc_redirect_count"] == 0
    assert {"name", "reqs_outstanding", "read_caching", "nbd_mirror_failed"} <= set(doc)

    pause(pid, minor)  # Tapdisk.pause (after its is_running check)
    paused = find(minor=minor)
    # Still listed with args: the tapdisk-pause plugin's Unpause finds it by minor and
    # reopens on its type and path.
    assert paused == Tapdisk(pid, minor, "vhd", img, 0x2A)
    assert paused.is_paused() and not paused.is_running()

    unpause(pid, minor, paused.type, paused.path)  # Tapdisk.unpause
    assert find(minor=minor) == running
    qemu_io(uri, f"read -P 0x5a 0 {MiB}")

    close(pid, minor)
    # Closed: CLOSED bit, no args: no longer found by path, so a new activate of the
    # image launches a new tapdisk instead of reusing this one or refusing.
    assert tap_list() == [{"pid": pid, "minor": minor, "state": 0x2}]
    assert find(path=img) is None and find(minor=minor) is None

    detach(pid, minor)  # the tapdisk exits with its last VBD
    assert tap_list() == [{"minor": minor}]
    free(minor)
    assert tap_list() == []


@needs_qemu_io
def test_stats_image_hits_count_sectors(sm_run_dir: str, tmp_path: Path) -> None:
    img = str(tmp_path / "h.vhd")
    vhd_util("create", "--debug", "-n", img, "-s", "4")
    tap = launch(sm_run_dir, "vhd", img, {})
    try:
        qemu_io(nbd_uri(sm_run_dir, tap.pid, tap.minor), f"write -P 1 0 {MiB}", f"read 0 {MiB}")
        doc = stats(tap.pid, tap.minor)
        assert doc["secs"] == [MiB // 512, MiB // 512]
        assert doc["images"][0]["hits"] == doc["secs"]
    finally:
        shutdown(tap)


def test_launch_and_shutdown(sm_run_dir: str, tmp_path: Path) -> None:
    img = tmp_path / "b.raw"
    img.write_bytes(b"")
    os.truncate(img, 8 * MiB)
    # open ... -R -t 30 -D: a request timeout is accepted (no failed request is retried
    # here, so there is nothing for it to bound).
    launched = launch(sm_run_dir, "aio", str(img),
                      {"rdonly": True, "timeout": 30, "o_direct": False})
    tap = find(path=str(img))
    assert tap == Tapdisk(launched.pid, launched.minor, "aio", str(img), 0)
    with pytest.raises(AssertionError, match="TapdiskExists"):
        launch(sm_run_dir, "aio", str(img), {"rdonly": True})
    shutdown(tap, force=True)  # close -t 120 -f, detach, free
    assert tap_list() == []


def test_list_filters(sm_run_dir: str, tmp_path: Path) -> None:
    raw = tmp_path / "c.raw"
    raw.write_bytes(b"")
    os.truncate(raw, 4 * MiB)
    vhd = str(tmp_path / "c.vhd")
    vhd_util("create", "--debug", "-n", vhd, "-s", "4")
    a = launch(sm_run_dir, "aio", str(raw), {})
    b = launch(sm_run_dir, "vhd", vhd, {})
    orphan = allocate(sm_run_dir)
    try:
        # As the C tap-ctl, -t and -f drop only rows whose type/path differ: rows with
        # no image (an orphan minor) pass, and Tapdisk.list then skips them.
        assert {"minor": orphan} in tap_list(path=vhd)
        assert [t.minor for t in tapdisks(path=vhd)] == [b.minor]
        assert [t.minor for t in tapdisks(type_="aio")] == [a.minor]
        assert [t.minor for t in tapdisks(type_="vhd", path=str(raw))] == []
        assert tap_list(minor=a.minor) == [
            {"pid": a.pid, "minor": a.minor, "state": 0, "args": f"aio:{raw}"}]
        assert tap_list(pid=b.pid) == [
            {"pid": b.pid, "minor": b.minor, "state": 0, "args": f"vhd:{vhd}"}]
        assert tap_list(pid=b.pid, minor=a.minor) == []
        # list -p of a pid that is no tapdisk: nothing, and success.
        assert tap_list(pid=os.getpid()) == []
    finally:
        free(orphan)
        shutdown(a)
        shutdown(b)


# --------------------------------------------------------------------------------- errors


def test_open_failures_leave_a_vbd_sm_can_undo(sm_run_dir: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.vhd")
    with pytest.raises(CommandFailure) as failure:
        launch(sm_run_dir, "vhd", missing, {})
    assert failure.value.status == ENOENT  # launch_on_tap reports TapdiskFailed(status 2)
    assert failure.value.cmd[1] == "open" and failure.value.errmsg
    assert tap_list() == []  # launch's undo (detach, free) left nothing


def test_free_of_an_attached_minor_fails(sm_run_dir: str) -> None:
    minor = allocate(sm_run_dir)
    pid = spawn()
    attach(pid, minor)
    with pytest.raises(CommandFailure) as failure:
        free(minor)
    assert failure.value.status == EWOULDBLOCK
    with pytest.raises(CommandFailure) as busy:
        attach(pid, minor)
    assert busy.value.status == 17  # EEXIST: already attached
    detach(pid, minor)
    free(minor)


# The options SM passes for features not built yet (IntelliCache's local cache and shared
# parent, encryption): tapdisk refuses each with EOPNOTSUPP and says which feature, and
# the VBD stays attached and unopened, so that launch_on_tap's undo (detach) works.
UNSUPPORTED_OPEN = [
    ({"lcache": True}, "local read cache"),
    ({"existing_prt": 0}, "shared parent chain"),
]


@pytest.mark.parametrize("standby", [False, True], ids=["mirror", "standby"])
def test_open_with_a_missing_secondary_fails_enoent(
        sm_run_dir: str, tmp_path: Path, standby: bool) -> None:
    img = str(tmp_path / "d.vhd")
    vhd_util("create", "--debug", "-n", img, "-s", "4")
    minor = allocate(sm_run_dir)
    pid = spawn()
    attach(pid, minor)
    try:
        with pytest.raises(CommandFailure) as failure:
            tap_open(pid, minor, "vhd", img,
                     {"secondary": "vhd:/nonexistent/secondary.vhd", "standby": standby})
        assert failure.value.status == 2  # ENOENT
        assert tap_list(minor=minor) == [{"pid": pid, "minor": minor, "state": 0}]
    finally:
        detach(pid, minor)
        free(minor)


@pytest.mark.parametrize(("options", "feature"), UNSUPPORTED_OPEN,
                         ids=[f for _o, f in UNSUPPORTED_OPEN])
def test_open_options_not_built_are_refused(
        sm_run_dir: str, tmp_path: Path, options: dict[str, Any], feature: str) -> None:
    img = str(tmp_path / "d.vhd")
    vhd_util("create", "--debug", "-n", img, "-s", "4")
    minor = allocate(sm_run_dir)
    pid = spawn()
    attach(pid, minor)
    try:
        with pytest.raises(CommandFailure) as failure:
            tap_open(pid, minor, "vhd", img, options)
        assert failure.value.status == EOPNOTSUPP
        assert feature in failure.value.errmsg
        assert tap_list(minor=minor) == [{"pid": pid, "minor": minor, "state": 0}]
    finally:
        detach(pid, minor)
        free(minor)


def test_encrypted_open_is_refused(sm_run_dir: str, tmp_path: Path) -> None:
    img = str(tmp_path / "e.vhd")
    vhd_util("create", "--debug", "-n", img, "-s", "4")
    minor = allocate(sm_run_dir)
    pid = spawn()
    attach(pid, minor)
    try:
        with pytest.raises(CommandFailure) as failure:
            tap_open(pid, minor, "vhd", img, {}, key=bytes(range(32)))  # key_hash → -E
        assert failure.value.status == EOPNOTSUPP
        assert "encryption" in failure.value.errmsg
    finally:
        detach(pid, minor)
        free(minor)


def test_unpause_onto_a_missing_mirror_fails_and_is_not_kept(
        sm_run_dir: str, tmp_path: Path) -> None:
    img = str(tmp_path / "f.vhd")
    vhd_util("create", "--debug", "-n", img, "-s", "4")
    tap = launch(sm_run_dir, "vhd", img, {})
    pause(tap.pid, tap.minor)
    with pytest.raises(CommandFailure) as failure:
        unpause(tap.pid, tap.minor, "vhd", img, mirror="vhd:/nonexistent/m.vhd")
    assert failure.value.status == 2  # ENOENT, after the resume's tries
    unpause(tap.pid, tap.minor, "vhd", img)
    assert find(minor=tap.minor) == Tapdisk(tap.pid, tap.minor, "vhd", img, 0)
    shutdown(tap)


def test_detach_while_open_is_ebusy(sm_run_dir: str, tmp_path: Path) -> None:
    img = str(tmp_path / "g.vhd")
    vhd_util("create", "--debug", "-n", img, "-s", "4")
    tap = launch(sm_run_dir, "vhd", img, {})
    with pytest.raises(CommandFailure) as failure:
        detach(tap.pid, tap.minor)
    assert failure.value.status == EBUSY
    shutdown(tap)


# -------------------------------------------------------------------------- live snapshot


def plugin_pause(minor: int) -> Tapdisk:
    """tapdisk-pause's ``Pause``: ``Tapdisk.get(minor=)`` then ``Tapdisk.pause`` (which
    checks ``is_running`` first); returns the refreshed, paused Tapdisk."""
    tap = find(minor=minor)
    assert tap is not None and tap.is_running(), "SM: TapdiskInvalidState"
    pause(tap.pid, tap.minor)
    paused = find(minor=minor)
    assert paused is not None and paused.is_paused()
    return paused


def plugin_unpause(minor: int, type_: str | None = None, path: str | None = None) -> Tapdisk:
    """tapdisk-pause's ``Unpause``: ``Tapdisk.get(minor=)``, then ``Tapdisk.unpause`` with
    the type and path given (``_pathRefresh``'s) or else the listed ones: SM always passes
    ``-a``."""
    tap = find(minor=minor)
    assert tap is not None and tap.is_paused(), "SM: TapdiskInvalidState"
    unpause(tap.pid, tap.minor, type_ or tap.type, path or tap.path)
    resumed = find(minor=minor)
    assert resumed is not None and resumed.is_running()
    return resumed


def get_hidden(path: str) -> int:
    """``vhdutil.getHidden``."""
    return int(vhd_util("query", "--debug", "-f", "-n", path).split(":")[-1].strip())


def get_parent(path: str) -> str | None:
    """``vhdutil.getParent`` (with the identity as extractUuidFunction)."""
    out = vhd_util("query", "--debug", "-p", "-n", path)
    return None if "no parent" in out else out.strip()


def coalesce(path: str) -> int:
    """``vhdutil.coalesce``: sectors coalesced, from "Coalesced N sectors" (else 0)."""
    match = re.match(r"^Coalesced (\d+) sectors", vhd_util("coalesce", "--debug", "-n", path))
    return int(match.group(1)) if match else 0


@needs_qemu_io
def test_live_snapshot_and_coalesce(sm_run_dir: str, tmp_path: Path) -> None:
    base, leaf1, leaf2 = (str(tmp_path / n) for n in ("base.vhd", "leaf1.vhd", "leaf2.vhd"))
    vhd_util("create", "--debug", "-n", base, "-s", "16")  # vhdutil.create(path, 16M, False)
    tap = launch(sm_run_dir, "vhd", base, {"rdonly": False, "o_direct": True})
    uri = nbd_uri(sm_run_dir, tap.pid, tap.minor)
    try:
        qemu_io(uri, f"write -P 0xa1 0 {MiB}", f"write -P 0xa1 {4 * MiB} 512")

        # Snapshot 1: pause, snapshot the leaf, hide the old leaf, unpause on the new one.
        plugin_pause(tap.minor)
        vhd_util("snapshot", "--debug", "-n", leaf1, "-p", base)  # vhdutil.snapshot
        vhd_util("set", "--debug", "-n", base, "-f", "hidden", "-v", "1")  # setHidden
        assert get_hidden(base) == 1 and get_parent(leaf1) == base
        assert plugin_unpause(tap.minor, "vhd", leaf1).path == leaf1
        qemu_io(uri, f"write -P 0xb2 {2 * MiB} {MiB}", f"write -P 0xb2 {4 * MiB + 256} 256")

        # Snapshot 2: the chain becomes leaf2 -> leaf1 (hidden) -> base (hidden).
        plugin_pause(tap.minor)
        vhd_util("snapshot", "--debug", "-n", leaf2, "-p", leaf1)
        vhd_util("set", "--debug", "-n", leaf1, "-f", "hidden", "-v", "1")
        plugin_unpause(tap.minor, "vhd", leaf2)
        qemu_io(uri, f"write -P 0xc3 {6 * MiB} {MiB}", f"write -P 0xc3 {2 * MiB} 4096")
        chain = [i["name"] for i in stats(tap.pid, tap.minor)["images"]]
        assert chain == [leaf2, leaf1, base]

        # The garbage collector coalesces the hidden leaf1 into base while the VBD runs
        # (_coalesceVHD), relinks leaf2 onto base (_relinkSkip: vhdutil.setParent), then
        # refreshes the running VDI (_reloadChildren: Pause, Unpause) and deletes leaf1.
        # leaf1 holds 1 MiB at 2 MiB and the sector the 256-byte write went to.
        assert coalesce(leaf1) == MiB // 512 + 1
        vhd_util("modify", "--debug", "-p", os.path.normpath(base), "-n", leaf2)
        plugin_pause(tap.minor)
        plugin_unpause(tap.minor)
        os.unlink(leaf1)
        assert [i["name"] for i in stats(tap.pid, tap.minor)["images"]] == [leaf2, base]

        # Every write, through the chain as it is now.
        qemu_io(uri,
                f"read -P 0xa1 0 {MiB}", f"read -P 0 {MiB} {MiB}",
                f"read -P 0xc3 {2 * MiB} 4096", f"read -P 0xb2 {2 * MiB + 4096} {MiB - 4096}",
                f"read -P 0xa1 {4 * MiB} 256", f"read -P 0xb2 {4 * MiB + 256} 256",
                f"read -P 0 {5 * MiB} {MiB}", f"read -P 0xc3 {6 * MiB} {MiB}",
                f"read -P 0 {7 * MiB} {9 * MiB}")
    finally:
        found = find(minor=tap.minor)
        if found is not None:
            shutdown(found)
        else:  # not listed with args (e.g. a failed unpause): undo by hand
            with contextlib.suppress(CommandFailure):
                close(tap.pid, tap.minor, True)
            with contextlib.suppress(CommandFailure):
                detach(tap.pid, tap.minor)
            with contextlib.suppress(CommandFailure):
                free(tap.minor)
    # base alone now holds the coalesced data of leaf1 (read with qemu's vpc driver,
    # which does not follow parents).
    assert QEMU_IO is not None
    proc = subprocess.run(
        [QEMU_IO, "-r", "-f", "vpc", "-c", f"read -P 0xa1 0 {MiB}",
         "-c", f"read -P 0xb2 {2 * MiB} {MiB}", "-c", f"read -P 0xb2 {4 * MiB + 256} 256",
         base], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "fail" not in proc.stdout.lower(), proc.stdout + proc.stderr


@needs_qemu_io
def test_live_snapshot_of_a_raw_vdi(sm_run_dir: str, tmp_path: Path) -> None:
    """A raw VDI (aio) snapshotted while running: vhdutil.snapshot with a raw parent
    (``-m``), then Unpause on the new VHD leaf: the type changes from aio to vhd."""
    raw, leaf = str(tmp_path / "raw.img"), str(tmp_path / "leaf.vhd")
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
    tap = launch(sm_run_dir, "aio", raw, {"rdonly": False})
    uri = nbd_uri(sm_run_dir, tap.pid, tap.minor)
    try:
        qemu_io(uri, f"write -P 0x11 0 {MiB}")
        plugin_pause(tap.minor)
        vhd_util("snapshot", "--debug", "-n", leaf, "-p", raw, "-m")
        resumed = plugin_unpause(tap.minor, "vhd", leaf)
        assert (resumed.type, resumed.path) == ("vhd", leaf)
        qemu_io(uri, f"write -P 0x22 {MiB} {MiB}")
        qemu_io(uri, f"read -P 0x11 0 {MiB}", f"read -P 0x22 {MiB} {MiB}",
                f"read -P 0 {2 * MiB} {6 * MiB}")
        images = stats(tap.pid, tap.minor)["images"]
        assert [(i["name"], i["driver"]["name"]) for i in images] == [(leaf, "vhd"), (raw, "aio")]
    finally:
        shutdown(tap)
    with open(raw, "rb") as f:  # the raw parent was not written after the snapshot
        assert f.read(2 * MiB) == b"\x11" * MiB + bytes(MiB)
