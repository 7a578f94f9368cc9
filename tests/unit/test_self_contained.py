"""The tests, scripts and benchmarks read nothing outside the repository.

A fresh clone with nothing beside it must run its tests (issue 14). This reads the text of every
file under tests/, bench/ and scripts/ and fails on any path that leaves the checkout: the
``../shared`` directory of the workspace, any ``/work/`` path, an absolute path into a host
directory other than the system ones the setup provides (/usr, /dev, /proc, /tmp...), or a
climb (``../``, ``Path.parent``) above the repository.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("tests", "bench", "scripts")
TEXT_SUFFIXES = {".py", ".sh", ".toml", ".cfg", ".ini", ".json", ".txt", ""}

# Where system tools and kernel interfaces live, and scratch space: these may be named.
SYSTEM_ROOTS = (
    "/dev", "/sys", "/proc", "/usr", "/bin", "/sbin", "/lib", "/tmp", "/run", "/var/run",
    "/var/tmp",
    "/etc/os-release",  # which system this is (benchmark reports)
    "/nonexistent",  # the conventional path that never exists, for failure tests
)

# An absolute path: "/" then a name, not preceded by anything that would make it part of a
# relative path, a URL, a pattern or an expression ("a/b", "x://", "$root/bench", "{d}/f",
# "<run>/ctl", "^/.*/nbd", "MiB/s").
ABSOLUTE = re.compile(r"(?<![\w.~$}/:\\\-<>*^)\]])/[A-Za-z_][\w.+-]*(?:/[\w.+{}-]*)*")
# A string literal appended to a path (`base + "/mnt"`, `+ r"/x-(\d+)$"`): relative.
APPENDED = re.compile(r"\+\s*[rbf]{0,2}[\"']$")
FORBIDDEN = (re.compile(r"\.\./shared\b"), re.compile(r"/work/"))
CLIMB = re.compile(r"(?:\.\./)+")
PARENTS = re.compile(r"__file__\)?(?:\.resolve\(\))?((?:\.parent\b)+)")
PARENTS_INDEX = re.compile(r"__file__\)?(?:\.resolve\(\))?\.parents\[(\d+)\]")
ABOVE_ROOT = re.compile(r"\b(?:REPO|ROOT|repo|root)\.parent\b|\$root/\.\.")


def _files() -> list[Path]:
    out = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*")):
            if not path.is_file() or path.suffix not in TEXT_SUFFIXES:
                continue
            # This file spells the forbidden paths to test the scan; tests/data holds archives.
            if "__pycache__" in path.parts or path == Path(__file__).resolve():
                continue
            if path.parent == REPO / "tests" / "data":
                continue
            out.append(path)
    return out


# Top-level directories of a host (the FHS ones, the workspace's, and any this host has):
# a path under one of them, outside SYSTEM_ROOTS, names a place outside the checkout. A
# made-up sample such as "/a" or "/k" (parser input, never opened) names none.
HOST_ROOTS = {"bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "media", "mnt",
              "opt", "proc", "root", "run", "sbin", "srv", "sys", "tmp", "usr", "var",
              "work", "shared", "data"}


def _system(path: str) -> bool:
    return any(path == root or path.startswith(root + "/") for root in SYSTEM_ROOTS)


def _outside(path: str) -> bool:
    """``path`` (absolute) names a real place outside the repository."""
    if _system(path):
        return False
    top = path.split("/")[1]
    return top in HOST_ROOTS or os.path.isdir("/" + top)


def offences(path: Path, text: str) -> list[str]:
    """Every place in ``text`` (the file at ``path``) that names something outside the repo."""
    depth = len(path.relative_to(REPO).parts) - 1  # directories between the file and REPO
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        where = f"{path.relative_to(REPO)}:{lineno}"
        for pattern in FORBIDDEN:
            if m := pattern.search(line):
                found.append(f"{where}: names {m.group(0)!r}: {line.strip()}")
        if line.startswith("#!"):
            continue  # the interpreter line names a system tool by design
        for m in ABSOLUTE.finditer(line):
            if APPENDED.search(line[: m.start()]):
                continue
            if _outside(m.group(0)):
                found.append(f"{where}: absolute path {m.group(0)!r} outside the system "
                             f"directories: {line.strip()}")
        for m in CLIMB.finditer(line):
            if len(m.group(0)) // 3 > depth:
                found.append(f"{where}: {m.group(0)!r} climbs above the repository")
        for m in PARENTS.finditer(line):
            if m.group(1).count(".parent") > depth + 1:
                found.append(f"{where}: Path.parent climbs above the repository")
        for m in PARENTS_INDEX.finditer(line):
            if int(m.group(1)) > depth:
                found.append(f"{where}: Path.parents[{m.group(1)}] is above the repository")
        if m := ABOVE_ROOT.search(line):
            found.append(f"{where}: {m.group(0)!r} is the directory above the repository")
    return found


def test_no_file_names_a_path_outside_the_repository() -> None:
    files = _files()
    assert any(p.name == "helpers.py" for p in files), "the scan found no test helpers"
    found = []
    for path in files:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += offences(path, text)
    assert not found, "paths outside the repository:\n" + "\n".join(found)


@pytest.mark.parametrize("line", [
    'FIXTURES = REPO.parent / "shared" / "fixtures" / "vhd"',
    'FIXTURES = Path("/work/shared/fixtures/vhd")',
    'compare=$root/../shared/bench/nbd-compare',
    'image = "/srv/images/disk.vhd"',
    'FIXTURES = Path(__file__).resolve().parent.parent.parent / "x"',
    'top = Path(__file__).resolve().parents[2]',
    'open("../../../etc/data")',
    'log_path = "/var/log/cbt.log"',
    'home = "/home/user/images"',
])
def test_the_scan_catches_each_kind_of_escape(line: str) -> None:
    assert offences(REPO / "tests" / "unit" / "x.py", line + "\n") or \
        offences(REPO / "tests" / "x.py", line + "\n")


@pytest.mark.parametrize("line", [
    "subprocess.run(['/usr/bin/qemu-img', 'info', path])",
    'os.path.exists("/dev/fuse")',
    "read/write at 1 MiB/s",
    'f"{run_dir}/ctl{pid}"',
    'compare=${NBD_COMPARE:-$root/bench/nbd-compare}',
    'ROOT = Path(__file__).resolve().parent.parent',
    'see https://github.com/xapi-project/blktap',
    'assert ImageSpec.parse("vhd:/a:b") == ImageSpec("vhd", "/a:b")',
    'keyring="/k", conf="/c/ceph.conf"',
    'points = mounts(base + "/mnt")',
    r'pattern = re.escape(run_dir) + r"/tapdisk-(\d+)$"',
    '"""the control socket ``<run_dir>/ctl<pid>``"""',
    r'assert re.match(r"^/.*/nbd\d+", link)',
])
def test_the_scan_allows_system_and_repository_paths(line: str) -> None:
    assert offences(REPO / "tests" / "unit" / "x.py", line + "\n") == []
