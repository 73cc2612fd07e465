// 32-bit register access to a virtio::Mmio, as a driver does it: what the device tests and the
// fuzz targets share.
#pragma once
#include <cstdint>

#include "devices/virtio/mmio.h"

namespace skiff::virtio::testing {

inline uint32_t rd(Mmio& m, uint64_t off) {
  uint32_t v = 0;
  m.read(off, reinterpret_cast<uint8_t*>(&v), 4);  // uint32_t storage viewed as its 4 bytes
  return v;
}
inline void wr(Mmio& m, uint64_t off, uint32_t v) { m.write(off, reinterpret_cast<const uint8_t*>(&v), 4); }

}  // namespace skiff::virtio::testing
