"""The ``rbd`` driver against a real single-node Ceph cluster (scripts/ceph-cluster.sh).

The cluster is started once for the run (``ceph_cluster``) in a private directory and
stopped, everything removed, at the end, also when tests fail. Each test makes its own
images; tapdisks run in the private ``run_dir`` and are driven with ``tap-ctl``. Peers:
qemu's own rbd driver (``qemu-img``/``qemu-io`` with ``rbd:pool/image:conf=...``), the
``rbd`` tool (import, export, snapshots, clones), and fio and qemu over the NBD export.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap.block.drivers.rbd import DEFAULT_TIMEOUT, RbdTarget, client_id_from_env, parse_target
from blktap.errors import InvalidArgument
from tests.ceph_helpers import (
    SCRIPT,
    Cluster,
    shared_cluster,
    stop_shared_cluster,
    unique_image,
)
from tests.helpers import (
    TAP_CTL,
    VHD_UTIL,
    Tapdisk,
    host_block_device_support,
    short_tempdir,
    tapdisks_under,
)

MiB = 1 << 20
SIZE = 64 * MiB


# ------------------------------------------------------------------ fixtures, helpers


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[Cluster]:
    """The run's cluster; stopped and removed at the end of the session."""
    try:
        yield shared_cluster()
    finally:
        stop_shared_cluster()


@pytest.fixture
def new_image(ceph_cluster: Cluster) -> Iterator[str]:
    """A fresh empty 64 MiB image ``rbd/NAME``; removed afterwards (best effort: a
    tapdisk a failed test left may still hold it until run_dir's teardown)."""
    name = f"rbd/{unique_image()}"
    ceph_cluster.rbd("create", "--size", str(SIZE // MiB), name)
    yield name
    subprocess.run(["rbd", "--conf", ceph_cluster.conf, "rm", "--no-progress", name],
                   capture_output=True, timeout=60)


def tapctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TAP_CTL, *args], capture_output=True, text=True, timeout=120,
                          env=env)


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    proc = tapctl(*args, env=env)
    assert proc.returncode == 0, (args, proc.returncode, proc.stderr)
    return proc.stdout


def spec(cluster: Cluster, name: str, *options: str) -> str:
    return ":".join([f"rbd:{name}", f"conf={cluster.conf}", *options])


def create(run_dir: str, image: str, *flags: str,
           env: dict[str, str] | None = None) -> tuple[int, int, str]:
    """``tap-ctl create -a IMAGE``: (pid, minor, NBD URI) of the new VBD."""
    device = ok("create", "-a", image, *flags, env=env).strip()
    minor = int(device.rsplit("-", 1)[1])
    entries = [dict(f.split("=", 1) for f in line.split())
               for line in ok("list", "-m", str(minor), env=env).splitlines()]
    (entry,) = [e for e in entries if "pid" in e]
    assert entry["args"] == image
    pid = int(entry["pid"])
    return pid, minor, f"nbd+unix:///?socket={run_dir}/nbd{pid}.{minor}"


def destroy(pid: int, minor: int, env: dict[str, str] | None = None) -> None:
    ok("destroy", "-p", str(pid), "-m", str(minor), env=env)


