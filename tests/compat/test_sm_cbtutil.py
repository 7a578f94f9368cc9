"""The storage manager's calls to cbt-util (xapi-project/sm, ``libs/sm/cbtutil.py`` and the
older ``drivers/cbtutil.py``): the exact command lines it builds, run against our console
script, and its way of reading the output (``util.pread2``: standard output as text, a
non-zero exit raising).

The SM functions, as facts about their command lines and parsing:
  create_cbt_log(f, size)      create -n f -s str(size)
  set_cbt_parent(f, uuid)      set -n f -p str(uuid)
  get_cbt_parent(f)            get -n f -p       -> str(uuid.UUID(out.strip()))
  set_cbt_child / get_cbt_child  the same with -c
  set_cbt_consistency(f, b)    set -n f -f 1|0
  get_cbt_consistency(f)       get -n f -f       -> bool(int(out.strip()))
  get_cbt_bitmap(f)            get -n f -b -E    -> base64.b64decode(out.strip())
                               (drivers/: get -n f -b -> out.strip(), bytes on Python 2)
  set_cbt_size(f, size)        set -n f -s str(size)
  get_cbt_size(f)              get -n f -s       -> int(out.strip())
  coalesce_bitmap(p, c)        coalesce -p p -c c
"""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

CBT_UTIL = str(Path(sys.executable).parent / "cbt-util")
MiB = 1 << 20
GiB = 1 << 30


class CommandError(Exception):
    """What SM's util.pread2 raises for a non-zero exit (util.CommandException)."""

    def __init__(self, code: int, cmd: list[str], stderr: str) -> None:
        super().__init__(f"{cmd}: exit {code}: {stderr}")
        self.code = code


def pread2(cmd: list[str], *, text: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=text, timeout=60, check=False)
    if proc.returncode:
        raise CommandError(proc.returncode, cmd, proc.stderr)
    return proc.stdout  # type: ignore[no-any-return]


def pread2_bytes(cmd: list[str]) -> bytes:
    proc = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    if proc.returncode:
        raise CommandError(proc.returncode, cmd, proc.stderr.decode())
    return proc.stdout


# The SM module's functions, restated on their command lines.
def create_cbt_log(file_name: str, size: int) -> None:
    pread2([CBT_UTIL, "create", "-n", file_name, "-s", str(size)])


def set_cbt_parent(file_name: str, parent_uuid: uuid.UUID | str) -> None:
    pread2([CBT_UTIL, "set", "-n", file_name, "-p", str(parent_uuid)])


def get_cbt_parent(file_name: str) -> str:
    return str(uuid.UUID(pread2([CBT_UTIL, "get", "-n", file_name, "-p"]).strip()))


def set_cbt_child(file_name: str, child_uuid: uuid.UUID | str) -> None:
    pread2([CBT_UTIL, "set", "-n", file_name, "-c", str(child_uuid)])


def get_cbt_child(file_name: str) -> str:
    return str(uuid.UUID(pread2([CBT_UTIL, "get", "-n", file_name, "-c"]).strip()))


def set_cbt_consistency(file_name: str, consistent: bool) -> None:
    pread2([CBT_UTIL, "set", "-n", file_name, "-f", str(1 if consistent else 0)])


def get_cbt_consistency(file_name: str) -> bool:
    return bool(int(pread2([CBT_UTIL, "get", "-n", file_name, "-f"]).strip()))


def get_cbt_bitmap(file_name: str) -> bytes:
    out = pread2([CBT_UTIL, "get", "-n", file_name, "-b", "-E"])
    return base64.b64decode(out.strip())


def get_cbt_bitmap_raw(file_name: str) -> bytes:
    """drivers/cbtutil.py (Python 2: pread2 returns the bytes as they are)."""
    return pread2_bytes([CBT_UTIL, "get", "-n", file_name, "-b"])


