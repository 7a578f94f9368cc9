#!/usr/bin/env python3
"""Make a fully allocated dynamic VHD holding the same bytes as a raw image.

    bench/vhd_make.py RAW VHD

Creates VHD with our ``vhd-util create -n VHD -s MB`` and ``vhd-util fill -n VHD`` (every
block allocated, every bitmap full), then copies RAW's bytes into each block's data area
(found through the BAT). The result is what a VM leaves behind after writing every
sector: the ``vhd`` driver reads it with no fall-through and no allocation.
RAW's size must be a whole number of MiB.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from blktap.vhd.image import VhdFile


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 22
    raw, vhd = sys.argv[1], sys.argv[2]
    size = os.stat(raw).st_size
    if size % (1 << 20):
        print(f"{raw}: size {size} is not a whole number of MiB", file=sys.stderr)
        return 22
    tool = str(Path(sys.executable).parent / "vhd-util")
    if os.path.exists(vhd):
        os.unlink(vhd)
    subprocess.run([tool, "create", "-n", vhd, "-s", str(size >> 20)], check=True)
    subprocess.run([tool, "fill", "-n", vhd], check=True)
    vf = VhdFile.open(vhd, writable=True)
    src = os.open(raw, os.O_RDONLY)
    try:
        bs = vf.block_size
        if len(vf.full_blocks) != len(vf.bat):
            print(f"{vhd}: fill left blocks that are not full", file=sys.stderr)
            return 1
        for block in range(len(vf.bat)):
            data = os.pread(src, bs, block * bs)
            base = vf.data_offset_of(block)
            assert base is not None
            done = 0
            while done < len(data):
                done += os.pwrite(vf.fd, data[done:], base + done)
        os.fdatasync(vf.fd)
    finally:
        os.close(src)
        vf.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
