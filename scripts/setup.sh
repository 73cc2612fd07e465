#!/usr/bin/env bash
# Sets up a Debian 12 machine (Node 20 already present) to build and run skiff: Debian packages,
# npm dependencies, the TypeScript build, skiff-init, the native addon, and the default guest kernel
# (built once into the cache, ~8 minutes on 2 cores). Safe to run again: it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  # kernel build
  linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev xz-utils lz4 cpio
  # addon build (libslirp: virtio-net's NAT, --network/--publish)
  cmake libslirp-dev
  # guest userland (busybox, crun in images), the QEMU engine, the UKI stub, and OVMF for the
  # standard-firmware check of UKIs in the tests
  busybox-static crun qemu-system-x86 systemd-boot-efi ovmf
  # virtio device fuzzing (npm run fuzz): clang with libFuzzer and the sanitizer runtimes
  clang libclang-rt-14-dev
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

echo "setup: npm ci"
npm ci --no-audit --no-fund
echo "setup: building skiff (TypeScript, skiff-init, native addon)"
npm run build
echo "setup: building the default guest kernel (cached after the first time)"
node dist/bundle/skiff.js kernel build
