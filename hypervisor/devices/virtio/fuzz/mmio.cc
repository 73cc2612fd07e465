// libFuzzer target: the virtio-mmio register file with a device behind it (rng, or blk over a
// sparse memfd). The input is a sequence of register accesses (offset, width, value) with
// occasional queue processing; guest memory starts as input bytes too, so queues the fuzzer
// manages to configure see hostile rings.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "devices/virtio/blk.h"
#include "devices/virtio/mmio.h"
#include "devices/virtio/rng.h"
#include "devices/virtio/test/driver.h"

using namespace skiff::virtio;

namespace {
constexpr uint64_t kBase = 0x10000, kSize = 0x10000;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static testing::FakeMemory mem{{kBase, kSize}};
  static Rng rng;
  static Block* disk = [] {
    int fd = memfd_create("fuzz-mmio-disk", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, 1 << 20) != 0) __builtin_trap();
    return new Block(fd, BlockOptions{false, "fuzz"});
  }();
  if (size < 1) return 0;
  Device& dev = data[0] & 1 ? static_cast<Device&>(*disk) : static_cast<Device&>(rng);
  ++data;
  --size;
  // The first half of the input seeds guest memory, the rest is the access sequence.
  size_t memBytes = size / 2 < kSize ? size / 2 : kSize;
  uint8_t* ram = mem.at(kBase, kSize);
  std::memset(ram, 0, kSize);
  std::memcpy(ram, data, memBytes);
  data += memBytes;
  size -= memBytes;

  int level = 0;
  Mmio mmio(
      dev, mem.map, [&](bool up) { level = up; }, [](const std::string&) {});
  // Each access: 1 byte op/width, 2 bytes offset, 4 bytes value (width 8 uses the value twice).
  while (size >= 7) {
    uint8_t op = data[0];
    uint16_t offset;
    std::memcpy(&offset, data + 1, 2);
    uint8_t value[8];
    std::memcpy(value, data + 3, 4);
    std::memcpy(value + 4, data + 3, 4);
    data += 7;
    size -= 7;
    static const uint32_t widths[] = {4, 1, 2, 8, 4, 4, 0, 3};
    uint32_t width = widths[(op >> 1) & 7];
    // Most accesses hit the register file; some are anywhere in a 64 KiB window.
    uint64_t at = op & 0x40 ? offset : offset % Mmio::kWindowSize;
    if (op & 0x80) {
      mmio.processQueue(static_cast<uint16_t>(offset % 3));
    } else if (op & 1) {
      mmio.write(at, value, width);
    } else {
      uint8_t out[8];
      mmio.read(at, out, width);
    }
  }
  // Leave the static device as a new one would be.
  uint32_t zero = 0;
  mmio.write(0x70, reinterpret_cast<const uint8_t*>(&zero), 4);  // uint32_t storage as its bytes
  (void)level;
  return 0;
}
