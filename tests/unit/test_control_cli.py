"""tap-ctl's parsing and printing, in process; and the OPEN options it builds."""

from __future__ import annotations

import errno
import struct

import pytest

from blktap.cli import tap_ctl
from blktap.control import OpenOptions, TapEntry
from blktap.control.options import split_image
from blktap.errors import InvalidArgument
from blktap.proto import control as ctl


@pytest.mark.parametrize(
    ("state", "text"),
    [(0, "0"), (2, "0x2"), (0x2A, "0x2a"), (0x200, "0x200"), (-2, "0xfffffffe")],
)
def test_state_prints_like_c_hash_x(state: int, text: str) -> None:
    assert tap_ctl._state_text(state) == text


def test_dict_lines() -> None:
    line = tap_ctl._dict_line(TapEntry(5, 0, 0, "aio", "/tmp/a b"))
    assert line == "pid=5 minor=0 state=0 args=aio:/tmp/a b"
    assert tap_ctl._dict_line(TapEntry(5, 1, 2)) == "pid=5 minor=1 state=0x2"
    assert tap_ctl._dict_line(TapEntry(minor=3)) == "minor=3"
    assert tap_ctl._dict_line(TapEntry(pid=21939)) == "pid=21939"


def test_rows() -> None:
    assert tap_ctl._row(TapEntry(21012, 0, 0x2A, "vhd", "/tmp/x.vhd")) == (
        "   21012    0 0x2a        vhd /tmp/x.vhd"
    )
    assert tap_ctl._row(TapEntry(minor=3)) == "       -    3    -          - -"


def test_list_filters_follow_c() -> None:
    parser = tap_ctl.COMMANDS["list"].build()
    vbd = TapEntry(1, 0, 0, "aio", "/tmp/a")
    bare = TapEntry(pid=2)
    by_type = parser.parse_args(["-t", "vhd"])
    assert not tap_ctl._keep(vbd, by_type)
    assert tap_ctl._keep(bare, by_type)  # entries without a type pass, as in C
    by_file = parser.parse_args(["-f", "/tmp/a"])
    assert tap_ctl._keep(vbd, by_file) and tap_ctl._keep(bare, by_file)
    by_minor = parser.parse_args(["-m", "0"])
    assert tap_ctl._keep(vbd, by_minor) and not tap_ctl._keep(bare, by_minor)


def test_option_parsing_getopt_style() -> None:
    ns = tap_ctl.COMMANDS["create"].build().parse_args(
        ["-a", "aio:/x", "-RD", "-e3", "-2", "aio:/y", "-s", "-t", "30", "-C", "/tmp/log", "-r"]
    )
    options = tap_ctl._options(ns)
    F = ctl.OpenFlag
    assert options.flags == (
        F.RDONLY | F.NO_O_DIRECT | F.REUSE_PRT | F.SECONDARY | F.STANDBY | F.ADD_LOG
        | F.ADD_LCACHE
    )
    got = (options.parent_minor, options.request_timeout_s, options.log_path)
    assert got == (3, 30, "/tmp/log")


def test_standby_needs_a_secondary() -> None:
    ns = tap_ctl.COMMANDS["create"].build().parse_args(["-a", "aio:/x", "-s"])
    with pytest.raises(tap_ctl._UsageError):
        tap_ctl._options(ns)


@pytest.mark.parametrize(
    "argv",
    [[], ["nosuch"], ["free"], ["free", "-m", "-1"], ["destroy", "-p", "0", "-m", "1"],
     ["close", "-p", "1", "-m", "1", "-t", "-5"], ["create", "-a", "aio:/x", "-t", "70000"]],
)
def test_usage_errors(run_dir: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert tap_ctl.main(argv) == errno.EINVAL
    out, err = capsys.readouterr()
    assert out == ""
    assert "usage: tap-ctl" in err


def test_help_exits_0(run_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert tap_ctl.main(["--help"]) == 0
    assert "commands:" in capsys.readouterr().out
    assert tap_ctl.main(["stats", "-h"]) == 0
    assert capsys.readouterr().out.startswith("usage: tap-ctl stats -p PID -m MINOR")
    assert tap_ctl.main(["--version"]) == 0


def test_main_restores_logging(run_dir: str) -> None:
    import logging

    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    tap_ctl.main(["list", "--debug"])
    assert (list(root.handlers), root.level) == before


def test_allocate_free_in_process(run_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert tap_ctl.main(["allocate"]) == 0
    assert capsys.readouterr().out == f"{run_dir}/tapdisk/tapdisk-0\n"
    assert tap_ctl.main(["list"]) == 0
    assert capsys.readouterr().out == "minor=0\n"
    assert tap_ctl.main(["free", "-m", "0", "--debug"]) == 0
    assert tap_ctl.main(["free", "-m", "0"]) == errno.ENOENT
    assert capsys.readouterr().err.splitlines()[-1] == "No such file or directory"


def test_open_options_request() -> None:
    req = OpenOptions(read_only=True, parent_minor=7, secondary="vhd:/s").request(4, "vhd:/p")
    raw = ctl.encode_request(req)
    assert struct.unpack_from("<HH", raw) == (7, 4)
    flags, devnum = struct.unpack_from("<II", raw, 8)
    assert flags == 0x2 | 0x40 | 0x80 and devnum == 4
    assert struct.unpack_from("<I", raw, 8 + 268)[0] == 7
    assert raw[8 + 274 : 8 + 281] == b"vhd:/s\0"
    assert OpenOptions().request(0, "aio:/a").message.payload == ctl.Params(path="aio:/a")


def test_split_image() -> None:
    assert split_image("vhd:/tmp/a:b") == ("vhd", "/tmp/a:b")
    for bad in ("", "aio", ":x", "aio:"):
        with pytest.raises(InvalidArgument):
            split_image(bad)
