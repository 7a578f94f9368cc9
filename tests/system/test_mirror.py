"""The secondary image end to end (``tap-ctl create -2``, ``unpause -2``, ``-s``): the mirror
layer (blktap.block.layers.mirror) between real tapdisks, qemu-nbd and fio.

* fio with crc32c verify through a mirrored VBD whose secondary is qemu-nbd's export of a
  file: afterwards the secondary equals the primary byte for byte.
* The secondary's server killed in the middle of the writes and started again: the VBD
  keeps serving, STATS shows ``degraded`` with missed blocks (and ``nbd_mirror_failed``
  1), then ``in_sync`` (``nbd_mirror_failed`` still 1, as in C); the secondary equals the
  primary.
* Standby (``-s``): the fault layer makes the primary answer ENOSPC; the writes go to
  the secondary (an empty VHD) from then on, reads of older data still come from the
  primary.
* Live storage migration: a tapdisk on "host A" (its own run directory) serves a disk
  holding data while fio writes; a tapdisk on "host B" (another run directory) exports
  an empty image on a Unix socket, or over TCP with TLS on the loopback address
  (``--export-tcp --tls-creds``; A's secondary is ``nbd:nbds://...?tls-certificates=``
  with the CA's certificate); A is paused and unpaused with ``-2 copy=allocated:nbd:B``; the
  background copy runs; B's tapdisk is killed and started again in the middle; A
  reaches ``in_sync``; A is paused; B's export equals A's image byte for byte. STATS
  reports the progress throughout.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blktap.block.layers.mirror import BLOCK, COPY_RUN, BlockMap
from tests.helpers import TAP_CTL, VHD_UTIL, short_tempdir
from tests.interop.test_nbd_tls import Creds, free_port
from tests.system.test_tap_ctl import assert_clean, ok, parse_list

MiB = 1 << 20
SIZE = 64 * MiB

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("fio", "qemu-nbd", "qemu-img")),
    reason="needs fio, qemu-nbd and qemu-img (scripts/setup.sh installs them)")


# --------------------------------------------------------------------------- helpers
def tapctl_env(run_dir: str | None, *args: str) -> str:
    """``tap-ctl ARGS`` in ``run_dir`` (None: the test's own, from the environment)."""
    env = dict(os.environ)
    if run_dir is not None:
        env["BLKTAP_RUN_DIR"] = run_dir
        env["BLKTAP_DEV_DIR"] = os.path.join(run_dir, "dev")
    proc = subprocess.run([TAP_CTL, *args], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, (args, proc.returncode, proc.stderr)
    return proc.stdout


def create(img: str, *flags: str, run_dir: str | None = None,
           image_type: str = "aio") -> tuple[int, int]:
    device = tapctl_env(run_dir, "create", "-a", f"{image_type}:{img}", *flags).strip()
    minor = int(device.rsplit("-", 1)[1])
    (entry,) = [e for e in parse_list(tapctl_env(run_dir, "list", "-m", str(minor)))
                if "pid" in e]
    return int(entry["pid"]), minor


def stats(pid: int, minor: int, run_dir: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        tapctl_env(run_dir, "stats", "-p", str(pid), "-m", str(minor)))
    return doc


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def mirror_state(pid: int, minor: int, run_dir: str | None = None) -> dict[str, Any]:
    doc = stats(pid, minor, run_dir)
    mirror: dict[str, Any] = doc["mirror"]
    # Sticky, as in C: 1 from the first degradation on (in sync again included).
    assert doc["nbd_mirror_failed"] == (1 if mirror["degraded_count"] else 0)
    if mirror["state"] == "degraded":
        assert doc["nbd_mirror_failed"] == 1
    return mirror


def raw_file(path: Path, size: int = SIZE) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def same_bytes(a: str, b: str) -> bool:
    return subprocess.run(["cmp", "-s", a, b], timeout=120).returncode == 0


class Server:
    """qemu-nbd processes serving one image on one socket, one after the other."""

    def __init__(self, image: str, sock: str) -> None:
        self.image, self.sock = image, sock
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        sock = self.sock
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        self.procs.append(subprocess.Popen(
            ["qemu-nbd", "-f", "raw", "-t", "-e", "8", "--cache=writeback", "-k", sock,
             self.image], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for("qemu-nbd's socket", lambda: os.path.exists(sock), 20)

    def kill(self) -> None:
        """kill -9 the running server (by its pid)."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(10)


@contextlib.contextmanager
def qemu_nbd(image: str, sock: str) -> Iterator[Server]:
    """qemu-nbd serving ``image`` (raw) on ``sock``; killed afterwards."""
    server = Server(image, sock)
    server.start()
    try:
        yield server
    finally:
        server.kill()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)


def fio(uri: str, *args: str, cwd: Path, name: str = "mirror") -> subprocess.Popen[bytes]:
    """fio on ``uri``, run in ``cwd`` (where it leaves its verify state files)."""
    return subprocess.Popen(
        ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
         *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)


def finish(proc: subprocess.Popen[bytes], timeout: float = 300) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err.decode()[-2000:]
    doc: dict[str, Any] = json.loads(out[out.index(b"{"):])
    assert all(job["error"] == 0 for job in doc["jobs"]), doc["jobs"]
    return doc


def export_uri(run_dir: str, pid: int, minor: int) -> str:
    return f"nbd+unix:///?socket={run_dir}/nbd{pid}.{minor}"


# ----------------------------------------------------------------------------- tests
def test_fio_verify_through_a_mirror_then_the_secondary_equals_the_primary(
        run_dir: str, tmp_path: Path) -> None:
    primary = raw_file(tmp_path / "primary.raw")
    secondary = raw_file(tmp_path / "secondary.raw")
    sock = os.path.join(run_dir, "sec.sock")
    with qemu_nbd(secondary, sock):
        pid, minor = create(primary, "-2", f"nbd:{sock}")
        assert mirror_state(pid, minor)["state"] == "in_sync"
        finish(fio(export_uri(run_dir, pid, minor), "--rw=randwrite", "--bs=4k",
                   "--iodepth=16", "--size=32M", "--offset=8M", "--verify=crc32c",
                   "--do_verify=1", "--randseed=3", cwd=tmp_path))
        finish(fio(export_uri(run_dir, pid, minor), "--rw=write", "--bs=1M",
                   "--iodepth=4", "--size=8M", "--verify=crc32c", "--randseed=4",
                   name="seq", cwd=tmp_path))
        state = mirror_state(pid, minor)
        assert state["state"] == "in_sync" and state["dirty_blocks"] == 0, state
        doc = stats(pid, minor)
        assert doc["secs"][1] >= (40 * MiB) >> 9
        ok("destroy", "-p", str(pid), "-m", str(minor))
    assert same_bytes(primary, secondary)
    with open(secondary, "rb") as f:
        assert any(f.read(MiB))  # the comparison is not between two empty files
    assert_clean(run_dir)


def test_secondary_killed_and_restarted_the_mirror_records_and_resyncs(
        run_dir: str, tmp_path: Path) -> None:
    primary = raw_file(tmp_path / "primary.raw")
    secondary = raw_file(tmp_path / "secondary.raw")
    sock = os.path.join(run_dir, "sec.sock")
    with qemu_nbd(secondary, sock) as server:
        pid, minor = create(primary, "-2", f"timeout=1:nbd:{sock}")
        writer = fio(export_uri(run_dir, pid, minor), "--rw=randwrite", "--bs=4k",
                     "--iodepth=8", "--size=48M", "--time_based", "--runtime=25",
                     "--verify=crc32c", "--do_verify=1", "--verify_backlog=256",
                     "--randseed=7", cwd=tmp_path)
        try:
            wait_for("writes", lambda: stats(pid, minor)["secs"][1] > 2048, 60)
            # Stop qemu-nbd (kill -9) and let it stay down for a while.
            restart_at = time.monotonic()
            server.kill()
            wait_for("degraded", lambda: mirror_state(pid, minor)["state"] == "degraded", 60)
            written = stats(pid, minor)["secs"][1]
            wait_for("missed blocks", lambda: mirror_state(pid, minor)["dirty_blocks"] > 0, 60)
            # The VBD keeps serving while degraded.
            wait_for("writes while degraded",
                     lambda: stats(pid, minor)["secs"][1] > written + 2048, 60)
            degraded = mirror_state(pid, minor)
            assert degraded["degraded_count"] >= 1 and "last_error" in degraded
            assert time.monotonic() - restart_at < 60
            server.start()
            wait_for("resync", lambda: mirror_state(pid, minor)["state"]
                     in ("resyncing", "in_sync"), 60)
        finally:
            doc = finish(writer)
        assert doc["jobs"][0]["write"]["io_bytes"] > 0
        wait_for("in sync", lambda: mirror_state(pid, minor)["state"] == "in_sync", 120)
        final = mirror_state(pid, minor)
        assert final["dirty_blocks"] == 0 and final["copied_total_blocks"] > 0, final
        # In sync again, and still reported failed: the toolstack must not miss it.
        assert stats(pid, minor)["nbd_mirror_failed"] == 1
        ok("destroy", "-p", str(pid), "-m", str(minor))
    assert same_bytes(primary, secondary)
    assert_clean(run_dir)


def test_standby_takes_over_when_the_primary_is_out_of_space(
        run_dir: str, tmp_path: Path) -> None:
    primary = raw_file(tmp_path / "primary.raw")
    secondary = str(tmp_path / "standby.vhd")
    subprocess.run([VHD_UTIL, "create", "-n", secondary, "-s", str(SIZE // MiB)], check=True,
                   capture_output=True, timeout=60)
    # The first write reaches the primary; every later one fails there with ENOSPC.
    image = f"fault:op=write+zero,errno=ENOSPC,after=1:aio:{primary}"
    device = ok("create", "-a", image, "-2", f"vhd:{secondary}", "-s").strip()
    minor = int(device.rsplit("-", 1)[1])
    (entry,) = [e for e in parse_list(ok("list", "-m", str(minor))) if "pid" in e]
    pid = int(entry["pid"])
    uri = export_uri(run_dir, pid, minor)
    assert mirror_state(pid, minor)["state"] == "standby"
    qemu_io = ["qemu-io", "-f", "raw"]
    subprocess.run([*qemu_io, "-c", "write -P 0xa1 0 1M", uri], check=True, timeout=60,
                   capture_output=True)
    before = stats(pid, minor)
    assert before["FIXME_enospc_redirect_count"] == 0
    out = subprocess.run([*qemu_io, "-c", "write -P 0xb2 1M 1M", "-c", "write -P 0xc3 4M 64k",
                          uri], check=True, timeout=60, capture_output=True, text=True)
    assert "error" not in out.stdout.lower() + out.stderr.lower(), out
    state = mirror_state(pid, minor)
    assert state["state"] == "failed_over", state
    doc = stats(pid, minor)
    assert doc["FIXME_enospc_redirect_count"] == (MiB + 64 * 1024) >> 9
    # Older data from the primary, newer from the secondary.
    for pattern, offset, length in ((0xa1, 0, MiB), (0xb2, MiB, MiB), (0xc3, 4 * MiB, 65536)):
        subprocess.run([*qemu_io, "-c", f"read -P {pattern:#x} {offset} {length}", uri],
                       check=True, timeout=60, capture_output=True)
    ok("destroy", "-p", str(pid), "-m", str(minor))
    with open(primary, "rb") as f:
        assert f.read(MiB) == b"\xa1" * MiB and f.read(MiB) == bytes(MiB)
    converted = str(tmp_path / "standby.raw")
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", secondary, converted],
                   check=True, timeout=60)
    with open(converted, "rb") as f:
        assert f.read(MiB) == bytes(MiB) and f.read(MiB) == b"\xb2" * MiB
    assert_clean(run_dir)


@pytest.fixture(scope="module")
def tls_creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    return Creds(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("transport", ["unix", "tls"])
def test_live_migration_to_another_host_with_a_restart_of_the_destination(
        run_dir: str, tmp_path: Path, transport: str,
        request: pytest.FixtureRequest) -> None:
    """B exports on a Unix socket (a link that follows B's restarts), or on TCP with TLS
    on the loopback address (the same port after the restart; A checks B's certificate
    against the CA)."""
    creds: Creds | None = request.getfixturevalue("tls_creds") if transport == "tls" else None
    port = free_port()
    # Host A's disk holds data in a few places (and holes elsewhere: not copied).
    disk_a = raw_file(tmp_path / "a.raw")
    with open(disk_a, "r+b") as f:
        for offset in (0, 5 * MiB, 17 * MiB + 4096, 40 * MiB):
            f.seek(offset)
            f.write(os.urandom(3 * MiB))
    with short_tempdir("blktap-b-") as run_b:
        disk_b = raw_file(tmp_path / "b.raw")
        link = os.path.join(run_b, "export.sock")  # the name A mirrors to, across restarts

        def start_b() -> tuple[int, int]:
            tcp = [] if creds is None else ["--export-tcp", f"127.0.0.1:{port}",
                                            "--tls-creds", str(creds.server)]
            pid, minor = create(disk_b, *tcp, run_dir=run_b)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
            os.symlink(f"nbd{pid}.{minor}", link)
            return pid, minor

        target = link if creds is None else Creds.uri(port, creds.anon)

        pid_b, minor_b = start_b()
        try:
            pid_a, minor_a = create(disk_a)
            writer = fio(export_uri(run_dir, pid_a, minor_a), "--rw=randwrite", "--bs=4k",
                         "--iodepth=4", "--offset=32M", "--size=16M", "--time_based",
                         "--runtime=30", "--rate_iops=400", "--randseed=11", cwd=tmp_path)
            try:
                wait_for("writes", lambda: stats(pid_a, minor_a)["secs"][1] > 1024, 60)
                # Start mirroring A to B as the storage manager does: pause, then
                # unpause onto the same leaf with a secondary.
                ok("pause", "-p", str(pid_a), "-m", str(minor_a))
                ok("unpause", "-p", str(pid_a), "-m", str(minor_a), "-a", f"aio:{disk_a}",
                   "-2", f"copy=allocated,timeout=1:nbd:{target}")
                seen: list[dict[str, Any]] = []

                def progress() -> dict[str, Any]:
                    state = mirror_state(pid_a, minor_a)
                    seen.append(state)
                    return state

                first = progress()
                assert first["state"] in ("copying", "in_sync"), first
                # B restarts in the middle of the copy (or as early as we can see it).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid_b, signal.SIGKILL)
                time.sleep(0.5)
                wait_for("degraded", lambda: progress()["state"] == "degraded", 60)
                assert stats(pid_a, minor_a)["nbd_mirror_failed"] == 1
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(run_b, f"ctl{pid_b}"))
                pid_b, minor_b = start_b()
                wait_for("in sync", lambda: progress()["state"] == "in_sync", 180)
            finally:
                finish(writer)
            states = [s["state"] for s in seen]
            assert "degraded" in states and states[-1] == "in_sync", states
            # The initial copy took only what A holds: its data (12 MiB) and what fio
            # wrote (16 MiB window), not the 64 MiB disk.
            most = (12 + 16) * MiB // BLOCK + 8
            assert seen[0]["dirty_blocks"] + seen[0]["copied_blocks"] <= most, seen[0]
            assert seen[-1]["copied_total_blocks"] > 0
            progress_values = [s["progress"] for s in seen]
            assert all(0 <= p <= 1 for p in progress_values)
            wait_for("in sync after the writer", lambda: progress()["state"] == "in_sync", 120)
            ok("pause", "-p", str(pid_a), "-m", str(minor_a))
            paused = mirror_state(pid_a, minor_a)
            assert paused["state"] == "in_sync" and not paused["open"], paused
            # The VM's disk on B: its export reads as A's image, byte for byte.
            copy_b = str(tmp_path / "b-export.raw")
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                            export_uri(run_b, pid_b, minor_b), copy_b], check=True,
                           timeout=120)
            assert same_bytes(disk_a, copy_b)
            assert os.path.getsize(copy_b) == SIZE
            ok("destroy", "-p", str(pid_a), "-m", str(minor_a))
            tapctl_env(run_b, "destroy", "-p", str(pid_b), "-m", str(minor_b))
            assert same_bytes(disk_a, disk_b)
        finally:
            for name in os.listdir(run_b):
                if name.startswith("ctl") and name[3:].isdigit():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(name[3:]), signal.SIGKILL)
    assert_clean(run_dir)


def test_bad_secondary_strings_are_refused(run_dir: str, tmp_path: Path) -> None:
    primary = raw_file(tmp_path / "p.raw")
    small = raw_file(tmp_path / "small.raw", SIZE // 2)
    for secondary, status in ((f"copy=sometimes:aio:{primary}", 22),
                              (f"aio:{small}", 22),
                              ("aio:/nonexistent/x.raw", 2)):
        proc = subprocess.run([TAP_CTL, "create", "-a", f"aio:{primary}", "-2", secondary],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == status, (secondary, proc.returncode, proc.stderr)
    assert BLOCK == 64 * 1024
    assert_clean(run_dir)


def test_block_map_against_a_set() -> None:
    """The record of missed blocks (set_range, merge, take_run with wrap-around) against
    a plain set, on sizes that are and are not multiples of 8 blocks."""
    rng = random.Random(5)
    for _ in range(200):
        n = rng.randrange(1, 3000)
        record, model = BlockMap(n), set[int]()
        for _ in range(20):
            first = rng.randrange(n)
            count = rng.randrange(1, n - first + 1)
            if rng.random() < 0.5:
                record.set_range(first, count)
            else:
                other = BlockMap(n)
                other.set_range(first, count)
                record.merge(other)
            model.update(range(first, first + count))
            assert record.count == len(model)
            assert {b for b in range(n) if record.test(b)} == model
        taken: set[int] = set()
        cursor = rng.randrange(n)
        while (run := record.take_run(cursor, COPY_RUN)) is not None:
            start, length = run
            assert 1 <= length <= COPY_RUN and not taken & set(range(start, start + length))
            taken.update(range(start, start + length))
            cursor = start + length
        assert taken == model and record.count == 0


def test_pause_and_resume_while_degraded_keep_the_record(run_dir: str, tmp_path: Path) -> None:
    primary = raw_file(tmp_path / "primary.raw")
    secondary = raw_file(tmp_path / "secondary.raw")
    sock = os.path.join(run_dir, "sec.sock")
    qemu_io = ["qemu-io", "-f", "raw"]
    with qemu_nbd(secondary, sock) as server:
        pid, minor = create(primary, "-2", f"timeout=1:nbd:{sock}")
        uri = export_uri(run_dir, pid, minor)
        subprocess.run([*qemu_io, "-c", "write -P 0x5a 0 4M", uri], check=True, timeout=60,
                       capture_output=True)
        assert mirror_state(pid, minor)["state"] == "in_sync"
        server.kill()
        subprocess.run([*qemu_io, "-c", "write -P 0x6b 8M 4M", "-c", "write -z 1M 1M", uri],
                       check=True, timeout=60, capture_output=True)
        degraded = mirror_state(pid, minor)
        assert degraded["state"] == "degraded", degraded
        assert degraded["dirty_blocks"] >= 4 * MiB // BLOCK
        ok("pause", "-p", str(pid), "-m", str(minor))
        paused = mirror_state(pid, minor)
        assert paused["state"] == "degraded" and not paused["open"]
        assert paused["dirty_blocks"] >= degraded["dirty_blocks"]
        # Resumed while the secondary is still down: serving, degraded, same record.
        ok("unpause", "-p", str(pid), "-m", str(minor))
        resumed = mirror_state(pid, minor)
        assert resumed["state"] == "degraded" and resumed["open"], resumed
        assert resumed["dirty_blocks"] >= degraded["dirty_blocks"]
        subprocess.run([*qemu_io, "-c", "write -P 0x7c 20M 64k", uri], check=True,
                       timeout=60, capture_output=True)
        server.start()
        wait_for("in sync", lambda: mirror_state(pid, minor)["state"] == "in_sync", 60)
        assert mirror_state(pid, minor)["copied_total_blocks"] >= degraded["dirty_blocks"]
        ok("destroy", "-p", str(pid), "-m", str(minor))
    assert same_bytes(primary, secondary)
    with open(secondary, "rb") as f:
        f.seek(20 * MiB)
        assert f.read(65536) == b"\x7c" * 65536
    assert_clean(run_dir)


def test_open_with_a_file_secondary_step_by_step(run_dir: str, tmp_path: Path) -> None:
    """``tap-ctl open -2 aio:FILE`` (attach and open as separate steps): the file
    receives every write; a read-only open with a secondary is refused (EINVAL)."""
    primary = raw_file(tmp_path / "primary.raw")
    secondary = raw_file(tmp_path / "secondary.raw")
    ok("allocate")
    pid = ok("spawn").strip()
    ok("attach", "-p", pid, "-m", "0")
    refused = subprocess.run([TAP_CTL, "open", "-p", pid, "-m", "0", "-a", f"aio:{primary}",
                              "-R", "-2", f"aio:{secondary}"], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 22, refused.stderr
    ok("open", "-p", pid, "-m", "0", "-a", f"aio:{primary}", "-2", f"aio:{secondary}")
    uri = export_uri(run_dir, int(pid), 0)
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 3M 1M", "-c",
                    "write -P 0x4d 100k 7k", "-c", "flush", uri], check=True, timeout=60,
                   capture_output=True)
    state = mirror_state(int(pid), 0)
    assert state["state"] == "in_sync" and state["secondary"] == f"aio:{secondary}", state
    ok("close", "-p", pid, "-m", "0")
    ok("detach", "-p", pid, "-m", "0")
    ok("free", "-m", "0")
    assert same_bytes(primary, secondary)
    with open(secondary, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(MiB) == b"\x3c" * MiB
    assert_clean(run_dir)
