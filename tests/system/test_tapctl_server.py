"""The tap-ctl fork server (blktap.cli.tapctl_server): a command run through it prints,
exits and acts as the same command run in-process (BLKTAP_FORKSERVER=off), with the
caller's working directory, environment and standard input and output."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import TAP_CTL, process_socket_inodes
from tests.system.test_tap_ctl import image, parse_list


def run(*args: str, cwd: str | None = None, off: bool = False,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ if env is None else env)
    if off:
        environ["BLKTAP_FORKSERVER"] = "off"
    return subprocess.run([TAP_CTL, *args], capture_output=True, text=True, cwd=cwd,
                          env=environ, timeout=60, check=False)


def servers() -> list[int]:
    """Processes holding a tap-ctl server socket of our uid."""
    prefix = f"@blktap-tapctl-{os.geteuid()}-"
    inodes = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split(None, 7)
            if len(fields) == 8 and fields[7].startswith(prefix):
                inodes.add(int(fields[6]))
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and inodes & process_socket_inodes(int(e))]


def test_a_server_runs_commands_as_in_process(run_dir: str) -> None:
    run("list")  # starts the server if none runs
    assert servers(), "no tap-ctl server listens after a command"
    for args in (["list"], ["bogus"], ["list", "-m", "99999"], ["allocate"], ["list"],
                 ["--version"], ["create", "-h"]):
        through, alone = run(*args), run(*args, off=True)
        if args == ["allocate"]:  # each allocates: the second gets the next minor
            assert (through.returncode, alone.returncode) == (0, 0)
            assert [through.stdout, alone.stdout] == [f"{run_dir}/tapdisk/tapdisk-0\n",
                                                       f"{run_dir}/tapdisk/tapdisk-1\n"]
            continue
        assert (through.returncode, through.stdout, through.stderr) == (
            alone.returncode, alone.stdout, alone.stderr), args
    assert run("bogus").returncode == 22
    assert run("free", "-m", "0").returncode == 0
    through, alone = run("free", "-m", "0"), run("free", "-m", "0", off=True)
    assert through.returncode == alone.returncode == 2
    assert through.stderr == alone.stderr


def test_working_directory_and_environment_are_the_callers(
    run_dir: str, tmp_path: Path
) -> None:
    run("list")
    img = image(tmp_path, "rel.img")
    created = run("create", "-a", f"aio:{img}")
    assert created.returncode == 0, created.stderr
    # tap-ctl resolves a relative image against its working directory to find it busy
    # (tapdisk itself runs in /): EBUSY, not ENOENT, shows the worker ran in tmp_path.
    for off in (False, True):
        again = run("create", "-a", "aio:rel.img", cwd=str(tmp_path), off=off)
        assert again.returncode == 16, again.stderr
    (entry,) = [e for e in parse_list(run("list").stdout) if "pid" in e]
    # Another run directory in the environment: the same server, another answer.
    other = tmp_path / "other"
    other.mkdir()
    env = dict(os.environ, BLKTAP_RUN_DIR=str(other), BLKTAP_DEV_DIR=str(other / "dev"))
    assert run("list", env=env).stdout == ""
    destroyed = run("destroy", "-p", entry["pid"], "-m", entry["minor"])
    assert destroyed.returncode == 0, destroyed.stderr


def test_standard_input_is_the_callers(run_dir: str) -> None:
    run("list")
    proc = subprocess.run([TAP_CTL, "list"], input="ignored\n", capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout == ""


# The client's imports that a command handed to the server must not pay for (the pip
# entry-point wrapper's re, socket's and signal's enum, typing, the control library).
HEAVY = ("re", "enum", "socket", "signal", "typing", "blktap.cli.tap_ctl", "blktap.control")
CLIENT = """
import sys
sys.argv = ["tap-ctl", *sys.argv[1:]]
from blktap.cli import tapctl_server
status = tapctl_server.main()
sys.stdout.flush()
sys.stderr.write(" ".join(m for m in {heavy!r} if m in sys.modules) + "\\n")
sys.exit(status)
"""


def client(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """tap-ctl's client, run as the tap-ctl script runs it (-I only keeps the
    environment's PYTHONPATH out: the blktap package comes first from ``env``'s
    BLKTAP_SRC_LINK, else this checkout), reporting on its last stderr line which HEAVY
    modules it imported."""
    src = (env or {}).get("BLKTAP_SRC_LINK", str(SRC))
    code = f"import sys; sys.path.insert(0, {src!r})\n" + CLIENT.format(heavy=HEAVY)
    return subprocess.run([sys.executable, "-I", "-c", code, *args], capture_output=True,
                          text=True, env=env, timeout=60, check=False)


def test_the_client_imports_only_builtins_when_a_server_answers(run_dir: str) -> None:
    key = private_installation_env()
    try:
        first = client("list", env=key)  # no server of this installation yet: in-process
        assert first.returncode == 0, first.stderr
        assert "blktap.cli.tap_ctl" in first.stderr.splitlines()[-1].split()
        assert private_servers(key), "the client started no server"
        through = client("list", env=key)
        assert through.returncode == 0 and through.stdout == first.stdout
        assert through.stderr.splitlines()[-1].split() == []
        # Off: the command runs in-process, as it must when no server can be used.
        off = client("list", env=dict(key, BLKTAP_FORKSERVER="off"))
        assert off.returncode == 0 and off.stdout == first.stdout
        assert "blktap.cli.tap_ctl" in off.stderr.splitlines()[-1].split()
    finally:
        stop_private_servers(key)


def test_a_command_without_server_runs_in_process_and_starts_one(run_dir: str) -> None:
    key = private_installation_env()
    try:
        assert private_servers(key) == []
        proc = client("allocate", env=key)
        assert (proc.returncode, proc.stdout) == (0, f"{run_dir}/tapdisk/tapdisk-0\n")
        (server,) = private_servers(key)
        with open(f"/proc/{server}/comm") as f:
            assert f.read().strip() == "tap-ctl-forksrv"
        proc = client("free", "-m", "0", env=key)
        assert proc.returncode == 0 and not os.path.exists(f"{run_dir}/tapdisk/tapdisk-0")
    finally:
        stop_private_servers(key)


SRC = Path(__file__).resolve().parents[2] / "src"


def private_installation_env() -> dict[str, str]:
    """An environment whose tap-ctl server is this test's alone: the server's address
    is keyed on the blktap package's path, here this checkout's src/ through a link of
    our own (another installation, the same code)."""
    link = Path(os.environ["BLKTAP_RUN_DIR"]) / "src"
    link.symlink_to(SRC)
    return dict(os.environ, PYTHONPATH=str(link), BLKTAP_SRC_LINK=str(link))


def private_address(env: dict[str, str]) -> str:
    import zlib

    blktap = os.path.join(env["BLKTAP_SRC_LINK"], "blktap", "__init__.py")
    where = os.path.realpath(os.path.dirname(sys.executable))
    key = zlib.crc32(blktap.encode() + b"\0" + where.encode())
    return f"@blktap-tapctl-{os.geteuid()}-{key:08x}"


def private_servers(env: dict[str, str]) -> list[int]:
    name = private_address(env)
    inodes = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split(None, 7)
            if len(fields) == 8 and fields[7].strip() == name:
                inodes.add(int(fields[6]))
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and inodes & process_socket_inodes(int(e))]


def stop_private_servers(env: dict[str, str]) -> None:
    for pid in private_servers(env):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_signal_before_the_workers_pid_reaches_the_worker(run_dir: str) -> None:
    """SIGTERM to the client while it waits for the worker's pid: the client must not die
    (the worker would finish a create nobody waits for) but pass the signal on once the
    pid comes. A stand-in server (the client's protocol, at this installation's address)
    holds the pid back until the signal was sent; a sleep stands in for the worker."""
    key = private_installation_env()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(private_address(key).replace("@", "\0", 1))
    server.listen(1)
    worker = subprocess.Popen(["sleep", "60"])
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {key['BLKTAP_SRC_LINK']!r})\n"
         + CLIENT.format(heavy=HEAVY), "create", "-a", "aio:/nowhere"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=key)
    try:
        server.settimeout(30)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            request, ancdata, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(12))
            for _, _, data in ancdata:  # the client's stdin, stdout, stderr: not ours
                for i in range(0, len(data) - 3, 4):
                    os.close(int.from_bytes(data[i : i + 4], sys.byteorder))
            assert request.split(b"\0")[4:7] == [b"create", b"-a", b"aio:/nowhere"]
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the handler has run by now (or the client has died)
            assert proc.poll() is None, "the client died of a signal meant for the worker"
            conn.send(b"pid:%d" % worker.pid)
            assert worker.wait(timeout=30) == -signal.SIGTERM
            conn.send(b"exit:4")
        proc.communicate(timeout=30)
        assert proc.returncode == 4
    finally:
        for p in (proc, worker):
            if p.poll() is None:
                p.kill()
        proc.communicate()
        worker.wait()
        server.close()
