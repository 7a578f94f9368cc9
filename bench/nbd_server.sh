#!/usr/bin/env bash
# Benchmark the NBD export alone (no tapdisk daemon): our standalone server
# (python -m blktap.frontends.nbd_server) against qemu-nbd and nbdkit on the same raw image,
# with bench/nbd-compare and its five default workloads.
#
#   bench/nbd_server.sh [IMAGE] [nbd-compare options...]
#
# IMAGE defaults to /var/tmp/blktap-nbd-bench.raw (1 GiB of random data, made once and read
# into the page cache). All three servers run buffered (page cache), uvloop for ours.
# Example (the run recorded in bench/README.md):
#   bench/nbd_server.sh /tmp/img.raw --repeat 3 --runtime 5
# WARNING: the write workloads overwrite IMAGE.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
image=/var/tmp/blktap-nbd-bench.raw
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then image=$1; shift; fi
compare=${NBD_COMPARE:-$root/bench/nbd-compare}
py=$root/.venv/bin/python

if [ ! -f "$image" ]; then
    echo "making $image (1 GiB of random data)" >&2
    head -c $((1 << 30)) /dev/urandom > "$image.tmp" && mv "$image.tmp" "$image"
fi
cat "$image" > /dev/null  # into the page cache

exec "$compare" "$@" "$image" \
    "ours::$py -m blktap.frontends.nbd_server --socket {socket} --image aio:{image} --no-direct" \
    "qemu-nbd::qemu-nbd -t -f raw -k {socket} {image}" \
    "nbdkit::nbdkit -f -U {socket} file {image}"
