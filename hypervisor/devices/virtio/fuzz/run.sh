#!/usr/bin/env bash
# Builds the virtio fuzz targets with clang (libFuzzer + ASan + UBSan) and runs each for a bounded
# time: SKIFF_FUZZ_SECONDS per target (default 60). Each starts from its committed seeds
# (fuzz/seeds/, made by make-seeds.py) and the corpus it grew in earlier runs on this machine.
# Work files live in SKIFF_FUZZ_DIR (default ~/.cache/skiff-dev/virtio-fuzz), outside build/, which
# the addon build may wipe; binaries are keyed by a hash of the sources, so two checkouts never
# share a stale build. Usage: npm run fuzz [-- target...]   (targets: queue blk mmio vsock net)
# Exits non-zero when a target finds a crash, a leak, undefined behaviour or a hang.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
seconds="${SKIFF_FUZZ_SECONDS:-60}"
out="${SKIFF_FUZZ_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/skiff-dev/virtio-fuzz}"
src="hypervisor/devices/virtio"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(queue blk mmio vsock net)
command -v clang++ >/dev/null || { echo "fuzz: clang++ not found (scripts/setup.sh installs clang and libclang-rt-14-dev)" >&2; exit 1; }
key="$(cat "$src"/*.h "$src"/*.cc "$src"/test/*.h "$src"/fuzz/*.h "$src"/fuzz/*.cc | sha256sum | cut -c1-16)"
bin="$out/bin-$key"
# Builds of other sources go once a day old: another checkout may be building or running its own now.
find "$out" -maxdepth 1 -name 'bin-*' ! -name "bin-$key" -mmin +1440 -exec rm -rf {} + 2>/dev/null || true
mkdir -p "$bin/obj" "$out/crashes"
flags=(-std=c++17 -g -O1 -Wall -Wextra -Werror -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all -Ihypervisor)
# The device core once, then each target linked against it.
objs=()
for f in "$src"/*.cc; do
  o="$bin/obj/$(basename "$f" .cc).o"
  [ -f "$o" ] || clang++ "${flags[@]}" -c "$f" -o "$o"
  objs+=("$o")
done
for t in "${targets[@]}"; do
  [ -f "$bin/fuzz-$t" ] || clang++ "${flags[@]}" -fsanitize=fuzzer "$src/fuzz/$t.cc" "${objs[@]}" -o "$bin/fuzz-$t"
done
status=0
for t in "${targets[@]}"; do
  mkdir -p "$out/corpus-$t"
  seeds=()
  [ -d "$src/fuzz/seeds/$t" ] && seeds=("$src/fuzz/seeds/$t")
  echo "fuzz: $t for ${seconds}s"
  if ! "$bin/fuzz-$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 -print_final_stats=1 \
      -artifact_prefix="$out/crashes/$t-" "$out/corpus-$t" "${seeds[@]}" 2>"$out/$t.log"; then
    status=1
    echo "fuzz: $t FAILED; input under $out/crashes/, log $out/$t.log" >&2
    grep -E "ERROR|runtime error|SUMMARY|Test unit written|deadly signal" "$out/$t.log" >&2 || tail -30 "$out/$t.log" >&2
  fi
  grep -E "^(Done|stat::number_of_executed_units|stat::average_exec_per_sec)" "$out/$t.log" | sed "s/^/fuzz: $t: /"
done
exit $status
