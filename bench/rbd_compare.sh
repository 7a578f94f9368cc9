#!/usr/bin/env bash
# Compare NBD exports of the same RBD image (a benchmark, not a test):
#
#   tapdisk   our tapdisk with the rbd driver   (bench/serve_tapdisk.py rbd:POOL/IMAGE)
#   qemu-nbd  qemu's librbd driver              (qemu-nbd -t -f raw rbd:POOL/IMAGE)
#   rbd-nbd   Ceph's rbd-nbd through the kernel NBD client (/dev/nbdN), where the nbd
#             module is loaded; skipped otherwise
#
# on bench/nbd-compare's five default workloads, one server at a time.
#
#   bench/rbd_compare.sh [nbd-compare options]      e.g. --repeat 3 --runtime 10
#
# The cluster: $CEPH_CONF when set (the image $RBD_BENCH_IMAGE, default rbd/blktap-bench,
# 1 GiB, is created there if missing and filled with random data); otherwise a throwaway
# cluster from scripts/ceph-cluster.sh in a temporary directory, removed at the end. Write
# workloads overwrite the image. Both librbd users keep librbd's defaults (its cache in
# writethrough-until-flush mode); qemu-nbd gets --cache=writeback, which is what it
# translates to those same defaults.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=$root/.venv/bin/python
image=${RBD_BENCH_IMAGE:-rbd/blktap-bench}
size_mb=1024
own_cluster=""
mapped=""

cleanup() {
    [ -n "$mapped" ] && rbd-nbd unmap "$mapped" >/dev/null 2>&1 || true
    if [ -n "$own_cluster" ]; then
        "$root/scripts/ceph-cluster.sh" stop "$own_cluster" || true
        rm -rf "$own_cluster"
    fi
}
trap cleanup EXIT

if [ -z "${CEPH_CONF:-}" ]; then
    own_cluster=$(mktemp -d /tmp/ceph-bench-XXXXXX)
    echo "starting a throwaway cluster in $own_cluster" >&2
    CEPH_CLUSTER_STORE_BYTES=$((3 << 30)) "$root/scripts/ceph-cluster.sh" start "$own_cluster" >/dev/null
    export CEPH_CONF=$own_cluster/ceph.conf
fi
if ! rbd info "$image" >/dev/null 2>&1; then
    echo "making $image ($size_mb MiB of random data)" >&2
    head -c $((size_mb << 20)) /dev/urandom | rbd import --no-progress - "$image"
fi

servers=(
    "tapdisk::$py $root/bench/serve_tapdisk.py --socket {socket} rbd:$image:conf={image}"
    "qemu-nbd::qemu-nbd -t -f raw --cache=writeback -k {socket} rbd:$image:conf={image}"
)
files=()
if [ -e /dev/nbd0 ] && command -v rbd-nbd >/dev/null; then
    mapped=$(rbd-nbd map "$image")
    files=(--file "rbd-nbd::$mapped")
else
    echo "rbd-nbd: skipped (no /dev/nbd0: the kernel's nbd module is not loaded)" >&2
fi

# nbd-compare substitutes {image} with an existing path: the cluster's ceph.conf. The
# rbd-nbd mapping holds the image's lock only while fio writes through it.
"$root/bench/nbd-compare" "${files[@]}" "$@" "$CEPH_CONF" "${servers[@]}"
