#!/usr/bin/env bash
# Set everything up, then serve a VHD image as a tap device and use it with real clients:
# qemu-io and nbdinfo over the VBD's NBD socket and, where the host allows, mkfs + mount
# on the kernel block device /dev/xen/blktap-2/tapdev<minor>.
#
#   scripts/demo.sh [--keep] [--size MB]
#
# --keep leaves the tap device running (destroy it with the tap-ctl command printed).
# Uses the real run directory (/run/blktap-control) unless BLKTAP_RUN_DIR says otherwise.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
keep=0
size_mb=256
while [ $# -gt 0 ]; do
    case $1 in
    --keep) keep=1 ;;
    --size) size_mb=$2; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown argument $1" >&2; exit 22 ;;
    esac
    shift
done

"$root/scripts/setup.sh"
export PATH=$root/.venv/bin:$PATH
run_dir=${BLKTAP_RUN_DIR:-/run/blktap-control}
work=$(mktemp -d /var/tmp/blktap-demo.XXXXXX)
image=$work/vm.vhd
pid="" minor="" mnt=""

cleanup() {
    set +e
    [ -n "$mnt" ] && mountpoint -q "$mnt" && umount "$mnt"
    if [ $keep -eq 0 ] && [ -n "$pid" ]; then
        step tap-ctl destroy -p "$pid" -m "$minor"
    fi
    [ $keep -eq 0 ] && rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n$ %s\n' "$*"; "$@"; }

step vhd-util create -n "$image" -s "$size_mb"
printf '\n$ tap-ctl create -a vhd:%s\n' "$image"
dev=$(tap-ctl create -a "vhd:$image")
echo "$dev"
line=$(tap-ctl list -f "$image")
pid=$(sed -n 's/.*pid=\([0-9]*\).*/\1/p' <<<"$line")
minor=$(sed -n 's/.*minor=\([0-9]*\).*/\1/p' <<<"$line")
step tap-ctl list
uri="nbd+unix:///?socket=$run_dir/nbd$pid.$minor"

step qemu-io -f raw -c 'write -P 0xa5 1M 4M' -c 'read -P 0xa5 1M 4M' -c 'read -P 0 0 1M' "$uri"
step nbdinfo "$uri"
step nbdinfo --map "$uri"

if [ -b "$dev" ]; then
    mnt=$work/mnt
    mkdir -p "$mnt"
    step mkfs.ext4 -q -F "$dev"
    step mount "$dev" "$mnt"
    step cp "$root/README.md" "$mnt/README.md"
    step cmp "$root/README.md" "$mnt/README.md"
    step umount "$mnt"
    mnt=""
else
    echo
    echo "(no kernel block device on this host: $dev is the minor's marker; NBD only)"
fi

step tap-ctl stats -p "$pid" -m "$minor"
if [ $keep -eq 1 ]; then
    echo
    echo "left running: tap-ctl destroy -p $pid -m $minor   (image: $image)"
    exit 0
fi
step tap-ctl destroy -p "$pid" -m "$minor"
pid=""
step vhd-util check -n "$image"
step qemu-img info -f vpc "$image"
step tap-ctl list
echo
echo "demo finished: the image was served, written, read and checked."
