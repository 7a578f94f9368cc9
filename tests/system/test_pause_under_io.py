"""Pause and resume a VBD while fio writes through its NBD export: nothing fails or is lost."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.helpers import Tapdisk, exchange, message, params, split_messages
from tests.system.test_tapdisk_control import (
    PAUSE,
    PAUSE_RSP,
    RESUME,
    RESUME_RSP,
    STATS,
    attach_open,
    list_entries,
    one,
)

NO_O_DIRECT = 0x200


@pytest.mark.parametrize("flags", [NO_O_DIRECT, 0], ids=["buffered", "direct"])
def test_pause_while_fio_writes(run_dir: str, tapdisk: Tapdisk, flags: int) -> None:
    image = os.path.join("/var/tmp", f"pause-{os.getpid()}-{flags}.raw")
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    try:
        attach_open(run_dir, tapdisk, 0, f"aio:{image}", flags)
        sock = os.path.join(run_dir, f"nbd{tapdisk.pid}.0")
        # Rate-limited so that the pause lands in the middle of the write phase; fio then
        # reads every block back and checks its crc32c.
        fio = subprocess.Popen(
            ["fio", "--name=pause", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
             "--rw=randwrite", "--bs=4k", "--size=16M", "--iodepth=16", "--rate_iops=2000",
             "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
             "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            time.sleep(0.7)
            assert fio.poll() is None, "fio finished before the pause"
            assert one(tapdisk, PAUSE, 0)[0] == PAUSE_RSP
            assert list_entries(tapdisk)[0][2] == 0x2A
            time.sleep(1.0)
            assert fio.poll() is None
            assert one(tapdisk, RESUME, 0, params(""))[0] == RESUME_RSP
            out, err = fio.communicate(timeout=60)
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
        assert fio.returncode == 0, err.decode()
        job = json.loads(out[out.index(b"{"):])["jobs"][0]
        assert job["error"] == 0
        assert job["write"]["total_ios"] == 4096
        assert job["read"]["total_ios"] == 4096  # the verify pass read everything back
        data = exchange(tapdisk.ctl, message(STATS, 0))
        stats = json.loads(data[544:])
        assert stats["errors"] == [0, 0]
        assert split_messages(data)[0][0] == 22
    finally:
        os.unlink(image)
