#!/usr/bin/env bash
# Idempotent setup: Debian packages the project and its tests use, and .venv/ with the package.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# qemu-system-common: qemu-storage-daemon, a peer of bench/run's block-device benchmark.
debs=(qemu-utils nbdkit libnbd-bin python3-libnbd fio fuse3 libvhdi-utils util-linux procps e2fsprogs
      qemu-system-common)
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
# Byte-compile the sources: tapdisk and tap-ctl start in a fraction of the time when they
# need not compile every module (also where PYTHONDONTWRITEBYTECODE is set).
.venv/bin/python -m compileall -q src >/dev/null
