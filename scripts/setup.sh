#!/usr/bin/env bash
# Set up exitless on a fresh Debian 12 machine: system packages, the Python package
# (which builds its C extension and the guest kit), and the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
APT_PACKAGES=(build-essential binutils linux-libc-dev qemu-system-x86 acpica-tools cpio
              libseccomp2 libfuse3-3 fuse3     # confinement; the FUSE disk-fault tests
              e2fsprogs iproute2)              # ext4 images for Linux guests; network namespaces in the net tests
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python3 -m pip install -q -e ".[test,plot]"
python3 -c "import exitless.sidecore._spin, exitless.guestkit as g; print('exitless ready; guest kit:', g.guestkit_path())"
