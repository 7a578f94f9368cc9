#!/usr/bin/env python3
"""Crash harness: ``kill -9`` a tapdisk (and ``vhd-util coalesce``/``resize``) at random
instants, reopen, and check what the disk holds.

    bench/crash.py [--rounds 60] [--kinds raw,vhd,diff] [--frontends nbd,blockdev]
                   [--seed N] [--json OUT] [--dir DIR] [--per-image 4]

Rounds are spread over groups (image kind x frontend). A group makes a small image
(16 MiB: ``raw`` a sparse file, ``vhd`` a dynamic VHD, ``diff`` a differencing VHD over
a raw parent filled with a known pattern) and runs ``--per-image`` rounds on it. A round:

1. ``tap-ctl create`` on the image (with ``BLKTAP_BLOCKDEV=on`` for ``blockdev``); this
   is the reopen of the previous round's image, with no manual step in between;
2. verify: every sector read back through NBD is a value the model allows (below);
3. a writer does 4 KiB-aligned writes (1-4 pages, 5% of them into a 2 MiB block nothing
   was written to yet: a VHD block allocation) and a flush after about one write in
   three, one at a time, through libnbd (``nbd``) or O_DIRECT ``pwrite`` + ``fdatasync``
   on the tap device (``blockdev``), while a timer sends SIGKILL to the tapdisk at a
   random instant (0..--max-kill-delay s), or, in half the rounds on a VHD, within the
   median time an allocating write took so far from the start of a write to an
   unallocated block: in the middle of the allocation;
4. ``tap-ctl free`` of the dead minor, or ``tap-ctl destroy`` of the dead tapdisk's VBD
   (every other round): its sockets, mount, loop device and link go.

Every 512-byte sector written carries a tag (run, round, write sequence number, sector
number) repeated over the sector. The model: a write acknowledged before the start of the
last flush that completed must read back, unless a later write to the same sector (even
one not acknowledged) replaced it; otherwise the sector may hold its previous value or any
later write to it. Anything else - a lost write, a torn sector, data never written to that
sector - is counted as a violation. After its last round a group closes the image with a
final verify, then ``vhd`` groups run ``vhd-util resize -j`` and ``diff`` groups ``vhd-util
coalesce``, killed at a random instant; then ``vhd-util check`` must accept the image(s)
(after ``vhd-util revert`` when a resize journal is left, as with the C tool) and the
data must read back unchanged.

Prints one line per round (with -q, a progress line every 25 images) and a summary;
``--json`` writes the summary and every round. A failure of the harness's own steps
(``HarnessError``: tap-ctl failing or timing out, including a create that cannot reopen
a killed image) is noted in the summary's ``harness_errors`` with its message, the
group's VBDs are released and the run goes on with a new image, up to
--max-harness-errors. Exit status 0 when no violation, no invalid image and no harness
error was found, 1 otherwise.
Environment: BLKTAP_RUN_DIR / BLKTAP_DEV_DIR as for tap-ctl (a private run directory is
made when unset).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nbd  # type: ignore[import-not-found,import-untyped,unused-ignore]

BIN = Path(sys.executable).parent
TAP_CTL = str(BIN / "tap-ctl")
VHD_UTIL = str(BIN / "vhd-util")
SECTOR = 512
PAGE = 4096
BLOCK = 2 << 20
SIZE = 16 << 20
MAGIC = b"BTCR"
RESIZE_MIB = 1024  # past what the BAT of a 16 MiB VHD holds: blocks move, journalled
PARENT_ROUND = 0xFFFFFFFF  # the tag round of the diff parent's pattern


class HarnessError(Exception):
    """A step of the harness itself failed (not a finding about the disk)."""


def tag(run: int, rnd: int, seq: int, lba: int) -> bytes:
    head = MAGIC + struct.pack("<IIIQ", run, rnd, seq, lba)
    return (head * (SECTOR // len(head) + 1))[:SECTOR]


def pattern(run: int, rnd: int, seq: int, offset: int, length: int) -> bytes:
    first = offset // SECTOR
    return b"".join(tag(run, rnd, seq, first + i) for i in range(length // SECTOR))


def describe(sector: bytes) -> str:
    if sector == bytes(SECTOR):
        return "zero"
    if sector[:4] == MAGIC:
        run, rnd, seq, lba = struct.unpack("<IIIQ", sector[4:24])
        return f"tag(run={run},round={rnd},seq={seq},lba={lba})"
    return "garbage:" + sector[:16].hex()


def tapctl(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    proc = subprocess.run([TAP_CTL, *args], capture_output=True, text=True, timeout=120,
                          env=env)
    if check and proc.returncode != 0:
        raise HarnessError(f"tap-ctl {' '.join(args)}: exit {proc.returncode}: "
                           f"{proc.stderr.strip()}")
    return proc.stdout


def vhdutil(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VHD_UTIL, *args], capture_output=True, text=True, timeout=120)


@dataclass
class Round:
    """What one round did and found."""

    group: str
    kind: str
    frontend: str
    index: int
    kill_delay: float = 0.0
    writes_issued: int = 0
    writes_acked: int = 0
    flushes_completed: int = 0
    writes_durable: int = 0
    sectors_verified: int = 0
    kill_in_allocation: bool = False
    killed_during: str = ""
    queue_depth: int = 1
    inflight_at_kill: int = 0
    """Writes sent and not yet acknowledged when the kill came (--queue-depth)."""
    violations: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Write:
    seq: int
    offset: int
    length: int
    acked: bool = False


class Model:
    """What each sector of the image may hold (see the module docstring)."""

    def __init__(self, initial: dict[int, bytes], sectors: int) -> None:
        self.sectors = sectors
        # sector -> the single value known to be there (after a verify).
        self.known: dict[int, bytes] = dict(initial)
        self.allocated: set[int] = set()  # 2 MiB blocks written to so far

    def value(self, lba: int) -> bytes:
        return self.known.get(lba, bytes(SECTOR))

    def allowed(self, writes: list[Write], durable: int | set[int], run: int, rnd: int
                ) -> dict[int, tuple[bytes | None, set[bytes]]]:
        """sector -> (the value that must be there if no later write replaced it, every
        acceptable value), for the sectors this round's writes touched. ``durable``: the
        writes a completed flush covered, as a set of sequence numbers or (one write at
        a time) the number of the first one not covered. Two writes to one sector are
        never in flight together, so for a sector sequence order is the order the
        writes reached the disk."""
        if isinstance(durable, int):
            durable = set(range(durable))
        out: dict[int, tuple[bytes | None, set[bytes]]] = {}
        touching: dict[int, list[tuple[int, bytes]]] = {}
        for w in writes:
            first = w.offset // SECTOR
            for i in range(w.length // SECTOR):
                touching.setdefault(first + i, []).append(
                    (w.seq, tag(run, rnd, w.seq, first + i)))
        for lba, seqs in touching.items():
            durable_idx = -1
            for k, (seq, _) in enumerate(seqs):
                if seq in durable:
                    durable_idx = k
            if durable_idx >= 0:
                must = seqs[durable_idx][1]
                ok = {v for _, v in seqs[durable_idx:]}
                out[lba] = (must, ok)
            else:
                ok = {self.value(lba)} | {v for _, v in seqs}
                out[lba] = (None, ok)
        return out


def read_image(uri: str, limit: int | None = None) -> tuple[int, bytes]:
    """(the disk's size, its first ``limit`` bytes (all by default))."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        size = h.get_size()
        end = size if limit is None else min(size, limit)
        return size, b"".join(h.pread(min(BLOCK, end - off), off)
                              for off in range(0, end, BLOCK))
    finally:
        h.shutdown()


class Harness:
    def __init__(self, args: argparse.Namespace, run_dir: str, work: str) -> None:
        self.args = args
        self.run_dir = run_dir
        self.work = work
        self.rng = random.Random(args.seed)
        self.run = self.rng.randrange(1 << 31)
        self.rounds: list[Round] = []
        self.extra: list[dict[str, Any]] = []
        self.alloc_seconds: list[float] = []  # how long allocating writes took
        self.tool_seconds: dict[str, float] = {"resize": 1.0, "coalesce": 1.0}
        self.harness_errors: list[dict[str, str]] = []

    # ------------------------------------------------------------------ tap-ctl steps

    def env(self, frontend: str) -> dict[str, str]:
        env = dict(os.environ)
        env["BLKTAP_BLOCKDEV"] = "on" if frontend == "blockdev" else "off"
        return env

    def create(self, spec: str, frontend: str) -> tuple[int, int, str]:
        """tap-ctl create; (pid, minor, device path printed)."""
        device = tapctl("create", "-a", spec, env=self.env(frontend)).strip()
        match = re.search(r"([0-9]+)$", device)
        if match is None:
            raise HarnessError(f"tap-ctl create printed {device!r}")
        minor = int(match.group(1))
        for line in tapctl("list", "-m", str(minor)).splitlines():
            fields = dict(f.split("=", 1) for f in line.split())
            if "pid" in fields:
                return int(fields["pid"]), minor, device
        raise HarnessError(f"minor {minor} has no tapdisk after create")

    def uri(self, pid: int, minor: int) -> str:
        return f"nbd+unix:///?socket={self.run_dir}/nbd{pid}.{minor}"

    def wait_dead(self, pid: int) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(") ", 1)[1].startswith("Z"):
                        return
            except FileNotFoundError:
                return
            time.sleep(0.01)
        raise HarnessError(f"tapdisk {pid} still alive 10 s after SIGKILL")

    # ------------------------------------------------------------------ verification

    def verify(self, r: Round, data: bytes, model: Model,
               allowed: dict[int, tuple[bytes | None, set[bytes]]]) -> None:
        for lba in range(len(data) // SECTOR):
            got = data[lba * SECTOR:(lba + 1) * SECTOR]
            if lba in allowed:
                must, ok = allowed[lba]
                if got not in ok:
                    what = "lost acknowledged+flushed write" if must is not None \
                        else "data never written"
                    want = describe(must) if must else f"one of {len(ok)} values"
                    r.violations.append(f"sector {lba}: {what}: read {describe(got)}, "
                                        f"expected {want}")
            elif got != model.value(lba):
                r.violations.append(f"sector {lba}: changed without a write: read "
                                    f"{describe(got)}, expected {describe(model.value(lba))}")
            model.known[lba] = got
            if len(r.violations) > 20:
                return
        r.sectors_verified += len(data) // SECTOR

    # ------------------------------------------------------------------ one round

    def writer(self, r: Round, frontend: str, pid: int, minor: int, device: str,
               model: Model, writes: list[Write]) -> int | set[int]:
        """Write until the tapdisk is killed; returns the durable writes (see
        Model.allowed)."""
        if self.args.queue_depth > 1 and frontend == "nbd":
            return self.writer_queued(r, pid, minor, model, writes)
        durable = 0
        acked = 0
        delay = self.rng.uniform(0.0, self.args.max_kill_delay)
        r.kill_delay = round(delay, 4)
        state = {"op": "", "alloc": False}
        snapshot: dict[str, Any] = {}

        def kill() -> None:
            snapshot.update(state)
            os.kill(pid, signal.SIGKILL)

        # Half the rounds on a VHD aim the kill at a block allocation: after a few writes,
        # one to a block nothing was written to, killed while it runs (within the median
        # time one took so far).
        fresh_blocks = [b for b in range(SIZE // BLOCK) if b not in model.allocated]
        aim = -1
        if r.kind != "raw" and fresh_blocks and self.rng.random() < 0.5:
            aim = self.rng.randrange(12)
            # within the time an allocating write has been taking (median so far)
            times = sorted(self.alloc_seconds) or [0.01]
            delay = self.rng.uniform(0.0, times[len(times) // 2])
            r.kill_delay = round(delay, 4)
        timer = threading.Timer(delay, kill)
        h: Any = None
        fd = -1
        if frontend == "nbd":
            h = nbd.NBD()
            h.connect_uri(self.uri(pid, minor))
        else:
            fd = os.open(device, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 4 * PAGE)
        lock = threading.Lock()

        def put(data: bytes, offset: int, length: int) -> None:
            if h is not None:
                h.pwrite(data, offset)
                return
            with lock:
                buf[:length] = data
                if os.pwrite(fd, memoryview(buf)[:length], offset) != length:
                    raise OSError("short write")

        if aim < 0:
            timer.start()
        try:
            for seq in range(self.args.max_writes):
                pages = self.rng.randint(1, 4)
                blocks = SIZE // BLOCK
                fresh = [b for b in range(blocks) if b not in model.allocated]
                if fresh and (seq == aim or self.rng.random() < 0.05):
                    block = self.rng.choice(fresh)
                else:
                    block = self.rng.randrange(blocks)
                offset = block * BLOCK + self.rng.randrange(BLOCK // PAGE - pages + 1) * PAGE
                length = pages * PAGE
                w = Write(seq, offset, length)
                writes.append(w)
                r.writes_issued += 1
                data = pattern(self.run, len(self.rounds), seq, offset, length)
                state["op"] = "write"
                state["alloc"] = block not in model.allocated
                t0 = time.monotonic()
                if seq == aim:
                    # The allocating write runs in a thread; this one kills the
                    # tapdisk ``delay`` seconds after sending it and notes whether its
                    # reply had come by then (no timer jitter in between).
                    done = threading.Event()
                    failed: list[BaseException] = []

                    def run(data: bytes = data, offset: int = offset, length: int = length,
                            done: threading.Event = done,
                            failed: list[BaseException] = failed) -> None:
                        try:
                            put(data, offset, length)
                            done.set()
                        except (nbd.Error, OSError) as exc:
                            failed.append(exc)

                    t = threading.Thread(target=run)
                    t.start()
                    time.sleep(delay)
                    kill()
                    r.kill_in_allocation = not done.is_set()
                    t.join()
                    if failed or not done.is_set():
                        raise OSError("killed")
                else:
                    put(data, offset, length)
                w.acked = True
                if state["alloc"] and len(self.alloc_seconds) < 200:
                    self.alloc_seconds.append(time.monotonic() - t0)
                acked = seq + 1
                r.writes_acked += 1
                model.allocated.add(block)
                if self.rng.random() < 0.33:
                    state["op"] = "flush"
                    state["alloc"] = False
                    started = acked
                    if h is not None:
                        h.flush()
                    else:
                        os.fdatasync(fd)
                    durable = started
                    r.flushes_completed += 1
                state["op"] = ""
            raise HarnessError("the writer ran out of writes before the kill; "
                               "raise --max-writes or lower --max-kill-delay")
        except (nbd.Error, OSError):
            pass  # the kill
        finally:
            if timer.ident is not None:
                timer.join()
            h = None  # libnbd closes the connection when the handle goes
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            buf.close()
        r.killed_during = str(snapshot.get("op") or "idle")
        if aim < 0:
            r.kill_in_allocation = bool(snapshot.get("alloc")) and r.killed_during == "write"
        r.writes_durable = durable
        return durable

    def writer_queued(self, r: Round, pid: int, minor: int, model: Model,
                      writes: list[Write]) -> set[int]:
        """--queue-depth N through NBD (libnbd's asynchronous commands): up to N writes
        in flight, never two overlapping; after about one acknowledged write in three a
        flush is sent, covering the writes acknowledged by then (others stay in flight
        beside it). Runs until the kill; returns the writes a completed flush covered."""
        depth = self.args.queue_depth
        r.queue_depth = depth
        delay = self.rng.uniform(0.0, self.args.max_kill_delay)
        r.kill_delay = round(delay, 4)
        inflight: dict[int, tuple[Write, int, bool]] = {}  # cookie -> write, block, alloc
        flushes: dict[int, set[int]] = {}  # cookie -> the writes it covers
        acked: set[int] = set()
        durable: set[int] = set()
        snapshot: dict[str, Any] = {}

        def kill() -> None:
            writing = list(inflight.values())
            snapshot.update(inflight=len(writing), flush=bool(flushes),
                            alloc=any(alloc for _, _, alloc in writing))
            os.kill(pid, signal.SIGKILL)

        def overlaps(offset: int, length: int) -> bool:
            return any(w.offset < offset + length and offset < w.offset + w.length
                       for w, _, _ in inflight.values())

        h = nbd.NBD()
        h.connect_uri(self.uri(pid, minor))
        timer = threading.Timer(delay, kill)
        timer.start()
        blocks = SIZE // BLOCK
        try:
            for seq in range(self.args.max_writes):
                while len(inflight) >= depth:
                    self._reap(h, r, inflight, flushes, acked, durable, model)
                pages = self.rng.randint(1, 4)
                length = pages * PAGE
                for _ in range(20):
                    fresh = [b for b in range(blocks) if b not in model.allocated]
                    block = (self.rng.choice(fresh) if fresh and self.rng.random() < 0.05
                             else self.rng.randrange(blocks))
                    offset = block * BLOCK + self.rng.randrange(BLOCK // PAGE - pages + 1) \
                        * PAGE
                    if not overlaps(offset, length):
                        break
                else:
                    self._reap(h, r, inflight, flushes, acked, durable, model)
                    continue
                w = Write(seq, offset, length)
                writes.append(w)
                r.writes_issued += 1
                data = pattern(self.run, len(self.rounds), seq, offset, length)
                cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset)
                inflight[cookie] = (w, block, block not in model.allocated)
                if self.rng.random() < 0.33 and acked:
                    flushes[h.aio_flush()] = set(acked)
                # Send what is queued, take what completed, without waiting.
                h.poll(0)
                self._reap(h, r, inflight, flushes, acked, durable, model, wait=False)
            raise HarnessError("the writer ran out of writes before the kill; "
                               "raise --max-writes or lower --max-kill-delay")
        except (nbd.Error, OSError):
            pass  # the kill
        finally:
            timer.join()
            h = None
        r.inflight_at_kill = int(snapshot.get("inflight", 0))
        r.killed_during = ("write" if r.inflight_at_kill else
                           "flush" if snapshot.get("flush") else "idle")
        r.kill_in_allocation = bool(snapshot.get("alloc"))
        r.writes_durable = len(durable)
        return durable

    def _reap(self, h: Any, r: Round, inflight: dict[int, tuple[Write, int, bool]],
              flushes: dict[int, set[int]], acked: set[int], durable: set[int],
              model: Model, wait: bool = True) -> None:
        """Take the completed commands (waiting for one first when ``wait``); raises
        nbd.Error once the connection is gone."""
        if wait:
            h.poll(-1)
        for cookie in list(inflight):
            if h.aio_command_completed(cookie):
                w, block, _ = inflight.pop(cookie)
                w.acked = True
                acked.add(w.seq)
                r.writes_acked += 1
                model.allocated.add(block)
        for cookie in list(flushes):
            if h.aio_command_completed(cookie):
                durable |= flushes.pop(cookie)
                r.flushes_completed += 1

    def group(self, kind: str, frontend: str, rounds: int, gi: int) -> None:
        name = f"{kind}-{frontend}-{gi}"
        base = os.path.join(self.work, name)
        initial: dict[int, bytes] = {}
        parent = ""
        if kind == "raw":
            path = base + ".img"
            with open(path, "wb") as f:
                f.truncate(SIZE)
            spec = f"aio:{path}"
        else:
            path = base + ".vhd"
            if kind == "diff":
                parent = base + "-parent.img"
                with open(parent, "wb") as f:
                    for lba in range(SIZE // SECTOR):
                        value = tag(self.run, PARENT_ROUND, gi, lba)
                        initial[lba] = value
                        f.write(value)
                proc = vhdutil("snapshot", "-n", path, "-p", parent, "-m")
            else:
                proc = vhdutil("create", "-n", path, "-s", str(SIZE >> 20))
            if proc.returncode != 0:
                raise HarnessError(f"vhd-util: {proc.stderr.strip()}")
            spec = f"vhd:{path}"
        model = Model(initial, SIZE // SECTOR)
        allowed: dict[int, tuple[bytes | None, set[bytes]]] = {}
        prev: Round | None = None
        for i in range(rounds + 1):
            start = time.monotonic()
            pid, minor, device = self.create(spec, frontend)
            _, data = read_image(self.uri(pid, minor))
            check = prev if prev is not None else Round(name, kind, frontend, -1)
            self.verify(check, data, model, allowed)
            if check.index == -1 and check.violations:
                self.extra.append({"group": name, "violations": check.violations})
            if i == rounds:
                tapctl("destroy", "-p", str(pid), "-m", str(minor))
                break
            r = Round(name, kind, frontend, len(self.rounds))
            writes: list[Write] = []
            durable = self.writer(r, frontend, pid, minor, device, model, writes)
            self.wait_dead(pid)
            # the dead tapdisk's leftovers go with free (even rounds) or destroy (odd)
            if r.index % 2:
                tapctl("destroy", "-p", str(pid), "-m", str(minor))
            else:
                tapctl("free", "-m", str(minor))
            allowed = model.allowed(writes, durable, self.run, r.index)
            if kind != "raw":
                self.check_vhd(r, path, parent)
            r.seconds = round(time.monotonic() - start, 3)
            self.rounds.append(r)
            prev = r
            self.report(r)
        if prev is not None:
            # the last verify's findings land on the last round
            self.report_tail(prev)
        if kind == "vhd":
            self.kill_tool(name, "resize", path, "", spec, model)
        elif kind == "diff":
            self.kill_tool(name, "coalesce", path, parent, spec, model)

    def check_vhd(self, r: Round, path: str, parent: str) -> None:
        proc = vhdutil("check", "-n", path)
        if proc.returncode != 0:
            r.invalid.append(f"vhd-util check -n {path}: exit {proc.returncode}: "
                             f"{(proc.stdout + proc.stderr).strip()[:300]}")

    def kill_tool(self, name: str, tool: str, path: str, parent: str, spec: str,
                  model: Model) -> None:
        """Run vhd-util resize/coalesce, SIGKILL it at a random instant, check and
        verify the data (all of it known exactly: the group ended with a verify)."""
        r = Round(name + "-" + tool, tool, "vhd-util", len(self.rounds))
        start = time.monotonic()
        journal = path + ".journal"
        if tool == "resize":
            argv = [VHD_UTIL, "resize", "-n", path, "-s", str(RESIZE_MIB), "-j", journal]
        else:
            argv = [VHD_UTIL, "coalesce", "-n", path]
        # In the second half of the time the tool took when last let finish (the
        # first half is mostly the interpreter starting); sometimes a little after.
        took = self.tool_seconds[tool]
        delay = self.rng.uniform(0.5 * took, 1.1 * took)
        saved = ""
        if self.args.keep_failures:
            # The image as the tool found it: what reproduces a finding.
            saved = os.path.join(self.work, f"{name}-{tool}-before.vhd")
            shutil.copyfile(path, saved)
        r.kill_delay = round(delay, 4)
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=delay)
            self.tool_seconds[tool] = time.monotonic() - t0
            r.killed_during = f"after {tool} ended (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            r.killed_during = tool
        assert proc.stderr is not None
        proc.stderr.close()
        if os.path.exists(journal):
            # Whether the image is valid before the revert too (the C tool requires the
            # revert; the image is not expected to open before it).
            before = vhdutil("check", "-n", path).returncode
            rev = vhdutil("revert", "-n", path, "-j", journal)
            r.killed_during += f" (journal left; check before revert: exit {before}; " \
                "vhd-util revert " + \
                ("ok)" if rev.returncode == 0 else f"failed: {rev.stderr.strip()})")
            if rev.returncode == 0:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(journal)
        self.check_vhd(r, path, parent)
        if tool == "coalesce":
            # The parent must now hold, per sector, its old value or the child's.
            with open(parent, "rb") as f:
                pdata = f.read()
            for lba in range(SIZE // SECTOR):
                got = pdata[lba * SECTOR:(lba + 1) * SECTOR]
                if got != model.value(lba) and got[:4] == MAGIC and \
                        struct.unpack("<I", got[8:12])[0] != PARENT_ROUND:
                    r.violations.append(f"parent sector {lba}: {describe(got)}, "
                                        f"neither the parent's nor the child's data")
                    break
        pid, minor, _ = self.create(spec, "nbd")
        size, data = read_image(self.uri(pid, minor), SIZE)
        tail = b""
        if size > SIZE:
            # the grown part must read as zeros: its first and last 2 MiB
            h = nbd.NBD()
            h.connect_uri(self.uri(pid, minor))
            tail = h.pread(BLOCK, SIZE) + h.pread(BLOCK, size - BLOCK)
            h.shutdown()
        tapctl("destroy", "-p", str(pid), "-m", str(minor))
        self.verify(r, data, model, {})
        if size not in (SIZE, RESIZE_MIB << 20):
            r.violations.append(f"size after a killed {tool}: {size}")
        elif tail != bytes(len(tail)):
            r.violations.append("the grown part of the disk is not zero")
        r.seconds = round(time.monotonic() - start, 3)
        self.rounds.append(r)
        self.report(r)
        if saved:
            if r.violations or r.invalid:
                keep = os.path.join(self.args.keep_failures, f"{name}-{tool}-r{r.index}")
                os.makedirs(keep, exist_ok=True)
                for src in (saved, path, parent):
                    if src:
                        shutil.copyfile(src, os.path.join(keep, os.path.basename(src)))
                print(f"     kept the images of round {r.index} in {keep}", flush=True)
            os.unlink(saved)

    def report(self, r: Round) -> None:
        if self.args.quiet:
            return
        print(f"{r.index:4d} {r.group:<22} kill@{r.kill_delay:.3f}s during={r.killed_during:<8}"
              f" alloc={int(r.kill_in_allocation)} writes={r.writes_acked}/{r.writes_issued}"
              f" durable={r.writes_durable} flushes={r.flushes_completed}"
              f" violations={len(r.violations)} invalid={len(r.invalid)} {r.seconds:.2f}s",
              flush=True)

    def report_tail(self, r: Round) -> None:
        if r.violations and not self.args.quiet:
            print(f"     {r.group}: final verify: {len(r.violations)} violations", flush=True)

    # ------------------------------------------------------------------ plan

    def main(self) -> dict[str, Any]:
        kinds = self.args.kinds.split(",")
        frontends = self.args.frontends.split(",")
        combos = [(k, f) for k in kinds for f in frontends]
        per = self.args.per_image
        started = time.monotonic()
        gi = 0
        done = 0
        while done < self.args.rounds:
            kind, frontend = combos[gi % len(combos)]
            n = min(per, self.args.rounds - done)
            try:
                self.group(kind, frontend, n, gi)
            except HarnessError as exc:
                # A step of the harness failed (a tap-ctl timeout on a loaded host, say):
                # noted, the group's VBDs released, and the run goes on with a new
                # image; only too many of them end it.
                self.harness_errors.append({"group": f"{kind}-{frontend}-{gi}",
                                            "error": str(exc)[-2000:]})
                print(f"harness error in group {kind}-{frontend}-{gi}: {exc}", flush=True)
                release_all()
                if len(self.harness_errors) > self.args.max_harness_errors:
                    raise
            done = sum(r.frontend in ("nbd", "blockdev") for r in self.rounds)
            gi += 1
            if self.args.quiet and gi % 25 == 0:
                print(f"{time.strftime('%H:%M:%S')} {done} kill rounds, "
                      f"{sum(len(r.violations) for r in self.rounds)} violations, "
                      f"{sum(len(r.invalid) for r in self.rounds)} invalid images",
                      flush=True)
        tapdisk_rounds = [r for r in self.rounds if r.frontend in ("nbd", "blockdev")]
        tool_rounds = [r for r in self.rounds if r.frontend == "vhd-util"]
        summary: dict[str, Any] = {
            "seed": self.args.seed,
            "seconds": round(time.monotonic() - started, 2),
            "kill_rounds": len(tapdisk_rounds),
            "tool_kill_rounds": len(tool_rounds),
            "by_group": {},
            "writes_issued": sum(r.writes_issued for r in self.rounds),
            "writes_acked": sum(r.writes_acked for r in self.rounds),
            "writes_durable_verified": sum(r.writes_durable for r in self.rounds),
            "flushes_completed": sum(r.flushes_completed for r in self.rounds),
            "sectors_verified": sum(r.sectors_verified for r in self.rounds),
            "kills_in_allocation": sum(r.kill_in_allocation for r in self.rounds),
            "kills_during": {},
            "violations": sum(len(r.violations) for r in self.rounds)
            + sum(len(e["violations"]) for e in self.extra),
            "invalid_images": sum(len(r.invalid) for r in self.rounds),
            "harness_errors": self.harness_errors,
        }
        for r in self.rounds:
            key = f"{r.kind}/{r.frontend}"
            summary["by_group"][key] = summary["by_group"].get(key, 0) + 1
            d = r.killed_during.split(" (")[0]
            summary["kills_during"][d] = summary["kills_during"].get(d, 0) + 1
        return {"summary": summary, "rounds": [asdict(r) for r in self.rounds]}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/crash.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=60, help="tapdisk kill rounds (default 60)")
    p.add_argument("--kinds", default="raw,vhd,diff")
    p.add_argument("--frontends", default="nbd,blockdev")
    p.add_argument("--per-image", type=int, default=4,
                   help="kill rounds on one image before a new one (default 4)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-kill-delay", type=float, default=0.25,
                   help="the kill comes 0..this many seconds into the writes")
    p.add_argument("--max-writes", type=int, default=100000)
    p.add_argument("--queue-depth", type=int, default=1,
                   help="writes in flight at once through NBD (libnbd aio; the blockdev "
                        "frontend stays at one): the kill then lands with several sent "
                        "and not acknowledged")
    p.add_argument("--json", help="write the summary and rounds here")
    p.add_argument("--dir", help="where images go (default: a temporary directory)")
    p.add_argument("--keep-failures", metavar="DIR",
                   help="copy the image (as the killed vhd-util found it, and after) of a "
                        "resize/coalesce round with a finding into DIR")
    p.add_argument("--max-harness-errors", type=int, default=10,
                   help="end the run after more harness failures than this (each is "
                        "noted and its group skipped; default 10)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="a progress line every 25 images instead of one per round")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    return args


def release_all() -> None:
    """After an aborted run: destroy every VBD of the run directory, free dead minors
    (their sockets, mounts, loop devices and links go with them)."""
    listing = subprocess.run([TAP_CTL, "list"], capture_output=True, text=True, timeout=60)
    for line in listing.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "minor" not in fields:
            continue
        if "pid" in fields:
            subprocess.run([TAP_CTL, "destroy", "-p", fields["pid"], "-m", fields["minor"]],
                           capture_output=True, timeout=60)
        else:
            subprocess.run([TAP_CTL, "free", "-m", fields["minor"]], capture_output=True,
                           timeout=60)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    own_run = "BLKTAP_RUN_DIR" not in os.environ
    run_dir = os.environ.get("BLKTAP_RUN_DIR") or tempfile.mkdtemp(prefix="blktap-crash-")
    os.environ["BLKTAP_RUN_DIR"] = run_dir
    os.environ.setdefault("BLKTAP_DEV_DIR", os.path.join(run_dir, "dev"))
    work = args.dir or tempfile.mkdtemp(prefix="blktap-crash-img-")
    h = Harness(args, run_dir, work)
    try:
        result = h.main()
    finally:
        release_all()
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
        if own_run:
            shutil.rmtree(run_dir, ignore_errors=True)
    s = result["summary"]
    print(json.dumps(s, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    clean = s["violations"] == 0 and s["invalid_images"] == 0 and not s["harness_errors"]
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
