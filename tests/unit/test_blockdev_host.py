"""Whether the block-device tests run is decided from the host, not by the code under test.

tests/system/test_blockdev.py and the block-device test of test_tap_ctl.py skip when the
host cannot make a kernel block device (not root, no /dev/fuse, no /dev/loop-control):
tests.helpers.host_block_device_support decides it. If the project's own check,
BlockDevice.available, disagreed, a regression in it would silently skip those tests (or
make tapdisk refuse devices the host can make): this fails instead.
"""

from __future__ import annotations

from blktap.frontends.blockdev import BlockDevice
from tests.helpers import host_block_device_support


def test_block_device_availability_agrees_with_the_host() -> None:
    host_ok, host_why = host_block_device_support()
    ours_ok, ours_why = BlockDevice.available()
    assert ours_ok == host_ok, (
        f"BlockDevice.available() says {ours_ok} ({ours_why or 'no reason'}), "
        f"the host says {host_ok} ({host_why or 'root, /dev/fuse and /dev/loop-control'})")
    assert bool(ours_why) == (not ours_ok), "a reason exactly when unavailable"
