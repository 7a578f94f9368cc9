"""The tap-ctl fork server (blktap.cli.tapctl_server): a command run through it prints,
exits and acts as the same command run in-process (BLKTAP_FORKSERVER=off), with the
caller's working directory, environment and standard input and output."""

from __future__ import annotations

import os
import subprocess
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
