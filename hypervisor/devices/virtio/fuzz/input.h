// What the virtio fuzz targets share: the input read as a script (front to back, zeros once it runs
// out, so every prefix of an input is a valid script), and the tests' 32-bit register access.
#pragma once
#include <cstddef>
#include <cstdint>

#include "devices/virtio/test/registers.h"

namespace skiff {
namespace virtio {
namespace fuzzing {

struct Input {
  const uint8_t* p;
  size_t n;
  uint8_t byte() { return n ? (--n, *p++) : 0; }
  // Little-endian, one statement per byte: the order of the reads is fixed.
  uint16_t u16() {
    uint16_t lo = byte();
    return uint16_t(lo | byte() << 8);
  }
  uint32_t u32() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= uint32_t(byte()) << (8 * i);
    return v;
  }
};

using testing::rd;
using testing::wr;

}  // namespace fuzzing
}  // namespace virtio
}  // namespace skiff
