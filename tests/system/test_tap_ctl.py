"""End to end: the ``tap-ctl`` command against real tapdisks in a private run directory.

Images are sparse raw files (``aio:``) in tmp_path; I/O goes through the VBD's NBD socket
with qemu-io. Every test checks that it leaves no tapdisk, socket or marker behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import TAP_CTL, TAPDISK, host_block_device_support, is_fork_server

QEMU_IO = shutil.which("qemu-io")
needs_qemu_io = pytest.mark.skipif(
    QEMU_IO is None, reason="qemu-io is not installed (scripts/setup.sh installs qemu-utils)"
)


# --------------------------------------------------------------------------- helpers


def tapctl(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run tap-ctl with stdout on a pipe (not a terminal)."""
    return subprocess.run(
        [TAP_CTL, *args], input=None if stdin is None else stdin.decode("latin-1"),
        capture_output=True, text=True, timeout=60,
    )


def ok(*args: str) -> str:
    proc = tapctl(*args)
    assert proc.returncode == 0, (args, proc.returncode, proc.stderr)
    return proc.stdout


def tapctl_tty(*args: str) -> tuple[int, str]:
    """Run tap-ctl with stdout on a pseudo-terminal; return (status, output)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([TAP_CTL, *args], stdout=slave, stderr=subprocess.PIPE)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO once the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        status = proc.wait(timeout=60)
        assert proc.stderr is not None
        proc.stderr.close()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return status, b"".join(chunks).decode().replace("\r\n", "\n")


def parse_list(text: str) -> list[dict[str, str]]:
    return [dict(f.split("=", 1) for f in line.split()) for line in text.splitlines()]


def image(tmp_path: Path, name: str = "disk.img", size: str = "64M") -> str:
    path = tmp_path / name
    subprocess.run(["truncate", "-s", size, str(path)], check=True)
    return str(path)


def tapdisk_pids(run_dir: str) -> list[int]:
    """Live (non-zombie) tapdisks whose environment names ``run_dir`` as BLKTAP_RUN_DIR
    (not the fork server, whose environment and command line its tapdisks share)."""
    wanted = f"BLKTAP_RUN_DIR={run_dir}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if wanted in env and stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X"):
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if (b"tapdisk" in cmdline and b"tap-ctl" not in cmdline
                    and not is_fork_server(int(entry))):
                found.append(int(entry))
    return found


def assert_clean(run_dir: str, *, timeout: float = 10.0) -> None:
    """No tapdisk, control or NBD socket, or minor marker is left in ``run_dir``."""
    deadline = time.monotonic() + timeout
    while tapdisk_pids(run_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tapdisk_pids(run_dir) == []
    assert ok("list") == ""
    leftovers = sorted(set(os.listdir(run_dir)) - {"tapdisk", "dev"})
    assert leftovers == []
    markers = os.path.join(run_dir, "tapdisk")
    assert not os.path.isdir(markers) or os.listdir(markers) == []


@pytest.fixture
def clean_run_dir(run_dir: str) -> Iterator[str]:
    """``run_dir`` that must be clean at the end of the test: no tapdisk, socket or marker
    left (checked at teardown, so a leak fails the test even where it does not say so)."""
    yield run_dir
    assert_clean(run_dir)


def create(img: str, *flags: str) -> tuple[int, int]:
    """``tap-ctl create``; return (pid, minor) of the new VBD, found with ``list -f``."""
    device = ok("create", "-a", f"aio:{img}", *flags).strip()
    minor = int(device.rsplit("-", 1)[1])
    (entry,) = [e for e in parse_list(ok("list", "-m", str(minor))) if "pid" in e]
    assert entry["args"] == f"aio:{img}"
    return int(entry["pid"]), minor


def nbd_uri(run_dir: str, pid: int, minor: int) -> str:
    return f"nbd+unix:///?socket={run_dir}/nbd{pid}.{minor}"


def qemu_io(uri: str, *commands: str) -> str:
    assert QEMU_IO is not None
    args = [QEMU_IO, "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "fail" not in proc.stdout.lower(), proc.stdout + proc.stderr
    return proc.stdout


# ----------------------------------------------------------------------- life cycle


@needs_qemu_io
def test_create_io_stats_pause_unpause_destroy(clean_run_dir: str, tmp_path: Path) -> None:
    run_dir = clean_run_dir
    img = image(tmp_path)
    device = ok("create", "-a", f"aio:{img}").strip()
    assert device == f"{run_dir}/tapdisk/tapdisk-0"
    (entry,) = parse_list(ok("list"))
    pid = int(entry["pid"])
    assert entry == {"pid": str(pid), "minor": "0", "state": "0", "args": f"aio:{img}"}

    uri = nbd_uri(run_dir, pid, 0)
    qemu_io(uri, "write -P 0x5a 1M 64k", "read -P 0x5a 1M 64k", "read -P 0 0 64k")
    with open(img, "rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"\x5a" * 65536

    stats = json.loads(ok("stats", "-p", str(pid), "-m", "0"))
    assert stats["name"] == f"aio:{img}"
    assert stats["secs"][0] >= 128 and stats["secs"][1] >= 128
    assert stats["images"][0]["name"] == img

    ok("pause", "-p", str(pid), "-m", "0", "-t", "10")
    assert parse_list(ok("list"))[0]["state"] == "0x2a"
    ok("unpause", "-p", str(pid), "-m", "0")
    assert parse_list(ok("list"))[0]["state"] == "0"
    qemu_io(uri, "read -P 0x5a 1M 64k")

    ok("destroy", "-p", str(pid), "-m", "0")
    assert_clean(run_dir)


def test_destroy_of_a_paused_vbd(clean_run_dir: str, tmp_path: Path) -> None:
    pid, minor = create(image(tmp_path))
    ok("pause", "-p", str(pid), "-m", str(minor))
    assert parse_list(ok("list"))[0]["state"] == "0x2a"
    ok("destroy", "-p", str(pid), "-m", str(minor))
    assert_clean(clean_run_dir)


def test_step_by_step(clean_run_dir: str, tmp_path: Path) -> None:
    img = image(tmp_path)
    marker = ok("allocate").strip()
    assert marker == f"{clean_run_dir}/tapdisk/tapdisk-0"
    assert parse_list(ok("list")) == [{"minor": "0"}]
    pid = ok("spawn").strip()
    assert pid.isdigit()
    assert {"pid": pid} in parse_list(ok("list"))
    ok("attach", "-p", pid, "-m", "0")
    # As the C tapdisk: attached and never opened is state 0, without args.
    assert parse_list(ok("list")) == [{"pid": pid, "minor": "0", "state": "0"}]
    ok("open", "-p", pid, "-m", "0", "-a", f"aio:{img}", "-R")
    assert parse_list(ok("list"))[0]["args"] == f"aio:{img}"
    detach = tapctl("detach", "-p", pid, "-m", "0")
    assert detach.returncode == 16  # EBUSY while open
    ok("close", "-p", pid, "-m", "0", "-t", "10")
    # Closed: CLOSED bit, and the image is forgotten (no args).
    assert parse_list(ok("list")) == [{"pid": pid, "minor": "0", "state": "0x2"}]
    ok("detach", "-p", pid, "-m", "0")
    assert parse_list(ok("list")) == [{"minor": "0"}]  # the tapdisk exited
    ok("free", "-m", "0")
    assert_clean(clean_run_dir)


def test_force_close(clean_run_dir: str, tmp_path: Path) -> None:
    pid, minor = create(image(tmp_path))
    ok("close", "-f", "-p", str(pid), "-m", str(minor))
    assert parse_list(ok("list"))[0]["state"] == "0x2"
    ok("destroy", "-p", str(pid), "-m", str(minor))
    assert_clean(clean_run_dir)


@needs_qemu_io
def test_unpause_on_a_new_leaf(clean_run_dir: str, tmp_path: Path) -> None:
    old = image(tmp_path, "old.img")
    pid, minor = create(old)
    uri = nbd_uri(clean_run_dir, pid, minor)
    qemu_io(uri, "write -P 0x11 0 64k")
    ok("pause", "-p", str(pid), "-m", str(minor))
    new = str(tmp_path / "new.img")
    shutil.copyfile(old, new)
    ok("unpause", "-p", str(pid), "-m", str(minor), "-a", f"aio:{new}")
    assert parse_list(ok("list"))[0]["args"] == f"aio:{new}"
    qemu_io(uri, "read -P 0x11 0 64k", "write -P 0x22 0 64k")
    with open(new, "rb") as f:
        assert f.read(65536) == b"\x22" * 65536
    with open(old, "rb") as f:
        assert f.read(65536) == b"\x11" * 65536
    ok("destroy", "-p", str(pid), "-m", str(minor))
    assert_clean(clean_run_dir)


# --------------------------------------------------------------------------- errors


def test_missing_image_exits_2_and_leaves_nothing(clean_run_dir: str, tmp_path: Path) -> None:
    proc = tapctl("create", "-a", f"aio:{tmp_path}/absent.img")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == "No such file or directory"
    assert_clean(clean_run_dir)


def test_unknown_image_type_leaves_nothing(clean_run_dir: str, tmp_path: Path) -> None:
    proc = tapctl("create", "-a", f"nosuchtype:{image(tmp_path)}")
    assert proc.returncode != 0
    assert_clean(clean_run_dir)


@pytest.mark.parametrize(
    "args",
    [
        ["free"],
        ["destroy", "-p", "1"],
        ["attach", "-m", "0"],
        ["attach", "-p", "x", "-m", "0"],
        ["free", "-m", "16384"],
        ["create"],
        ["create", "-a", "aio:/x", "-Z"],
        ["open", "-p", "1", "-m", "0"],
        ["pause", "-p", "1", "-m", "0", "-t", "soon"],
        ["list", "extra"],
    ],
)
def test_usage_errors_exit_22(clean_run_dir: str, args: list[str]) -> None:
    proc = tapctl(*args)
    assert proc.returncode == 22, proc.stderr
    assert proc.stdout == ""
    assert "usage: tap-ctl" in proc.stderr
    assert proc.stderr.splitlines()[-1] == "Invalid argument"


def test_unknown_command_fails(clean_run_dir: str) -> None:
    proc = tapctl("frobnicate")
    assert proc.returncode == 22
    assert "unknown command" in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["stats", "-p", "4000000", "-m", "0"],
        ["attach", "-p", "4000000", "-m", "0"],
        ["pause", "-p", "4000000", "-m", "0"],
        ["destroy", "-p", "4000000", "-m", "0"],
    ],
)
def test_unknown_pid_exits_2(clean_run_dir: str, args: list[str]) -> None:
    proc = tapctl(*args)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == "No such file or directory"


def test_list_of_unknown_pid_is_empty(clean_run_dir: str) -> None:
    assert ok("list", "-p", "4000000") == ""


def test_free_of_held_minor_exits_11(clean_run_dir: str) -> None:
    ok("allocate")
    pid = ok("spawn").strip()
    ok("attach", "-p", pid, "-m", "0")
    proc = tapctl("free", "-m", "0")
    assert proc.returncode == 11
    assert proc.stderr.splitlines()[-1] == "Resource temporarily unavailable"
    assert os.path.exists(f"{clean_run_dir}/tapdisk/tapdisk-0")
    ok("detach", "-p", pid, "-m", "0")
    ok("free", "-m", "0")
    assert_clean(clean_run_dir)


def test_free_of_unallocated_minor_exits_2(clean_run_dir: str) -> None:
    assert tapctl("free", "-m", "3").returncode == 2


def test_image_open_read_write_elsewhere_is_ebusy(clean_run_dir: str, tmp_path: Path) -> None:
    img = image(tmp_path)
    pid, minor = create(img)
    for flags in ([], ["-D"]):
        proc = tapctl("create", "-a", f"aio:{img}", *flags)
        assert proc.returncode == 16, proc.stderr
        assert proc.stderr.splitlines()[-1] == "Device or resource busy"
    # The same file by another name is the same image.
    proc = tapctl("create", "-a", f"aio:{tmp_path}/../{tmp_path.name}/disk.img")
    assert proc.returncode == 16
    assert len(parse_list(ok("list"))) == 1
    ok("destroy", "-p", str(pid), "-m", str(minor))
    assert_clean(clean_run_dir)


def test_read_only_opens_may_share(clean_run_dir: str, tmp_path: Path) -> None:
    img = image(tmp_path)
    first = create(img, "-R")
    second = create(img, "-R")
    assert first[1] != second[1]
    assert tapctl("create", "-a", f"aio:{img}").returncode == 16
    for pid, minor in (first, second):
        ok("destroy", "-p", str(pid), "-m", str(minor))
    assert_clean(clean_run_dir)


def test_pause_timeout_is_honoured(clean_run_dir: str, tmp_path: Path) -> None:
    pid, minor = create(image(tmp_path))
    ok("pause", "-t", "5", "-p", str(pid), "-m", str(minor))
    assert parse_list(ok("list", "-m", str(minor)))[0]["state"] == "0x2a"  # paused
    # Pausing a paused VBD succeeds at once: it does not wait for its 60 s timeout (the
    # subprocess's 30 s limit would stop it first and fail the test).
    again = subprocess.run([TAP_CTL, "pause", "-p", str(pid), "-m", str(minor), "-t", "60"],
                           capture_output=True, text=True, timeout=30)
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert parse_list(ok("list", "-m", str(minor)))[0]["state"] == "0x2a"
    ok("unpause", "-p", str(pid), "-m", str(minor))
    assert parse_list(ok("list", "-m", str(minor)))[0]["state"] == "0"
    ok("destroy", "-p", str(pid), "-m", str(minor), "-t", "10")
    assert_clean(clean_run_dir)


# --------------------------------------------------------------------------- output


def test_list_formats(clean_run_dir: str, tmp_path: Path) -> None:
    img = image(tmp_path)
    pid, minor = create(img)
    ok("allocate")  # minor 1: an orphan
    spawned = ok("spawn").strip()  # a tapdisk with no VBD
    lines = ok("list").splitlines()
    assert f"pid={pid} minor={minor} state=0 args=aio:{img}" in lines
    assert "minor=1" in lines
    assert f"pid={spawned}" in lines
    assert lines[-1] == "minor=1"  # orphan minors come last

    status, text = tapctl_tty("list")
    assert status == 0
    rows = text.splitlines()
    assert f"{pid:>8} {minor:>4} {'0':>4} {'aio':>10} {img}" in rows
    assert f"{'-':>8} {'1':>4} {'-':>4} {'-':>10} -" in rows
    assert f"{spawned:>8} {'-':>4} {'-':>4} {'-':>10} -" in rows

    assert parse_list(ok("list", "-m", "1")) == [{"minor": "1"}]
    assert parse_list(ok("list", "-p", spawned)) == [{"pid": spawned}]
    assert [e.get("args") for e in parse_list(ok("list", "-t", "aio"))].count(f"aio:{img}") == 1
    assert f"aio:{img}" not in ok("list", "-t", "vhd")
    assert f"aio:{img}" not in ok("list", "-f", "/tmp/other")

    doc = json.loads(ok("list", "--json"))
    (vbd,) = [d for d in doc if d["minor"] == minor and d["pid"] == pid]
    assert vbd["nbd_socket"] == f"{clean_run_dir}/nbd{pid}.{minor}"
    assert vbd["chain"] == [img]
    assert vbd["state"] == 0 and vbd["args"] == f"aio:{img}"

    ok("destroy", "-p", str(pid), "-m", str(minor))
    ok("free", "-m", "1")
    subprocess.run(["kill", spawned], check=True)
    assert_clean(clean_run_dir)


def test_spawn_output(clean_run_dir: str) -> None:
    status, text = tapctl_tty("spawn")
    assert status == 0
    assert text.startswith("tapdisk spawned with pid ")
    pid = text.split()[-1]
    assert ok("list") == f"pid={pid}\n"
    subprocess.run(["kill", pid], check=True)
    assert_clean(clean_run_dir)


def test_debug_anywhere(clean_run_dir: str) -> None:
    for args in (["--debug", "allocate"], ["allocate", "--debug"]):
        proc = tapctl(*args)
        assert proc.returncode == 0
        assert "allocated minor" in proc.stderr
    assert tapctl("list").stderr == ""
    ok("free", "-m", "0")
    ok("free", "-m", "1", "--debug")
    assert_clean(clean_run_dir)


def test_help(clean_run_dir: str) -> None:
    top = ok("--help")
    commands = ("list", "allocate", "free", "create", "destroy", "spawn", "attach",
                "detach", "open", "close", "pause", "unpause", "stats", "install-tapdisk")
    for command in commands:
        assert f"\n  {command} " in top
    # In process: one interpreter for every command's help.
    from blktap.cli import tap_ctl

    for command in commands:
        text = tap_ctl.COMMANDS[command].build().format_help()
        assert text.startswith(f"usage: tap-ctl {command}")
        assert "exit status" in text and "BLKTAP_RUN_DIR" in text
    assert ok("help", "create") == ok("create", "-h")
    assert "-t SECS" in ok("pause", "--help")


def test_open_encrypted_key_size_is_checked(clean_run_dir: str) -> None:
    proc = tapctl("open", "-p", "1", "-m", "0", "-a", "aio:/x", "-E", stdin=b"short")
    assert proc.returncode == 22
    assert "-E: read a 5-byte key; use a 256-bit or 512-bit key" in proc.stderr
    # Keys of 32 and 64 bytes pass the check: the command goes on to look for the tapdisk
    # (none with pid 1 in this private run directory: ENOENT).
    for size in (32, 64):
        proc = tapctl("open", "-p", "1", "-m", "0", "-a", "aio:/x", "-E", stdin=b"k" * size)
        assert proc.returncode == 2, proc.stderr
        assert "no tapdisk with pid 1" in proc.stderr


# ----------------------------------------------------------------------- concurrency


def test_32_concurrent_creates_and_destroys(clean_run_dir: str, tmp_path: Path) -> None:
    images = [image(tmp_path, f"d{i}.img", "8M") for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        created = list(pool.map(lambda img: tapctl("create", "-a", f"aio:{img}"), images))
    for proc in created:
        assert proc.returncode == 0, proc.stderr
    entries = [e for e in parse_list(ok("list")) if "args" in e]
    assert len(entries) == 32
    assert sorted(int(e["minor"]) for e in entries) == list(range(32))
    assert sorted(e["args"] for e in entries) == sorted(f"aio:{i}" for i in images)
    with ThreadPoolExecutor(32) as pool:
        destroyed = list(pool.map(
            lambda e: tapctl("destroy", "-p", e["pid"], "-m", e["minor"]), entries
        ))
    for proc in destroyed:
        assert proc.returncode == 0, proc.stderr
    assert_clean(clean_run_dir)


# --------------------------------------------------------------------------- install


def test_install_tapdisk(clean_run_dir: str, tmp_path: Path) -> None:
    prefix = tmp_path / "usr"
    target = prefix / "libexec" / "tapdisk"
    assert ok("install-tapdisk", "--prefix", str(prefix)).strip() == str(target)
    assert os.access(target, os.X_OK)
    assert TAPDISK in target.read_text()
    # The C libblktapctl runs it with no argument and reads the socket path on stdout.
    env = dict(os.environ)
    proc = subprocess.run([str(target)], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0
    pid = proc.stdout.strip().rsplit("ctl", 1)[1]
    assert ok("list") == f"pid={pid}\n"
    subprocess.run(["kill", pid], check=True)
    assert_clean(clean_run_dir)
    # Replacing a foreign tapdisk needs --force and keeps it; --uninstall restores it.
    other = tmp_path / "other-tapdisk"
    other.write_text("#!/bin/sh\necho C\n")
    assert tapctl("install-tapdisk", "--target", str(other)).returncode == 17
    ok("install-tapdisk", "--target", str(other), "--force", "--run-dir", "/var/run/x")
    assert "BLKTAP_RUN_DIR=/var/run/x" in other.read_text()
    assert (tmp_path / "other-tapdisk.orig").read_text() == "#!/bin/sh\necho C\n"
    ok("install-tapdisk", "--target", str(other), "--uninstall")
    assert other.read_text() == "#!/bin/sh\necho C\n"
    with contextlib.suppress(FileNotFoundError):
        assert not (tmp_path / "other-tapdisk.orig").exists()


def test_tapdisk_binary_from_environment(clean_run_dir: str, tmp_path: Path) -> None:
    wrapper = tmp_path / "my-tapdisk"
    wrapper.write_text(f"#!/bin/sh\ntouch {tmp_path}/used\nexec {TAPDISK} \"$@\"\n")
    wrapper.chmod(0o755)
    env = dict(os.environ, BLKTAP_TAPDISK=str(wrapper))
    proc = subprocess.run([TAP_CTL, "spawn"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "used").exists()
    subprocess.run(["kill", proc.stdout.strip()], check=True)
    assert_clean(clean_run_dir)


# ---------------------------------------------------------------------- block device


_blockdev_ok, _blockdev_why = host_block_device_support()  # the host's, not the code's


@pytest.mark.skipif(not _blockdev_ok, reason=f"no FUSE+loop block device here: {_blockdev_why}")
def test_create_prints_the_block_device(
    clean_run_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLKTAP_BLOCKDEV", "on")
    img = image(tmp_path, size="16M")
    device = ok("create", "-a", f"aio:{img}").strip()
    dev_dir = os.environ["BLKTAP_DEV_DIR"]
    assert device == f"{dev_dir}/tapdev0"
    assert os.path.realpath(device).startswith("/dev/loop")
    pattern = tmp_path / "pattern"
    pattern.write_bytes(b"\x5a" * 4096)
    subprocess.run(["dd", f"if={pattern}", f"of={device}", "bs=4096", "count=1", "seek=3",
                    "conv=notrunc,fsync", "status=none"], check=True, timeout=30)
    with open(img, "rb") as f:
        f.seek(3 * 4096)
        assert f.read(4096) == b"\x5a" * 4096
    (entry,) = parse_list(ok("list"))
    doc = json.loads(ok("list", "--json"))
    assert doc[0]["block_device"] == device
    ok("destroy", "-p", entry["pid"], "-m", entry["minor"])
    assert not os.path.lexists(device)
    fuse = os.path.join(clean_run_dir, "fuse")
    if os.path.isdir(fuse) and not os.listdir(fuse):
        os.rmdir(fuse)  # the blockdev frontend's mount point directory
    assert_clean(clean_run_dir)


def test_sigterm_during_create_leaves_nothing(clean_run_dir: str, tmp_path: Path) -> None:
    started = tmp_path / "started"
    slow = tmp_path / "slow-tapdisk"
    slow.write_text(f"#!/bin/sh\ntouch {started}\nsleep 2\nexec {TAPDISK} \"$@\"\n")
    slow.chmod(0o755)
    env = dict(os.environ, BLKTAP_TAPDISK=str(slow))
    proc = subprocess.Popen([TAP_CTL, "create", "-a", f"aio:{image(tmp_path)}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.exists()
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 4, err  # EINTR
    assert out == b""
    assert_clean(clean_run_dir)