def set_cbt_size(file_name: str, size: int) -> None:
    pread2([CBT_UTIL, "set", "-n", file_name, "-s", str(size)])


def get_cbt_size(file_name: str) -> int:
    return int(pread2([CBT_UTIL, "get", "-n", file_name, "-s"]).strip())


def coalesce_bitmap(parent_path: str, child_path: str) -> None:
    pread2([CBT_UTIL, "coalesce", "-p", parent_path, "-c", child_path])


# --------------------------------------------------------------------------- tests
def test_fresh_log_as_sm_reads_it(tmp_path: Path) -> None:
    log = str(tmp_path / "vdi.cbtlog")
    create_cbt_log(log, 10 * GiB)
    assert get_cbt_parent(log) == "00000000-0000-0000-0000-000000000000"
    assert get_cbt_child(log) == "00000000-0000-0000-0000-000000000000"
    assert get_cbt_consistency(log) is False
    assert get_cbt_size(log) == 10 * GiB
    assert get_cbt_bitmap(log) == bytes(20480)
    assert get_cbt_bitmap_raw(log) == bytes(20480)
    assert Path(log).stat().st_size == 48 + 20480


def test_uuids_and_consistency_round_trip(tmp_path: Path) -> None:
    log = str(tmp_path / "vdi.cbtlog")
    create_cbt_log(log, 64 * MiB)
    parent, child = uuid.uuid4(), uuid.uuid4()
    set_cbt_parent(log, parent)
    set_cbt_child(log, child)
    assert get_cbt_parent(log) == str(parent)
    assert get_cbt_child(log) == str(child)
    set_cbt_consistency(log, True)
    assert get_cbt_consistency(log) is True
    set_cbt_consistency(log, False)
    assert get_cbt_consistency(log) is False
    # SM clears a link by setting the null UUID.
    set_cbt_parent(log, uuid.UUID(int=0))
    assert get_cbt_parent(log) == "00000000-0000-0000-0000-000000000000"
    assert get_cbt_child(log) == str(child)


def test_resize_as_sm_does_it(tmp_path: Path) -> None:
    log = str(tmp_path / "vdi.cbtlog")
    create_cbt_log(log, 64 * MiB)
    set_cbt_size(log, 128 * MiB)
    assert get_cbt_size(log) == 128 * MiB
    assert get_cbt_bitmap(log) == bytes(256)
    with pytest.raises(CommandError) as info:
        set_cbt_size(log, 64 * MiB)
    assert info.value.code == 22
    assert "Size smaller than current file size (134217728)" in str(info.value)
    assert get_cbt_size(log) == 128 * MiB


