// libFuzzer target: the split-virtqueue walker over fake guest memory. The input is a few
// configuration bytes followed by raw guest memory (descriptor table, avail ring, indirect tables,
// all hostile); the target pops, reads and writes every chain it is given and pushes it back, as a
// device would. Any sanitizer report, crash or hang (libFuzzer's -timeout) is a finding.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "devices/virtio/device.h"
#include "devices/virtio/queue.h"
#include "devices/virtio/test/driver.h"

using namespace skiff::virtio;

namespace {
constexpr uint64_t kBase = 0x10000;
constexpr uint64_t kSize = 0x10000;  // 64 KiB region, then a 4 KiB one right after (buffers may span)
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static testing::FakeMemory mem{{kBase, kSize}, {kBase + kSize, 0x1000}};
  if (size < 8) return 0;
  // Configuration: queue size (any value, including illegal ones), features, start index, ring
  // placement (descriptors at the region's start, avail ring from +4 KiB, used ring from +6 KiB).
  uint16_t queueSize;
  std::memcpy(&queueSize, data, 2);
  uint8_t flags = data[2];
  uint16_t start;
  std::memcpy(&start, data + 3, 2);
  uint64_t availOffset = 2ull * data[5], usedOffset = 4ull * data[6];
  uint8_t budget = data[7];
  data += 8;
  size -= 8;

  uint8_t* ram = mem.at(kBase, kSize);
  std::memset(ram, 0, kSize);
  std::memcpy(ram, data, size < kSize ? size : kSize);

  Queue q(flags & 0x80 ? 32768 : 256);
  q.setSize(queueSize);
  q.setDescTable(kBase);
  q.setAvailRing(kBase + 0x1000 + availOffset);
  q.setUsedRing(kBase + 0x1800 + usedOffset);
  q.setNextAvail(start);
  uint64_t features = kFVersion1 | (flags & 1 ? kFEventIdx : 0) | (flags & 2 ? kFIndirectDesc : 0);
  std::string why;
  if (!q.activate(mem.map, features, why)) return 0;

  Chain chain;
  uint8_t scratch[512];
  for (unsigned i = 0; i <= budget; ++i) {
    if (i % 4 == 0) q.disableNotification();
    if (!q.pop(chain)) {
      if (q.failed() || !q.enableNotification()) break;
      continue;
    }
    // Touch every byte the chain names, as devices do, through both cursor paths.
    Cursor in(mem.map, chain.readable);
    while (in.remaining() > 0) {
      uint64_t n = in.remaining() < sizeof scratch ? in.remaining() : sizeof scratch;
      if (!in.read(scratch, n)) __builtin_trap();  // the walk vouched for these bytes
    }
    Cursor out(mem.map, chain.writable);
    std::vector<iovec> iov;
    if (out.remaining() > 0 && out.spans(out.remaining(), iov, 64)) {
      for (const iovec& v : iov) std::memset(v.iov_base, 0x5a, v.iov_len);
    }
    q.push(chain.head, chain.writableBytes);
    if (i % 3 == 0) q.needsNotification();
  }
  q.needsNotification();
  return 0;
}
