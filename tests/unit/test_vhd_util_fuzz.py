"""Malformed images: every vhd-util command answers with an errno and a message, never a
traceback, whatever bytes of the metadata are damaged."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blktap.cli.vhd_util import main
from tests.helpers import FIXTURES

# Offsets inside the metadata of the blktap-layout fixtures: backup footer, header,
# BAT, batmap header, batmap, parent locators, and the trailing footer (negative).
REGIONS = st.one_of(
    st.integers(0, 511),
    st.integers(512, 1535),
    st.integers(1536, 1536 + 127),
    st.integers(2048, 2048 + 63),
    st.integers(2560, 2567),
    st.integers(3072, 3072 + 63),
    st.integers(-512, -1),
)

damage = st.lists(st.tuples(REGIONS, st.integers(0, 255)), min_size=1, max_size=4)

COMMANDS = [
    ["check", "-n", "{img}"],
    ["check", "-n", "{img}", "-p", "-b", "-s"],
    ["query", "-n", "{img}", "-v", "-s", "-p", "-f", "-m", "-d", "-S", "-a"],
    ["read", "-n", "{img}", "-p", "-b", "0", "-t", "0", "-i", "0"],
    ["scan", "-p", "-a", "{img}"],
    ["repair", "-n", "{img}"],
    ["set", "-n", "{img}", "-f", "hidden", "-v", "1"],
    ["fill", "-n", "{img}"],
    ["coalesce", "-n", "{img}"],
    ["resize", "-n", "{img}", "-s", "600", "-j", "{dir}/journal"],
    ["modify", "-n", "{img}", "-z"],
]


@pytest.mark.parametrize("fixture", ["dyn-data.vhd", "child.vhd"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.data_too_large])
@given(hits=damage, command=st.sampled_from(COMMANDS))
def test_damaged_metadata_never_raises(
    fixture: str, hits: list[tuple[int, int]], command: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    with tempfile.TemporaryDirectory() as d:
        for name in ("base.vhd", fixture):
            shutil.copyfile(FIXTURES / name, os.path.join(d, name))
        img = os.path.join(d, fixture)
        size = os.path.getsize(img)
        with open(img, "r+b") as f:
            for offset, value in hits:
                f.seek(offset % size)
                f.write(bytes([value]))
        argv = [a.format(img=img, dir=d) for a in command]
        rc = main(argv)  # must not raise
        out, err = capsys.readouterr()
        assert isinstance(rc, int) and rc >= 0
        if rc and command[0] not in ("check", "scan"):
            assert err.strip(), (argv, rc)
        assert "Traceback" not in out + err


def test_not_a_vhd_at_all(capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        for content in (b"", b"x", b"\0" * 511, os.urandom(4096), b"conectix" * 64):
            img = os.path.join(d, "junk.vhd")
            with open(img, "wb") as f:
                f.write(content)
            for command in COMMANDS:
                rc = main([a.format(img=img, dir=d) for a in command])
                out, err = capsys.readouterr()
                assert rc != 0, (command, content[:16])
                assert (out + err).strip() and "Traceback" not in out + err
