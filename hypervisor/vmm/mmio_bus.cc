#include "vmm/mmio_bus.h"

#include <string>

#include "backend/backend.h"
#include "common/hex.h"

namespace skiff {

void MmioBus::add(uint64_t base, uint64_t size, std::shared_ptr<MmioDevice> device) {
  if (size == 0 || base + size < base || !device) throw HypervisorError("MMIO range at " + hex(base) + ": empty, wrapping or without a device");
  for (const auto& r : ranges_) {
    if (base < r.base + r.size && r.base < base + size) throw HypervisorError("MMIO range " + hex(base) + "+" + hex(size) + " overlaps the device at " + hex(r.base));
  }
  ranges_.push_back({base, size, std::move(device)});
}

bool MmioBus::overlaps(uint64_t addr, uint64_t size) const {
  for (const auto& r : ranges_) {
    if (addr < r.base + r.size && r.base < addr + size) return true;
  }
  return false;
}

const MmioBus::Range* MmioBus::find(uint64_t addr, uint64_t size) const {
  for (const auto& r : ranges_) {
    // Overflow-free: addr - r.base is only formed once addr >= r.base.
    if (addr >= r.base && addr - r.base < r.size && size <= r.size - (addr - r.base)) return &r;
  }
  return nullptr;
}

bool MmioBus::read(uint64_t addr, uint8_t* data, uint32_t size) const {
  const Range* r = find(addr, size);
  if (!r) return false;
  r->device->mmioRead(addr - r->base, data, size);
  return true;
}

bool MmioBus::write(uint64_t addr, const uint8_t* data, uint32_t size) const {
  const Range* r = find(addr, size);
  if (!r) return false;
  r->device->mmioWrite(addr - r->base, data, size);
  return true;
}

}  // namespace skiff