def sh(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout


def qemu_io(target: str, *commands: str, read_only: bool = False, fmt: str = "raw") -> str:
    """qemu-io on ``target``; fails the test when a command fails."""
    args = ["qemu-io", "-f", fmt, *(["-r"] if read_only else [])]
    for c in commands:
        args += ["-c", c]
    out = sh(*args, target, timeout=120)
    assert "failed" not in out.lower(), out
    return out


def patterned(path: Path, size: int = SIZE) -> bytes:
    """A file of ``size`` bytes: random data in every other MiB, zeros between."""
    data = bytearray(size)
    for off in range(0, size, 2 * MiB):
        data[off : off + MiB] = os.urandom(MiB)
    path.write_bytes(data)
    return bytes(data)


def fio_json(out: str) -> dict[str, object]:
    job: dict[str, object] = json.loads(out[out.index("{"):])["jobs"][0]
    return job


# ------------------------------------------------------------------- pure: parsing


def test_parse_target_forms() -> None:
    assert parse_target("rbd/vm1") == RbdTarget("rbd", "vm1")
    assert parse_target("p/ns/img@snap:conf=/c/ceph.conf:id=tap:keyring=/k:timeout=5:"
                        "rbd_cache=false") == RbdTarget(
        "p", "img", namespace="ns", snapshot="snap", conf="/c/ceph.conf", client_id="tap",
        keyring="/k", timeout=5, options=(("rbd_cache", "false"),))
    assert parse_target("rbd/x").timeout == DEFAULT_TIMEOUT
    assert parse_target("p/ns/img@s").name == "p/ns/img@s"


@pytest.mark.parametrize("text", [
    "img", "/img", "rbd/", "a/b/c/d", "rbd/img@", "rbd/@s", "rbd/i@s@t", "rbd/img:conf",
    "rbd/img:=x", "rbd/img:conf=", "rbd/img:timeout=soon", "rbd/img:timeout=-1",
    "rbd/img:id=a:id=b", "rbd/img:x=1:x=2",
])
def test_parse_target_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_target(text)


def test_client_id_from_ceph_args() -> None:
    assert client_id_from_env("--id tap --keyring /k") == "tap"
    assert client_id_from_env("--user=tap") == "tap"
    assert client_id_from_env("-n client.tap") == "tap"
    assert client_id_from_env("--name=osd.0") is None
    assert client_id_from_env("--keyring /k") is None


# ------------------------------------------------------------- through a tapdisk


def test_cluster_is_up_with_an_rbd_pool(ceph_cluster: Cluster) -> None:
    pools = sh("ceph", "--conf", ceph_cluster.conf, "osd", "pool", "ls").split()
    assert "rbd" in pools
    out = sh("ceph", "--conf", ceph_cluster.conf, "osd", "pool", "get", "rbd", "size")
    assert out.split() == ["size:", "1"]


def test_cluster_script_start_is_idempotent_and_stop_refuses_foreign_dirs(
    ceph_cluster: Cluster, tmp_path: Path,
) -> None:
    out = sh(SCRIPT, "start", ceph_cluster.dir)
    assert out.splitlines()[-1] == ceph_cluster.conf
    sh(SCRIPT, "status", ceph_cluster.dir)
    assert sh("ceph", "--conf", ceph_cluster.conf, "health").split()[0] in (
        "HEALTH_OK", "HEALTH_WARN")
    foreign = tmp_path / "not-a-cluster"
    foreign.mkdir()
    (foreign / "precious").write_text("keep me")
    proc = subprocess.run([SCRIPT, "stop", str(foreign)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "not removing it" in proc.stderr
    assert (foreign / "precious").read_text() == "keep me"
    proc = subprocess.run([SCRIPT, "status", str(foreign)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1


def test_written_through_tapdisk_reads_back_with_qemu_and_rbd_export(
    ceph_cluster: Cluster, run_dir: str, new_image: str, tmp_path: Path,
) -> None:
    source = tmp_path / "source.raw"
    data = patterned(source)
    pid, minor, uri = create(run_dir, spec(ceph_cluster, new_image))
    sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), uri)
    stats = json.loads(ok("stats", "-p", str(pid), "-m", str(minor)))
    assert stats["errors"] == [0, 0] and stats["images"][0]["driver"]["name"] == "rbd"
    destroy(pid, minor)
    exported = tmp_path / "exported.raw"
    ceph_cluster.rbd("export", "--no-progress", new_image, str(exported))
    assert exported.read_bytes() == data
    by_qemu = tmp_path / "qemu.raw"
    sh("qemu-img", "convert", "-f", "raw", "-O", "raw", ceph_cluster.qemu_uri(new_image),
       str(by_qemu))
    assert by_qemu.read_bytes() == data


def test_imported_and_qemu_written_data_reads_back_through_tapdisk(
    ceph_cluster: Cluster, run_dir: str, tmp_path: Path,
) -> None:
    source = tmp_path / "source.raw"
    data = bytearray(patterned(source))
    name = f"rbd/{unique_image('imported')}"
    ceph_cluster.rbd("import", "--no-progress", str(source), name)
    # qemu's own rbd driver writes too, inside a hole and across a data/hole edge.
    qemu_io(ceph_cluster.qemu_uri(name), "write -P 0x3c 1536k 64k", "write -P 0xc3 4032k 128k")
    data[1536 * 1024 : 1600 * 1024] = b"\x3c" * 65536
    data[4032 * 1024 : 4160 * 1024] = b"\xc3" * 131072
    pid, minor, uri = create(run_dir, spec(ceph_cluster, name))
    out = tmp_path / "out.raw"
    sh("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out))
    destroy(pid, minor)
    assert out.read_bytes() == bytes(data)
    ceph_cluster.rbd("rm", "--no-progress", name)


def test_ceph_conf_from_the_environment(
    ceph_cluster: Cluster, run_dir: str, new_image: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CEPH_CONF", ceph_cluster.conf)
    pid, minor, uri = create(run_dir, f"rbd:{new_image}")
    qemu_io(uri, "write -P 0x77 0 64k")
    destroy(pid, minor)
    qemu_io(ceph_cluster.qemu_uri(new_image), "read -P 0x77 0 64k")


def test_fio_crc32c_verify_at_qd32_through_nbd(
    ceph_cluster: Cluster, run_dir: str, new_image: str,
) -> None:
    pid, minor, uri = create(run_dir, spec(ceph_cluster, new_image))
    out = sh("fio", "--name=rbd", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
             "--bsrange=4k-64k", "--size=32M", "--iodepth=32", "--verify=crc32c",
             "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
             "--output-format=json")
    job = fio_json(out)
    assert job["error"] == 0
    write, read = job["write"], job["read"]
    assert isinstance(write, dict) and isinstance(read, dict)
    assert write["io_bytes"] == 32 * MiB
    assert read["io_bytes"] == 32 * MiB  # the verify pass read every block back
    stats = json.loads(ok("stats", "-p", str(pid), "-m", str(minor)))
    assert stats["errors"] == [0, 0]
    destroy(pid, minor)


def test_pause_and_unpause_under_io(
    ceph_cluster: Cluster, run_dir: str, new_image: str,
) -> None:
    pid, minor, uri = create(run_dir, spec(ceph_cluster, new_image))
    fio = subprocess.Popen(
        ["fio", "--name=pause", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
         "--bs=4k", "--size=8M", "--iodepth=16", "--rate_iops=1000", "--verify=crc32c",
         "--do_verify=1", "--verify_state_save=0", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(0.7)
        assert fio.poll() is None, "fio finished before the pause"
        ok("pause", "-p", str(pid), "-m", str(minor), "-t", "30")
        (entry,) = [line for line in ok("list").splitlines() if f"pid={pid}" in line]
        assert "state=0x2a" in entry
        time.sleep(1.0)
        assert fio.poll() is None
        ok("unpause", "-p", str(pid), "-m", str(minor))
        out, err = fio.communicate(timeout=120)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, err
    job = fio_json(out)
    assert job["error"] == 0
    write = job["write"]
    assert isinstance(write, dict) and write["total_ios"] == 2048
    destroy(pid, minor)


@contextlib.contextmanager
def second_host() -> Iterator[tuple[str, dict[str, str]]]:
    """Another private run directory (another host's tapdisks) and its environment;
    its tapdisks are killed afterwards."""
    with short_tempdir() as other:
        env = {**os.environ, "BLKTAP_RUN_DIR": other,
               "BLKTAP_DEV_DIR": os.path.join(other, "dev"), "BLKTAP_BLOCKDEV": "off"}
        try:
            yield other, env
        finally:
            for pid in tapdisks_under([os.path.realpath(other)]):
                Tapdisk(pid, "").kill()


def test_second_read_write_open_is_refused(
    ceph_cluster: Cluster, run_dir: str, new_image: str,
) -> None:
    image = spec(ceph_cluster, new_image)
    pid, minor, uri = create(run_dir, image)
    qemu_io(uri, "write -P 0x42 0 64k")
    with second_host() as (other, env):
        proc = tapctl("create", "-a", image, env=env)
        assert proc.returncode == errno.EBUSY, proc
        assert "open read-write by another client" in proc.stderr
        assert new_image in proc.stderr
        # Read-only opens are allowed and see the writer's data.
        pid2, minor2, uri2 = create(other, image, "-R", env=env)
        qemu_io(uri2, "read -P 0x42 0 64k", read_only=True)
        destroy(pid2, minor2, env=env)
        # Once the first closes, the image is free for a writer elsewhere.
        destroy(pid, minor)
        pid3, minor3, uri3 = create(other, image, env=env)
        qemu_io(uri3, "write -P 0x43 0 64k", "read -P 0x43 0 64k")
        destroy(pid3, minor3, env=env)


def test_qemu_is_refused_while_tapdisk_writes(
    ceph_cluster: Cluster, run_dir: str, new_image: str,
) -> None:
    pid, minor, _ = create(run_dir, spec(ceph_cluster, new_image))
    proc = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4k", ceph_cluster.qemu_uri(new_image)],
        capture_output=True, text=True, timeout=120)
    # librbd asks the owner for the lock; ours refuses: qemu's write fails.
    assert "failed" in (proc.stdout + proc.stderr).lower() or proc.returncode != 0, proc
    destroy(pid, minor)
    qemu_io(ceph_cluster.qemu_uri(new_image), "read -P 0 0 4k")


def test_snapshot_opens_read_only_with_its_contents(
    ceph_cluster: Cluster, run_dir: str, new_image: str,
) -> None:
    qemu_io(ceph_cluster.qemu_uri(new_image), "write -P 0x51 0 1M")
    ceph_cluster.rbd("snap", "create", f"{new_image}@one")
    qemu_io(ceph_cluster.qemu_uri(new_image), "write -P 0x52 0 1M")
    pid, minor, uri = create(run_dir, spec(ceph_cluster, f"{new_image}@one"))
    qemu_io(uri, "read -P 0x51 0 1M", read_only=True)
    # The export is read-only: a writer cannot even connect.
    proc = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x53 0 4k", uri],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc
    destroy(pid, minor)
    qemu_io(ceph_cluster.qemu_uri(f"{new_image}@one"), "read -P 0x51 0 1M", read_only=True)
    qemu_io(ceph_cluster.qemu_uri(new_image), "read -P 0x52 0 1M")


def test_clone_reads_its_parent_through_librbd(
    ceph_cluster: Cluster, run_dir: str, new_image: str,
) -> None:
    qemu_io(ceph_cluster.qemu_uri(new_image), "write -P 0x61 0 8M")
    ceph_cluster.rbd("snap", "create", f"{new_image}@gold")
    ceph_cluster.rbd("snap", "protect", f"{new_image}@gold")
    clone = f"rbd/{unique_image('clone')}"
    ceph_cluster.rbd("clone", f"{new_image}@gold", clone)
    pid, minor, uri = create(run_dir, spec(ceph_cluster, clone))
    qemu_io(uri, "read -P 0x61 0 8M", "write -P 0x62 1M 64k", "read -P 0x62 1M 64k",
            "read -P 0x61 0 1M", "read -P 0 8M 1M")
    destroy(pid, minor)
    qemu_io(ceph_cluster.qemu_uri(f"{new_image}@gold"), "read -P 0x61 0 8M", read_only=True)
    qemu_io(ceph_cluster.qemu_uri(clone), "read -P 0x62 1M 64k", "read -P 0x61 2M 6M")
    ceph_cluster.rbd("rm", "--no-progress", clone)
    ceph_cluster.rbd("snap", "unprotect", f"{new_image}@gold")
    ceph_cluster.rbd("snap", "rm", "--no-progress", f"{new_image}@gold")


def test_block_status_shows_written_extents(
    ceph_cluster: Cluster, run_dir: str, new_image: str,
) -> None:
    pid, minor, uri = create(run_dir, spec(ceph_cluster, new_image))
    qemu_io(uri, "write -P 0x71 8M 1M")
    extents = json.loads(sh("qemu-img", "map", "--output=json", "-f", "raw", uri))
    data = [(e["start"], e["start"] + e["length"]) for e in extents if e["data"]]
    # The written MiB is data; what was never written is not (never mind librbd's
    # rounding inside the 4 MiB object).
    assert any(start <= 8 * MiB and 9 * MiB <= end for start, end in data), extents
    assert all(8 * MiB - 4 * MiB <= start and end <= 9 * MiB + 4 * MiB
               for start, end in data), extents
    discard = qemu_io(uri, "discard 8M 1M", "read -P 0 8M 1M")
    assert "discarded" in discard.lower() or "discard" in discard.lower()
    destroy(pid, minor)


def test_cluster_stopped_gives_errors_then_io_resumes(
    ceph_cluster: Cluster, run_dir: str, new_image: str,
) -> None:
    timeout = 3
    pid, minor, uri = create(run_dir, spec(ceph_cluster, new_image, f"timeout={timeout}"))
    qemu_io(uri, "write -P 0x21 0 64k", "read -P 0x21 0 64k")
    osd = ceph_cluster.daemon_pid("osd.0")
    os.kill(osd, signal.SIGSTOP)
    try:
        start = time.monotonic()
        proc = subprocess.run(["qemu-io", "-f", "raw", "-c", "read 32M 64k",
                               "-c", "write -P 0x22 16M 64k", uri],
                              capture_output=True, text=True, timeout=20 * timeout + 60)
        took = time.monotonic() - start
    finally:
        os.kill(osd, signal.SIGCONT)
    out = proc.stdout + proc.stderr
    assert out.lower().count("failed") >= 1, out
    assert took < 20 * timeout + 60  # errors, not a hang
    # The cluster is back: the same VBD serves I/O again.
    deadline = time.monotonic() + 60
    while True:
        proc = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x23 16M 64k",
                               "-c", "read -P 0x23 16M 64k", "-c", "read -P 0x21 0 64k", uri],
                              capture_output=True, text=True, timeout=120)
        if "failed" not in (proc.stdout + proc.stderr).lower():
            break
        assert time.monotonic() < deadline, proc.stdout + proc.stderr
        time.sleep(1)
    destroy(pid, minor)
    qemu_io(ceph_cluster.qemu_uri(new_image), "read -P 0x23 16M 64k")


def test_local_vhd_snapshot_over_an_rbd_parent(
    ceph_cluster: Cluster, run_dir: str, new_image: str, tmp_path: Path,
) -> None:
    qemu_io(ceph_cluster.qemu_uri(new_image), "write -P 0x81 0 4M", "write -P 0x82 60M 4M")
    child = str(tmp_path / "child.vhd")
    parent = spec(ceph_cluster, new_image)
    sh(VHD_UTIL, "snapshot", "-n", child, "-p", parent, "-m")
    assert sh(VHD_UTIL, "query", "-n", child, "-v").strip() == str(SIZE // MiB)
    assert sh(VHD_UTIL, "query", "-n", child, "-p").strip() == parent
    pid, minor, uri = create(run_dir, f"vhd:{child}")
    stats = json.loads(ok("stats", "-p", str(pid), "-m", str(minor)))
    assert [i["driver"]["name"] for i in stats["images"]] == ["vhd", "rbd"]
    qemu_io(uri, "read -P 0x81 0 4M", "read -P 0x82 60M 4M", "read -P 0 4M 1M",
            "write -P 0x83 1M 64k", "read -P 0x83 1M 64k", "read -P 0x81 0 1M")
    destroy(pid, minor)
    # The write went to the local child; the shared base is unchanged and was opened
    # read-only (another host may open it read-write meanwhile).
    qemu_io(ceph_cluster.qemu_uri(new_image), "read -P 0x81 0 4M")
    qemu_io(child, "read -P 0x83 1M 64k", fmt="vpc")
    # A snapshot of that VHD links to it; one of an empty such VHD links to the RBD
    # image itself (vhd-util skips empty parents without -e).
    grandchild = str(tmp_path / "grandchild.vhd")
    sh(VHD_UTIL, "snapshot", "-n", grandchild, "-p", child)
    assert sh(VHD_UTIL, "query", "-n", grandchild, "-p").strip() == child
    empty = str(tmp_path / "empty.vhd")
    sh(VHD_UTIL, "snapshot", "-n", empty, "-p", parent, "-m")
    skipping = str(tmp_path / "skipping.vhd")
    sh(VHD_UTIL, "snapshot", "-n", skipping, "-p", empty)
    assert sh(VHD_UTIL, "query", "-n", skipping, "-p").strip() == parent
    pid, minor, uri = create(run_dir, f"vhd:{grandchild}")
    qemu_io(uri, "read -P 0x83 1M 64k", "read -P 0x81 0 1M", "read -P 0x82 60M 4M")
    destroy(pid, minor)


def test_live_snapshot_unpauses_onto_an_rbd_clone(
    ceph_cluster: Cluster, run_dir: str, new_image: str,
) -> None:
    pid, minor, uri = create(run_dir, spec(ceph_cluster, new_image))
    qemu_io(uri, "write -P 0x91 0 1M")
    ok("pause", "-p", str(pid), "-m", str(minor), "-t", "30")
    # Paused, the image is closed (its lock released): the snapshot and clone can be made.
    ceph_cluster.rbd("snap", "create", f"{new_image}@live")
    ceph_cluster.rbd("snap", "protect", f"{new_image}@live")
    leaf = f"rbd/{unique_image('leaf')}"
    ceph_cluster.rbd("clone", f"{new_image}@live", leaf)
    ok("unpause", "-p", str(pid), "-m", str(minor), "-a", spec(ceph_cluster, leaf))
    qemu_io(uri, "read -P 0x91 0 1M", "write -P 0x92 0 64k", "read -P 0x92 0 64k")
    destroy(pid, minor)
    qemu_io(ceph_cluster.qemu_uri(f"{new_image}@live"), "read -P 0x91 0 1M", read_only=True)
    qemu_io(ceph_cluster.qemu_uri(leaf), "read -P 0x92 0 64k", "read -P 0x91 64k 960k")
    ceph_cluster.rbd("rm", "--no-progress", leaf)


_blockdev_ok, _blockdev_why = host_block_device_support()


@pytest.mark.skipif(not _blockdev_ok, reason=f"no FUSE+loop block device here: {_blockdev_why}")
def test_fio_crc32c_verify_at_qd32_through_the_block_device(
    ceph_cluster: Cluster, run_dir: str, new_image: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BLKTAP_BLOCKDEV", "on")
    image = spec(ceph_cluster, new_image)
    device = ok("create", "-a", image).strip()
    assert device == os.path.join(os.environ["BLKTAP_DEV_DIR"], "tapdev0")
    (entry,) = [dict(f.split("=", 1) for f in line.split())
                for line in ok("list").splitlines() if "pid=" in line]
    assert entry["args"] == image
    out = sh("fio", "--name=rbd-bdev", f"--filename={device}", "--ioengine=libaio",
             "--direct=1", "--rw=randwrite", "--bsrange=4k-64k", "--size=32M",
             "--iodepth=32", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
             "--verify_state_save=0", "--output-format=json")
    job = fio_json(out)
    assert job["error"] == 0
    write, read = job["write"], job["read"]
    assert isinstance(write, dict) and isinstance(read, dict)
    assert write["io_bytes"] == 32 * MiB and read["io_bytes"] == 32 * MiB
    destroy(int(entry["pid"]), int(entry["minor"]))
