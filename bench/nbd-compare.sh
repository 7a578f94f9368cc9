#!/usr/bin/env bash
# Compare our tapdisk's NBD export with qemu-nbd and nbdkit on the same 1 GiB raw image,
# with bench/nbd-compare (the five default workloads), in one run each:
#
#   bench/nbd-compare.sh buffered   # ours with NO_O_DIRECT vs qemu-nbd -t -f raw, nbdkit file
#   bench/nbd-compare.sh direct     # ours (O_DIRECT) vs qemu-nbd --cache=none --aio=native
#
# Extra arguments go to nbd-compare (e.g. --repeat 5 --runtime 10 --numjobs 8).
# The image is made once at $BENCH_IMAGE (default /var/tmp/blktap-bench.raw, on disk),
# filled with random data so that nothing is sparse.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mode=${1:-buffered}
shift || true
image=${BENCH_IMAGE:-/var/tmp/blktap-bench.raw}
compare=${NBD_COMPARE:-$root/bench/nbd-compare}
py=$root/.venv/bin/python

if [ ! -f "$image" ] || [ "$(stat -c %s "$image")" -ne $((1 << 30)) ]; then
    echo "making $image (1 GiB of random data)" >&2
    head -c $((1 << 30)) /dev/urandom > "$image.tmp" && mv "$image.tmp" "$image"
fi
cat "$image" > /dev/null  # into the page cache

case $mode in
buffered)
    exec "$compare" "$@" "$image" \
        "tapdisk::$py $root/bench/serve_tapdisk.py --no-direct --socket {socket} aio:{image}" \
        "qemu-nbd::qemu-nbd -t -f raw -k {socket} {image}" \
        "nbdkit::nbdkit -f -U {socket} file {image}"
    ;;
direct)
    exec "$compare" "$@" "$image" \
        "tapdisk::$py $root/bench/serve_tapdisk.py --socket {socket} aio:{image}" \
        "qemu-nbd::qemu-nbd -t -f raw --cache=none --aio=native -k {socket} {image}"
    ;;
*)
    echo "usage: $0 buffered|direct [nbd-compare options]" >&2
    exit 22
    ;;
esac
