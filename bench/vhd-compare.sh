#!/usr/bin/env bash
# Compare the vhd driver with the raw (aio) driver and with qemu-nbd's vpc driver on the same
# 1 GiB of random data, with bench/nbd-compare (its five default workloads), in one
# interleaved run:
#
#   bench/vhd-compare.sh buffered   # every server on the page cache (NO_O_DIRECT for ours)
#   bench/vhd-compare.sh direct     # O_DIRECT: ours by default, qemu-nbd --cache=none --aio=native
#
# Columns: vhd  = our tapdisk, vhd:$VHD (a fully allocated dynamic VHD, see bench/vhd_make.py)
#          raw  = our tapdisk, aio:$RAW (the same bytes as a raw file)
#          qemu-vpc = qemu-nbd -t -f vpc $VHD
#          vhd-before = (with BEFORE=DIR, e.g. a git worktree of an older commit) our
#                 tapdisk from DIR's sources, vhd:$VHD, to compare a change in one run
# Ratios are against the vhd column. Extra arguments go to nbd-compare
# (e.g. --repeat 3 --runtime 5 --workloads randread-4k-qd32).
# Images: $BENCH_RAW (default /var/tmp/blktap-vhd-bench.raw) and $BENCH_VHD (default
# /var/tmp/blktap-vhd-bench.vhd), made once. WARNING: write workloads overwrite both.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-buffered}
shift || true
raw=${BENCH_RAW:-/var/tmp/blktap-vhd-bench.raw}
vhd=${BENCH_VHD:-/var/tmp/blktap-vhd-bench.vhd}
compare=${NBD_COMPARE:-$root/bench/nbd-compare}
py=$root/.venv/bin/python

if [ ! -f "$raw" ] || [ "$(stat -c %s "$raw")" -ne $((1 << 30)) ]; then
    echo "making $raw (1 GiB of random data)" >&2
    head -c $((1 << 30)) /dev/urandom > "$raw.tmp" && mv "$raw.tmp" "$raw"
    rm -f "$vhd"
fi
if [ ! -f "$vhd" ]; then
    echo "making $vhd (fully allocated dynamic VHD with the bytes of $raw)" >&2
    "$py" "$root/bench/vhd_make.py" "$raw" "$vhd"
fi
q=$(printf %q "$vhd")
before=()
if [ -n "${BEFORE:-}" ]; then
    b=$(printf %q "$BEFORE")
    before=("vhd-before::env PYTHONPATH=$b/src $py $b/bench/serve_tapdisk.py")
fi

# Put both files in the page cache in the same state: dropped, then read back 4 KiB at a
# time with readahead off. (Read with readahead, e.g. by cat, the page cache holds large
# folios, and on this kernel (6.18, ext4) a buffered 4 KiB pwrite into such a file costs
# 45-60 us instead of 5-7 us: a file warmed by cat next to one rewritten by fio's 4 KiB
# writes made randwrite-4k differ 2x between two identical files.)
warm() {
    "$py" - "$@" <<'PY'
import os, sys
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    buf = bytearray(4096)
    off = 0
    while (n := os.preadv(fd, [buf], off)) > 0:
        off += n
    os.close(fd)
PY
}

case $mode in
buffered)
    warm "$raw" "$vhd"
    exec "$compare" "$@" "$raw" \
        "vhd::$py $root/bench/serve_tapdisk.py --no-direct --socket {socket} vhd:$q" \
        ${before:+"${before[0]} --no-direct --socket {socket} vhd:$q"} \
        "raw::$py $root/bench/serve_tapdisk.py --no-direct --socket {socket} aio:{image}" \
        "qemu-vpc::qemu-nbd -t -f vpc -k {socket} $q"
    ;;
direct)
    warm "$raw" "$vhd"  # the same state as buffered (O_DIRECT I/O bypasses it anyway)
    exec "$compare" "$@" "$raw" \
        "vhd::$py $root/bench/serve_tapdisk.py --socket {socket} vhd:$q" \
        ${before:+"${before[0]} --socket {socket} vhd:$q"} \
        "raw::$py $root/bench/serve_tapdisk.py --socket {socket} aio:{image}" \
        "qemu-vpc::qemu-nbd -t -f vpc --cache=none --aio=native -k {socket} $q"
    ;;
*)
    echo "usage: $0 buffered|direct [nbd-compare options]" >&2
    exit 22
    ;;
esac