def mark(log: str, *blocks: int) -> None:
    """Set bits in a log by hand, as a tapdisk's log layer would."""
    with open(log, "r+b") as f:
        for block in blocks:
            f.seek(48 + block // 8)
            byte = f.read(1)[0]
            f.seek(48 + block // 8)
            f.write(bytes([byte | 1 << block % 8]))


def cbt_snapshot(sr: Path, vdi: uuid.UUID, snap: uuid.UUID, size: int, consistent: bool) -> None:
    """SM's VDI._cbt_snapshot (libs/sm/VDI.py): the VDI's log becomes the snapshot's, a
    new log is made for the VDI, and the logs are linked."""
    vdi_log, snap_log = str(sr / f"{vdi}.cbtlog"), str(sr / f"{snap}.cbtlog")
    Path(vdi_log).rename(snap_log)
    set_cbt_consistency(snap_log, True)
    parent = get_cbt_parent(snap_log)
    if (sr / f"{parent}.cbtlog").exists():
        set_cbt_child(str(sr / f"{parent}.cbtlog"), snap)
    create_cbt_log(vdi_log, size)
    set_cbt_consistency(vdi_log, True)
    if not consistent:
        set_cbt_consistency(vdi_log, False)
    current_child = get_cbt_child(snap_log)
    set_cbt_parent(vdi_log, snap)
    set_cbt_child(vdi_log, current_child)
    set_cbt_child(snap_log, vdi)


def changed_blocks(sr: Path, vdi_from: uuid.UUID, vdi_to: uuid.UUID) -> bytes:
    """The shape of SM's VDI.list_changed_blocks: OR the bitmaps from the log after
    ``vdi_from`` to ``vdi_to``'s, following the child links (sizes equal here)."""
    merged: bytes | None = None
    current = get_cbt_child(str(sr / f"{vdi_from}.cbtlog"))
    while True:
        log = str(sr / f"{current}.cbtlog")
        bitmap = get_cbt_bitmap(log)
        if merged is not None:
            bitmap = bytes(a | b for a, b in zip(merged, bitmap, strict=True))
        merged = bitmap
        if current == str(vdi_to):
            return merged
        current = get_cbt_child(log)


def test_snapshot_chain_as_sm_links_and_merges_it(tmp_path: Path) -> None:
    null = "00000000-0000-0000-0000-000000000000"
    vdi, snap1, snap2 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    vdi_log = str(tmp_path / f"{vdi}.cbtlog")
    create_cbt_log(vdi_log, 64 * MiB)  # enable CBT (VDI._create_cbt_log)
    set_cbt_consistency(vdi_log, True)
    mark(vdi_log, 0, 7)
    cbt_snapshot(tmp_path, vdi, snap1, 64 * MiB, True)
    mark(vdi_log, 16, 17)
    cbt_snapshot(tmp_path, vdi, snap2, 64 * MiB, False)
    mark(vdi_log, 1023)
    s1, s2 = str(tmp_path / f"{snap1}.cbtlog"), str(tmp_path / f"{snap2}.cbtlog")

    assert (get_cbt_parent(s1), get_cbt_child(s1)) == (null, str(snap2))
    assert (get_cbt_parent(s2), get_cbt_child(s2)) == (str(snap1), str(vdi))
    assert (get_cbt_parent(vdi_log), get_cbt_child(vdi_log)) == (str(snap2), null)
    assert get_cbt_consistency(s1) and get_cbt_consistency(s2)
    assert get_cbt_consistency(vdi_log) is False

    # What changed since snap1: snap2's blocks and the VDI's.
    since = changed_blocks(tmp_path, snap1, vdi)
    assert [i for i in range(1024) if since[i // 8] >> i % 8 & 1] == [16, 17, 1023]

    # Data-destroy of snap1 merges its log into its child's (cleanup's coalesce_bitmap).
    coalesce_bitmap(s1, s2)
    merged = get_cbt_bitmap(s2)
    assert [i for i in range(1024) if merged[i // 8] >> i % 8 & 1] == [0, 7, 16, 17]
    assert get_cbt_parent(s2) == str(snap1)  # coalesce keeps the child's header


def test_bitmap_base64_output_is_text(tmp_path: Path) -> None:
    """-E exists because Python 3 SM reads output as text; every bitmap byte survives."""
    log = str(tmp_path / "vdi.cbtlog")
    create_cbt_log(log, 128 * MiB)  # 256 bitmap bytes
    with open(log, "r+b") as f:
        f.seek(48)
        f.write(bytes(range(256)))
    assert get_cbt_bitmap(log) == bytes(range(256))
    assert get_cbt_bitmap_raw(log) == bytes(range(256))


def test_failures_raise_as_sm_expects(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.cbtlog")
    with pytest.raises(CommandError) as info:
        get_cbt_size(missing)
    assert info.value.code == 2
    assert "Failed to open log file" in str(info.value)
    with pytest.raises(CommandError) as info:
        coalesce_bitmap(missing, missing)
    assert info.value.code == 2
    short = tmp_path / "short.cbtlog"
    short.write_bytes(bytes(20))
    with pytest.raises(CommandError) as info:
        get_cbt_consistency(str(short))
    assert info.value.code == 5
