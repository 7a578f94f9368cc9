"""Security: who can reach a tapdisk, what names can reach, what a read-only VBD allows.

- The run directory is 0700 and every socket, marker and state file in it 0600, owned
  by the tapdisk's user; another user (a real second uid, ``nobody`` through setpriv)
  cannot connect to a control or NBD socket, even with the directory opened up.
- A tapdisk has no TCP or UDP socket unless asked (the kernel's /proc/net tables).
- Names: an image, secondary or log path with a control character is refused (a newline
  forged ``tap-ctl list`` lines); other odd characters name exactly their file; a type
  with path characters opens nothing; an NBD export name opens nothing.
- A read-only VBD cannot be written: NBD WRITE, TRIM and WRITE_ZEROES fail with EPERM,
  the tapdisk holds no writable descriptor on the image, the kernel block device is
  read-only, its FUSE file refuses to open for writing, and pause/unpause keeps it so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from tests.helpers import (
    TAP_CTL,
    error_of,
    exchange,
    host_block_device_support,
    message,
    params,
    split_messages,
)
from tests.system.test_dead_tapdisk import create
from tests.system.test_supervise import supervised_run_dir  # noqa: F401 - a fixture
from tests.system.test_tap_ctl import image, ok, parse_list, tapctl, tapdisk_pids

SETPRIV = shutil.which("setpriv")
PYTHON = shutil.which("python3", path="/usr/bin:/bin")
NOBODY = 65534
needs_second_user = pytest.mark.skipif(
    SETPRIV is None or PYTHON is None or os.geteuid() != 0,
    reason="needs root, setpriv (util-linux) and /usr/bin/python3 to act as uid 65534",
)
_ok, _why = host_block_device_support()
needs_blockdev = pytest.mark.skipif(not _ok, reason=f"no FUSE+loop block device here: {_why}")

ATTACH, ATTACH_RSP, OPEN, ERROR = 5, 6, 7, 1
NBD_MAGIC, OPTS, REQ_MAGIC, SIMPLE_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x25609513, \
    0x67446698
CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES = 1, 4, 6
FLAG_READ_ONLY = 1 << 1


def create_with(img: str, *flags: str) -> tuple[int, int]:
    """``tap-ctl create FLAGS -a aio:IMG``; (pid, minor) from ``list --json``."""
    ok("create", *flags, "-a", f"aio:{img}")
    (doc,) = [d for d in json.loads(ok("list", "--json")) if d["path"] == img]
    return int(doc["pid"]), int(doc["minor"])


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def connect_as_nobody(path: str) -> str:
    """Connect to Unix socket ``path`` as uid/gid 65534 with no groups; "connected" or
    the errno's name."""
    assert SETPRIV is not None and PYTHON is not None
    code = ("import errno, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1]); print('connected')\n"
            "except OSError as e:\n    print(errno.errorcode[e.errno])\n")
    proc = subprocess.run(
        [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", PYTHON, "-c",
         code, path], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


# ------------------------------------------------------------------ who can reach it


def test_run_directory_and_its_files_are_private(
    supervised_run_dir: str, tmp_path: Path  # noqa: F811
) -> None:
    run_dir = supervised_run_dir
    os.chmod(run_dir, 0o755)  # a run directory left open by someone: made private again
    pid, minor = create(image(tmp_path, "a.img"))
    ok("create", "--supervise", "-a", f"aio:{image(tmp_path, 'b.img')}")
    assert mode(run_dir) == 0o700
    assert mode(f"{run_dir}/tapdisk") == 0o700
    entries = sorted(os.listdir(run_dir))
    assert f"ctl{pid}" in entries and f"nbd{pid}.{minor}" in entries
    assert "supervise1.json" in entries and "supervise1.lock" in entries
    for name in entries:
        path = os.path.join(run_dir, name)
        st = os.lstat(path)
        assert st.st_uid == os.geteuid(), name
        if stat.S_ISDIR(st.st_mode):
            assert mode(path) == 0o700, name
        else:
            assert stat.S_ISSOCK(st.st_mode) or name.startswith("supervise"), name
            assert mode(path) == 0o600, name
    for name in os.listdir(f"{run_dir}/tapdisk"):
        assert mode(f"{run_dir}/tapdisk/{name}") == 0o600, name
    for entry in parse_list(ok("list")):
        ok("destroy", "-p", entry["pid"], "-m", entry["minor"])


@needs_second_user
def test_another_user_cannot_connect(run_dir: str, tmp_path: Path) -> None:
    pid, minor = create(image(tmp_path))
    ctl, nbd = f"{run_dir}/ctl{pid}", f"{run_dir}/nbd{pid}.{minor}"
    assert connect_as_nobody(ctl) == "EACCES"
    assert connect_as_nobody(nbd) == "EACCES"
    # The sockets themselves refuse too, not only the directory.
    os.chmod(run_dir, 0o711)
    try:
        assert connect_as_nobody(ctl) == "EACCES"
        assert connect_as_nobody(nbd) == "EACCES"
    finally:
        os.chmod(run_dir, 0o700)
    ok("destroy", "-p", str(pid), "-m", str(minor))


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _inet_inodes(pid: int) -> set[str]:
    """Inodes of every TCP/UDP socket in ``pid``'s network namespace."""
    found = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if len(fields) > 9:
                    found.add(fields[9])
    return found


def test_no_tcp_or_udp_socket_unless_asked(run_dir: str, tmp_path: Path) -> None:
    pid, minor = create(image(tmp_path))
    ours = _socket_inodes(pid)
    assert len(ours) >= 2  # at least the control and NBD listeners
    assert ours & _inet_inodes(pid) == set()
    ok("destroy", "-p", str(pid), "-m", str(minor))


# ------------------------------------------------------------------ names


def test_a_newline_in_a_name_cannot_forge_list_lines(run_dir: str, tmp_path: Path) -> None:
    forged = tmp_path / "x.img\npid=1 minor=77 state=0 args=aio:evil"
    forged.write_bytes(bytes(1 << 20))
    proc = tapctl("create", "-a", f"aio:{forged}")
    assert proc.returncode == errno.EINVAL, proc.stderr
    assert "control characters" in proc.stderr
    assert ok("list") == ""
    assert sorted(set(os.listdir(run_dir)) - {"tapdisk", "dev"}) == []
    log = tmp_path / "cbt\nlog"
    proc = tapctl("create", "-C", str(log), "-a", f"aio:{image(tmp_path)}")
    assert proc.returncode == errno.EINVAL, proc.stderr
    assert not log.exists()
    assert ok("list") == ""


def test_tapdisk_refuses_a_control_character_from_any_client(
    run_dir: str, tmp_path: Path
) -> None:
    """A client that skips tap-ctl's check (the C tap-ctl does not check) is refused by
    tapdisk itself."""
    ok("allocate")
    pid = int(ok("spawn").strip())
    ctl = f"{run_dir}/ctl{pid}"
    ((t, _c, _u),) = split_messages(exchange(ctl, message(ATTACH, 0)))
    assert t == ATTACH_RSP
    forged = tmp_path / "y.img\rpid=2"
    forged.write_bytes(bytes(1 << 20))
    ((t, _c, u),) = split_messages(exchange(ctl, message(OPEN, 0, params(f"aio:{forged}"))))
    assert (t, error_of(u)) == (ERROR, errno.EINVAL)
    assert parse_list(ok("list")) == [{"pid": str(pid), "minor": "0", "state": "0"}]
    ok("detach", "-p", str(pid), "-m", "0")
    ok("free", "-m", "0")


def test_odd_characters_name_exactly_their_file(run_dir: str, tmp_path: Path) -> None:
    odd = tmp_path / "we ird 'q\" $(touch pwned); *:x é.img"
    data = os.urandom(1 << 20)
    odd.write_bytes(data)
    before = sorted(os.listdir(tmp_path))
    ok("create", "-a", f"aio:{odd}")
    (doc,) = json.loads(ok("list", "--json"))
    assert doc["path"] == str(odd) and doc["args"] == f"aio:{odd}"
    pid, minor = doc["pid"], doc["minor"]
    served = _nbd_read(f"{run_dir}/nbd{pid}.{minor}", 0, len(data))
    assert served == data
    ok("destroy", "-p", str(pid), "-m", str(minor))
    assert sorted(os.listdir(tmp_path)) == before
    assert not os.path.exists("pwned") and not (tmp_path / "pwned").exists()


def test_a_log_path_with_odd_characters_names_exactly_its_file(
    run_dir: str, tmp_path: Path
) -> None:
    img = image(tmp_path)
    logs = tmp_path / "we ird"
    logs.mkdir()
    log = logs / "l 'x$(touch pwned);*:y.cbtlog"
    cbt_util = str(Path(TAP_CTL).parent / "cbt-util")
    subprocess.run([cbt_util, "create", "-n", str(log), "-s", str(os.path.getsize(img))],
                   check=True, capture_output=True, timeout=60)
    before = log.read_bytes()
    pid, minor = create_with(img, "-C", str(log))
    size, _flags, sock = _nbd_connect(f"{run_dir}/nbd{pid}.{minor}", b"")
    try:
        sock.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, CMD_WRITE, 1, 0, 4096)
                     + b"\x5a" * 4096)
        magic, error, _cookie = struct.unpack(">IIQ", _recv(sock, 16))
        assert (magic, error) == (SIMPLE_MAGIC, 0)
    finally:
        sock.close()
    ok("destroy", "-p", str(pid), "-m", str(minor))
    assert os.listdir(logs) == [log.name]  # that file was used, and nothing beside it
    assert log.read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["disk.img", "we ird"]
    assert size == os.path.getsize(img)


