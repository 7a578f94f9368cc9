#!/usr/bin/env bash
# Idempotent setup: Debian packages the project and its tests use, and .venv/ with the package.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# qemu-system-common: qemu-storage-daemon, a peer of bench/run's block-device benchmark.
# openssl: the TLS tests make their certificates with it.
debs=(qemu-utils nbdkit libnbd-bin python3-libnbd fio fuse3 libvhdi-utils util-linux procps e2fsprogs
      qemu-system-common openssl
      ceph-mon ceph-mgr ceph-osd ceph-common python3-rbd python3-rados rbd-nbd qemu-block-extra)
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$python" -m venv .venv
fi
# Reinstall only when the project metadata changed since the last install.
stamp=.venv/.blktap-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x .venv/bin/tapdisk ]; then
    echo "setup: installing the package into .venv" >&2
    .venv/bin/pip install -q --disable-pip-version-check -e ".[test,bench]"
    echo "$want" > "$stamp"
fi
# Debian's librados/librbd bindings (python3-rados, python3-rbd) are built for its
# /usr/bin/python3; the venv sees only those two modules, through a directory of links to
# them, where the venv's interpreter has the same extension ABI.
ceph_dir=.venv/ceph-bindings
soabi() { "$1" -c 'import sysconfig; print(sysconfig.get_config_var("SOABI"))'; }
if [ "$(soabi .venv/bin/python)" = "$(soabi /usr/bin/python3)" ]; then
    mkdir -p "$ceph_dir"
    for m in rados rbd; do
        so=$(/usr/bin/python3 -c "import $m; print($m.__file__)")
        ln -sfn "$so" "$ceph_dir/$(basename "$so")"
    done
    site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    echo "$(pwd)/$ceph_dir" > "$site/blktap-ceph-bindings.pth"
else
    echo "setup: .venv's Python ABI differs from /usr/bin/python3's: no rbd driver" >&2
fi
# Byte-compile the sources: tapdisk and tap-ctl start in a fraction of the time when they
# need not compile every module (also where PYTHONDONTWRITEBYTECODE is set).
.venv/bin/python -m compileall -q src >/dev/null
# The nbd image driver uses libnbd's Python bindings (python3-libnbd), which Debian installs
# for its own python3: the venv sees them through a directory of links that a .pth file
# names, only when the extension's ABI tag is the venv Python's.
debian_py=/usr/lib/python3/dist-packages
ext=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
if [ -f "$debian_py/nbd.py" ] && [ -f "$debian_py/libnbdmod$ext" ]; then
    mkdir -p .venv/debian-libnbd
    ln -sfn "$debian_py/nbd.py" "$debian_py/libnbdmod$ext" .venv/debian-libnbd/
    echo "$root/.venv/debian-libnbd" > "$site/debian-libnbd.pth"
else
    rm -f "$site/debian-libnbd.pth"
    echo "setup: python3-libnbd has no module for this Python ($ext): no nbd driver" >&2
fi
