#!/usr/bin/env bash
# Builds the vhost-user fuzz target (vhost_user.cc: a hostile front-end's messages, fds, kicks and
# guest memory against the Backend over rng, blk and vsock) with clang (libFuzzer + ASan + UBSan)
# and runs it for SKIFF_FUZZ_SECONDS (default 60), from the corpus it grew in earlier runs on this
# machine. Work files live in SKIFF_FUZZ_DIR (default ~/.cache/skiff-dev/vhost-user-fuzz); the
# binary is keyed by a hash of the sources. Exits non-zero when it finds a crash, a leak (memory
# or fd), undefined behaviour or a hang.   Usage: bash hypervisor/transport/fuzz/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
seconds="${SKIFF_FUZZ_SECONDS:-60}"
out="${SKIFF_FUZZ_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/skiff-dev/vhost-user-fuzz}"
command -v clang++ >/dev/null || { echo "fuzz: clang++ not found (scripts/setup.sh installs clang and libclang-rt-14-dev)" >&2; exit 1; }
sources=(hypervisor/devices/virtio/*.cc hypervisor/transport/vhost_user.cc hypervisor/loop/epoll.cc)
key="$(cat "${sources[@]}" hypervisor/devices/virtio/*.h hypervisor/transport/*.h hypervisor/transport/fuzz/vhost_user.cc | sha256sum | cut -c1-16)"
bin="$out/bin-$key"
find "$out" -maxdepth 1 -name 'bin-*' ! -name "bin-$key" -exec rm -rf {} + 2>/dev/null || true
mkdir -p "$bin/obj" "$out/crashes" "$out/corpus"
flags=(-std=c++17 -g -O1 -Wall -Wextra -Werror -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all -Ihypervisor)
objs=()
for f in "${sources[@]}"; do
  o="$bin/obj/$(basename "$f" .cc).o"
  [ -f "$o" ] || clang++ "${flags[@]}" -c "$f" -o "$o"
  objs+=("$o")
done
[ -f "$bin/fuzz-vhost-user" ] || clang++ "${flags[@]}" -fsanitize=fuzzer hypervisor/transport/fuzz/vhost_user.cc "${objs[@]}" -o "$bin/fuzz-vhost-user"
echo "fuzz: vhost-user for ${seconds}s"
status=0
if ! "$bin/fuzz-vhost-user" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 -print_final_stats=1 \
    -artifact_prefix="$out/crashes/vhost-user-" "$out/corpus" 2>"$out/vhost-user.log"; then
  status=1
  echo "fuzz: vhost-user FAILED; input under $out/crashes/, log $out/vhost-user.log" >&2
  grep -E "ERROR|runtime error|SUMMARY|Test unit written|deadly signal|fd leak" "$out/vhost-user.log" >&2 || tail -30 "$out/vhost-user.log" >&2
fi
grep -E "^(Done|stat::number_of_executed_units|stat::average_exec_per_sec)" "$out/vhost-user.log" | sed "s/^/fuzz: vhost-user: /"
exit $status
