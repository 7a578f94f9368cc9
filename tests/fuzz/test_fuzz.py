"""The fuzzers' share of the suite, on a bounded budget (a few seconds per target):

- every input of the committed corpora (tests/fuzz/corpus/<target>/: seeds, inputs the
  coverage-guided fuzzer kept, ``regress-*`` inputs that once crashed or hung) replayed;
- hypothesis fuzzers that build structured inputs (NBD requests after a real
  handshake, control message sequences, VHD files with mutated metadata);
- a one-second coverage-guided run of each target with atheris (tests/fuzz/run.py).

Long runs are on demand: ``scripts/fuzz.sh TARGET SECONDS``.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.seeds import _msg, _params, _req, vhd_seeds
from tests.fuzz.targets import CONTROL_IMAGE, TARGETS, Target, corpus_dir

ROOT = Path(__file__).resolve().parents[2]
ATHERIS_SECONDS = 1


def _started(name: str) -> Iterator[Target]:
    target = TARGETS[name]()
    target.start()
    try:
        yield target
    finally:
        target.stop()


@pytest.fixture(scope="module")
def nbd_target() -> Iterator[Target]:
    yield from _started("nbd")


@pytest.fixture(scope="module")
def control_target() -> Iterator[Target]:
    yield from _started("control")


@pytest.fixture(scope="module")
def vhd_target() -> Iterator[Target]:
    yield from _started("vhd")


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_corpus_replays_clean(name: str) -> None:
    files = sorted(os.listdir(corpus_dir(name)))
    assert any(f.startswith("seed-") for f in files)
    for target in _started(name):
        for file in files:
            with open(os.path.join(corpus_dir(name), file), "rb") as f:
                data = f.read()
            try:
                target.one(data)
            except AssertionError as exc:
                raise AssertionError(f"corpus input {name}/{file}: {exc}") from exc


# ---------------------------------------------------------------- hypothesis
_SIZE = 1 << 20
_offsets = st.sampled_from([0, 512, 4096, _SIZE - 512, _SIZE, _SIZE + 512, 2**63 - 1,
                            2**64 - 512]) | st.integers(0, 2**64 - 1)
_lengths = st.sampled_from([0, 1, 511, 512, 4096, 65536, 1 << 25, (1 << 25) + 1,
                            2**32 - 1]) | st.integers(0, 2**32 - 1)


@st.composite
def _nbd_request(draw: st.DrawFn) -> bytes:
    cmd = draw(st.integers(0, 12))
    flags = draw(st.integers(0, 0x3F) | st.integers(0, 0xFFFF))
    length = draw(_lengths)
    head = _req(cmd, draw(st.integers(0, 2**64 - 1)), draw(_offsets), length, flags)
    if cmd == 1:  # WRITE: its payload, whole or cut short
        head += bytes(min(length, draw(st.integers(0, 8192))))
    return head


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from([b"\x01", b"\x02", b"\x04", b"\x05"]),
       requests=st.lists(_nbd_request(), max_size=8),
       tail=st.binary(max_size=40))
def test_hypothesis_nbd_transmission(nbd_target: Target, mode: bytes,
                                     requests: list[bytes], tail: bytes) -> None:
    nbd_target.one(mode + b"".join(requests) + tail)


@st.composite
def _nbd_option(draw: st.DrawFn) -> bytes:
    opt = draw(st.integers(0, 12) | st.integers(0, 2**32 - 1))
    payload = draw(st.binary(max_size=64))
    length = draw(st.just(len(payload)) | st.integers(0, 2**32 - 1))
    return struct.pack(">QII", 0x49484156454F5054, opt, length) + payload


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(flags=st.integers(0, 2**32 - 1) | st.sampled_from([1, 3]),
       options=st.lists(_nbd_option(), max_size=5), tail=st.binary(max_size=64))
def test_hypothesis_nbd_handshake(nbd_target: Target, flags: int, options: list[bytes],
                                  tail: bytes) -> None:
    nbd_target.one(b"\x00" + struct.pack(">I", flags) + b"".join(options) + tail)


_paths = st.sampled_from([f"aio:{CONTROL_IMAGE}", f"null:aio:{CONTROL_IMAGE}",
                          f"fault:op=read,rate=0.5:aio:{CONTROL_IMAGE}", "", "aio:",
                          "vhd:/nonexistent", "fault:bad:aio:/x", "x" * 300]) | st.text(
    max_size=40)


@st.composite
def _control_message(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 28, 30])
                | st.integers(0, 0xFFFF))
    cookie = draw(st.sampled_from([0, 1, 2, 0xFFFF]) | st.integers(0, 0xFFFF))
    if draw(st.booleans()):
        path = draw(_paths)
        union = _params(path, draw(st.integers(0, 0xFFF)), draw(st.integers(0, 0xFFFF)))
        union = union if len(path.encode()) <= 256 else draw(st.binary(max_size=536))
    else:
        union = draw(st.binary(max_size=536))
    return _msg(kind, cookie, union)


@settings(max_examples=50, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(messages=st.lists(_control_message(), min_size=1, max_size=6),
       cut=st.integers(0, 600))
def test_hypothesis_control(control_target: Target, messages: list[bytes],
                            cut: int) -> None:
    data = b"".join(messages)
    control_target.one(data[:len(data) - cut] if cut < 544 else data)


_VHD_SEEDS = vhd_seeds()


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(sorted(_VHD_SEEDS)),
       edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=8),
       from_end=st.booleans(), cut=st.integers(0, 600))
def test_hypothesis_vhd(vhd_target: Target, seed: str, edits: list[tuple[int, int]],
                        from_end: bool, cut: int) -> None:
    data = bytearray(_VHD_SEEDS[seed])
    for pos, value in edits:  # metadata lives in the first and last few KiB
        index = len(data) - 1 - pos if from_end else pos
        if 0 <= index < len(data):
            data[index] = value
    if cut < 512:
        del data[len(data) - cut:]
    vhd_target.one(bytes(data))


# ------------------------------------------------------------------ atheris
def _atheris_missing() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.skipif(_atheris_missing(), reason="atheris is not installed (the test extra "
                                               "of pyproject.toml installs it)")
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_atheris_short_run(name: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", name, str(ATHERIS_SECONDS),
         "--work", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = re.search(r"^stat::number_of_executed_units:\s*(\d+)", proc.stderr, re.M)
    assert runs is not None and int(runs.group(1)) > 0, proc.stderr[-2000:]
    assert not os.listdir(tmp_path / "crashes")