@pytest.mark.parametrize("kind", ["../aio", "aio/../aio", "/tmp/aio", "blktap.block.drivers.aio"])
def test_a_type_with_path_characters_opens_nothing(
    run_dir: str, tmp_path: Path, kind: str
) -> None:
    img = image(tmp_path)
    proc = tapctl("create", "-a", f"{kind}:{img}")
    assert proc.returncode == errno.ENOENT, proc.stderr
    assert ok("list") == ""
    assert sorted(os.listdir(tmp_path)) == ["disk.img"]


@pytest.mark.parametrize("name", ["../../etc/passwd", "/dev/sda", "a\nb", "x" * 4096])
def test_an_export_name_reaches_nothing_else(run_dir: str, tmp_path: Path, name: str) -> None:
    img = image(tmp_path)
    data = os.urandom(4096)
    with open(img, "r+b") as f:
        f.write(data)
    pid, minor = create(img)
    size, _flags, sock = _nbd_connect(f"{run_dir}/nbd{pid}.{minor}", name.encode())
    try:
        assert size == os.path.getsize(img)
        assert _read(sock, 0, 4096) == data
    finally:
        sock.close()
    ok("destroy", "-p", str(pid), "-m", str(minor))


# ------------------------------------------------------------------ read-only VBDs


def _write_through(path: str) -> None:
    """Open ``path`` for writing and write a block at offset 0 (raises OSError)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff" * 4096, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _writable_fds_on(pid: int, path: str) -> list[str]:
    """Descriptors of ``pid`` open on ``path`` for writing."""
    found = []
    real = os.path.realpath(path)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != real:
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        except OSError:
            continue
        flags = int(info.split("flags:")[1].split()[0], 8)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            found.append(fd)
    return found


def _assert_nbd_refuses_writes(path: str) -> None:
    _size, flags, sock = _nbd_connect(path, b"")
    try:
        assert flags & FLAG_READ_ONLY
        for cmd, payload in ((CMD_WRITE, b"\xff" * 4096), (CMD_TRIM, b""),
                             (CMD_WRITE_ZEROES, b"")):
            sock.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, cmd, cmd, 0, 4096) + payload)
            magic, error, cookie = struct.unpack(">IIQ", _recv(sock, 16))
            assert (magic, cookie) == (SIMPLE_MAGIC, cmd)
            assert error == errno.EPERM, (cmd, error)
    finally:
        sock.close()


def test_read_only_vbd_cannot_be_written_over_nbd_or_by_control(
    run_dir: str, tmp_path: Path
) -> None:
    img = image(tmp_path)
    with open(img, "r+b") as f:
        f.write(os.urandom(1 << 20))
    digest = _sha(img)
    device = ok("create", "-R", "-a", f"aio:{img}").strip()
    minor = int(device.rsplit("-", 1)[1])
    (entry,) = parse_list(ok("list"))
    pid = int(entry["pid"])
    nbd = f"{run_dir}/nbd{pid}.{minor}"
    _assert_nbd_refuses_writes(nbd)
    assert _writable_fds_on(pid, img) == []
    # A read-write VBD of the same image is refused while this one is open.
    proc = tapctl("create", "-a", f"aio:{img}")
    assert proc.returncode == errno.EBUSY, proc.stderr
    # Pause and unpause (also onto a "new" leaf, the same file) keep it read-only.
    ok("pause", "-p", str(pid), "-m", str(minor))
    ok("unpause", "-p", str(pid), "-m", str(minor), "-a", f"aio:{img}")
    _assert_nbd_refuses_writes(nbd)
    assert _writable_fds_on(pid, img) == []
    ok("destroy", "-p", str(pid), "-m", str(minor))
    assert _sha(img) == digest


@needs_blockdev
def test_read_only_block_device_cannot_be_written(
    run_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLKTAP_BLOCKDEV", "on")
    img = image(tmp_path)
    with open(img, "r+b") as f:
        f.write(os.urandom(1 << 20))
    digest = _sha(img)
    device = ok("create", "-R", "-a", f"aio:{img}").strip()
    pid = tapdisk_pids(run_dir)[0]
    minor = int(device.rsplit("tapdev", 1)[1])
    loop = os.path.realpath(device)
    ro = subprocess.run(["blockdev", "--getro", loop], capture_output=True, text=True,
                        check=True, timeout=30)
    assert ro.stdout.strip() == "1"
    with pytest.raises(OSError) as raised:
        _write_through(loop)
    assert raised.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    dd = subprocess.run(["dd", "if=/dev/zero", f"of={loop}", "bs=4096", "count=1",
                         "oflag=direct", "conv=notrunc"], capture_output=True, timeout=30)
    assert dd.returncode != 0
    fuse_file = f"{os.path.realpath(run_dir)}/fuse/{minor}/disk"
    with pytest.raises(OSError) as raised:
        os.open(fuse_file, os.O_WRONLY)
    assert raised.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
    assert _writable_fds_on(pid, img) == []
    ok("destroy", "-p", str(pid), "-m", str(minor))
    assert _sha(img) == digest


# ------------------------------------------------------------------ a small NBD client


def _recv(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def _nbd_connect(path: str, name: bytes) -> tuple[int, int, socket.socket]:
    """Fixed-newstyle handshake with NBD_OPT_GO on export ``name``; simple replies.
    Return (size, transmission flags, socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    magic, opts, _flags = struct.unpack(">QQH", _recv(sock, 18))
    assert (magic, opts) == (NBD_MAGIC, OPTS)
    body = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", OPTS, 7, len(body)) + body)
    size = flags = -1
    while True:
        _magic, _opt, rtype, length = struct.unpack(">QIII", _recv(sock, 20))
        reply = _recv(sock, length)
        if rtype == 3 and struct.unpack_from(">H", reply)[0] == 0:  # NBD_INFO_EXPORT
            size, flags = struct.unpack_from(">QH", reply, 2)
        if rtype == 1:  # NBD_REP_ACK
            return size, flags, sock
        assert rtype == 3, f"option refused: reply type {rtype:#x}"


def _read(sock: socket.socket, offset: int, length: int) -> bytes:
    sock.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, 0, 7, offset, length))
    magic, error, _cookie = struct.unpack(">IIQ", _recv(sock, 16))
    assert (magic, error) == (SIMPLE_MAGIC, 0)
    return _recv(sock, length)


def _nbd_read(path: str, offset: int, length: int) -> bytes:
    _size, _flags, sock = _nbd_connect(path, b"")
    try:
        return _read(sock, offset, length)
    finally:
        sock.close()
