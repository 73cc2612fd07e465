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
#include "devices/virtio/fuzz/input.h"
#include "devices/virtio/test/driver.h"

using namespace skiff::virtio;
using namespace skiff::virtio::fuzzing;

namespace {
constexpr uint64_t kBase = 0x100000, kSize = 0x40000;
constexpr uint64_t kRings = kBase, kScratch = kBase + 0x8000, kBuffers = kBase + 0x10000;

struct NullGuest : Guest {
  void usedBuffers(uint16_t) override {}
  void configChanged() override {}
  void fail(const std::string&) override { failed = true; }
  bool failed = false;
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

  // Layout first, contents after, so a mutation of one length does not shift every later field:
  // up to four requests, each a shape byte (buffers - 1 in bits 0-1, 0x10 = indirect) and per buffer
  // a u16 length (< 32 KiB) and a flags byte (bit 0 = device-writable). Then the buffers' bytes, in
  // order, from what is left of the input (zeros once it runs out).
  struct Planned {
    std::vector<testing::DriverBuffer> bufs;
    bool indirect;
  };
  std::vector<Planned> plan;
  uint64_t next = kBuffers;
  unsigned requests = 1 + in.byte() % 4;
  for (unsigned r = 0; r < requests; ++r) {
    uint8_t shape = in.byte();
    Planned p{{}, (shape & 0x10) != 0};
    for (unsigned i = 0, count = 1 + shape % 4; i < count; ++i) {
      uint32_t len = (in.byte() | uint32_t(in.byte()) << 8) % 0x8000;
      bool writable = in.byte() & 1;
      if (next + len > kBase + kSize) break;
      p.bufs.push_back({next, len, writable});
      next += len;
    }
    if (!p.bufs.empty()) plan.push_back(std::move(p));
  }
  for (const Planned& p : plan) {
    for (const auto& b : p.bufs) {
      uint32_t n = b.len < in.n ? b.len : static_cast<uint32_t>(in.n);
      if (n) std::memcpy(mem.at(b.gpa, n), in.p, n);
      in.p += n;
      in.n -= n;
    }
    driver.add(p.bufs, p.indirect);
  }
  driver.publish();
  dev.process(0);
  dev.reset();
  return 0;
}
