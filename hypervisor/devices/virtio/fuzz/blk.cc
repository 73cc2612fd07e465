// libFuzzer target: virtio-blk's request parser and its file I/O, behind a real queue. The input
// describes one to four requests the way a driver lays them out (header, data and status buffers,
// direct or indirect, with lengths and flags taken from the input) over fake guest memory, and the
// bytes those buffers hold; the backing disk is a 1 MiB sparse memfd.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "devices/virtio/blk.h"
#include "devices/virtio/test/driver.h"

using namespace skiff::virtio;

namespace {
constexpr uint64_t kBase = 0x100000, kSize = 0x40000;
constexpr uint64_t kRings = kBase, kScratch = kBase + 0x8000, kBuffers = kBase + 0x10000;

struct NullGuest : Guest {
  void usedBuffers(uint16_t) override {}
  void configChanged() override {}
  void fail(const std::string&) override { failed = true; }
  bool failed = false;
};

// Reads input bytes front to back; zeros once it runs out.
struct Input {
  const uint8_t* p;
  size_t n;
  uint8_t byte() { return n ? (--n, *p++) : 0; }
  uint32_t u32() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= uint32_t(byte()) << (8 * i);
    return v;
  }
};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static testing::FakeMemory mem{{kBase, kSize}};
  static Block* disk = [] {
    int fd = memfd_create("fuzz-disk", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, 1 << 20) != 0) __builtin_trap();
    return new Block(fd, BlockOptions{false, "fuzz"});
  }();
  static Block* readOnly = [] {
    int fd = memfd_create("fuzz-disk-ro", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, 1 << 20) != 0) __builtin_trap();
    return new Block(fd, BlockOptions{true, "fuzz-read-only-disk-id"});
  }();
  Input in{data, size};
  uint8_t mode = in.byte();
  Block& dev = mode & 1 ? *readOnly : *disk;
  std::memset(mem.at(kBase, kSize), 0, kSize);

  testing::Driver driver(mem, 16, kRings, kScratch, mode & 2);
  std::vector<Queue> queues;
  queues.emplace_back(16);
  queues[0].setDescTable(driver.desc);
  queues[0].setAvailRing(driver.avail);
  queues[0].setUsedRing(driver.used);
  queues[0].setSize(16);
  uint64_t features = dev.features() & ~(mode & 4 ? Block::kFDiscard : 0);
  std::string why;
  if (!queues[0].activate(mem.map, features, why)) __builtin_trap();
  NullGuest guest;
  dev.activate(mem.map, queues, features, guest);

  // Up to four requests; each: buffer count, then per buffer a length (up to 64 KiB) and a
  // writable bit; buffers are packed into guest memory and filled from the input.
  uint64_t next = kBuffers;
  unsigned requests = 1 + in.byte() % 4;
  for (unsigned r = 0; r < requests; ++r) {
    uint8_t shape = in.byte();
    unsigned count = 1 + shape % 4;
    std::vector<testing::DriverBuffer> bufs;
    for (unsigned i = 0; i < count; ++i) {
      uint32_t len = in.u32();
      bool writable = len & 0x80000000u;
      len = (len & 0xffff) % 0x8000;
      if (next + len > kBase + kSize) break;
      bufs.push_back({next, len, writable});
      for (uint32_t j = 0; j < len && in.n; ++j) mem.at(next + j)[0] = in.byte();
      next += len;
    }
    if (bufs.empty()) break;
    driver.add(bufs, shape & 0x10);
  }
  driver.publish();
  dev.process(0);
  dev.reset();
  return 0;
}
