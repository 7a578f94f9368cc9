"""Kernel block devices on one raw image, for fio: ours and the host's alternatives.

* ``tapdev``: our tapdisk's block device (``tap-ctl create`` with BLKTAP_BLOCKDEV=on in a
  private run directory: FUSE file served by tapdisk, loop device on top);
* ``qsd-fuse``: qemu-storage-daemon exporting the image over FUSE (``cache.direct=on``,
  ``aio=native``), a loop device on the exported file;
* ``loop``: a loop device straight on the image file (no userspace in the data path: the
  limit of this host).

Each context manager registers its cleanup before it returns, so everything it made
(processes, loop devices, FUSE mounts) goes away when the ``ExitStack`` closes, also on
an exception or KeyboardInterrupt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

BIN = Path(sys.executable).parent

WORKLOADS = [  # the five default workloads: name, fio rw, bs, iodepth, unit
    ("randread-4k-qd1", "randread", "4k", 1, "iops"),
    ("randread-4k-qd32", "randread", "4k", 32, "iops"),
    ("randwrite-4k-qd32", "randwrite", "4k", 32, "iops"),
    ("read-1m-qd8", "read", "1M", 8, "MiB/s"),
    ("write-1m-qd8", "write", "1M", 8, "MiB/s"),
]


def loop_dio(device: str) -> bool | None:
    """Whether the loop device does direct I/O on its backing file (None: unknown)."""
    try:
        name = os.path.basename(os.path.realpath(device))
        return Path(f"/sys/block/{name}/loop/dio").read_text().strip() == "1"
    except OSError:
        return None


def losetup(stack: ExitStack, path: str) -> str:
    """A loop device on ``path``, direct I/O if the kernel accepts it; detached on exit."""
    for flags in (["--direct-io=on"], []):
        proc = subprocess.run(["losetup", *flags, "--show", "-f", path],
                              capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            device = proc.stdout.strip()
            stack.callback(subprocess.run, ["losetup", "-d", device],
                           capture_output=True, check=False)
            return device
    raise RuntimeError(f"losetup {path}: {proc.stderr.strip()}")


def tapdev(stack: ExitStack, image: str, run_dir: str, driver: str = "aio",
           extra_env: dict[str, str] | None = None) -> str:
    """Our tapdisk's block device on ``driver:image``; the VBD is destroyed on exit.
    ``extra_env``: variables for tap-ctl and the tapdisk it spawns (BLKTAP_FUSE_URING...)."""
    env = dict(os.environ, BLKTAP_RUN_DIR=run_dir, BLKTAP_DEV_DIR=os.path.join(run_dir, "dev"),
               BLKTAP_BLOCKDEV="on", **(extra_env or {}))
    tap_ctl = str(BIN / "tap-ctl")

    def destroy_all() -> None:
        listing = subprocess.run([tap_ctl, "list"], capture_output=True, text=True,
                                 env=env, check=False).stdout
        for line in listing.splitlines():
            fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if "pid" in fields and "minor" in fields:
                subprocess.run([tap_ctl, "destroy", "-p", fields["pid"], "-m", fields["minor"]],
                               capture_output=True, env=env, check=False)

    stack.callback(destroy_all)
    proc = subprocess.run([tap_ctl, "create", "-a", f"{driver}:{image}"], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"tap-ctl create: {proc.returncode}: {proc.stderr.strip()}")
    path = proc.stdout.strip()
    if not os.path.exists(path):
        raise RuntimeError(f"tap-ctl create printed {path!r}, which does not exist "
                           "(no kernel block device on this host?)")
    return os.path.realpath(path)


def _mounted(mountpoint: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mountpoint for line in f)


def qsd_fuse(stack: ExitStack, image: str, workdir: str) -> tuple[str, str]:
    """qemu-storage-daemon's FUSE export of ``image``; returns (exported file, command).

    The daemon is stopped (and its mount removed, lazily if it is still there) on exit.
    """
    mountpoint = os.path.join(workdir, "qsd-export")
    Path(mountpoint).touch()
    stack.callback(Path(mountpoint).unlink, missing_ok=True)
    node = {"driver": "file", "node-name": "file", "filename": image,
            "cache": {"direct": True}, "aio": "native"}
    cmd = ["qemu-storage-daemon", "--blockdev", json.dumps(node),
           "--blockdev", "driver=raw,node-name=disk,file=file",
           "--export", f"type=fuse,id=exp,node-name=disk,mountpoint={mountpoint},writable=on"]
    log = open(os.path.join(workdir, "qsd.log"), "wb")  # noqa: SIM115 - closed on exit
    stack.callback(log.close)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if _mounted(mountpoint):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)

    stack.callback(stop)
    deadline = time.monotonic() + 15
    while not _mounted(mountpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("qemu-storage-daemon did not mount its FUSE export: "
                               + Path(workdir, "qsd.log").read_text(errors="replace")[-500:])
        time.sleep(0.05)
    return mountpoint, " ".join(cmd)
