// The MMIO bus: which device answers a guest-physical address outside RAM. Filled while the
// machine boots, read without locks by vCPU threads afterwards (it never changes then).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "vmm/device_host.h"

namespace skiff {

class MmioBus {
 public:
  // Throws HypervisorError for an empty or wrapping range, or one overlapping a device's.
  void add(uint64_t base, uint64_t size, std::shared_ptr<MmioDevice> device);
  // False if no one device holds all of [addr, addr + size).
  bool read(uint64_t addr, uint8_t* data, uint32_t size) const;
  bool write(uint64_t addr, const uint8_t* data, uint32_t size) const;
  // True if [addr, addr + size) lies inside one device's range.
  bool covers(uint64_t addr, uint64_t size) const { return find(addr, size) != nullptr; }
  // True if any device's range meets [addr, addr + size).
  bool overlaps(uint64_t addr, uint64_t size) const;
  void clear() { ranges_.clear(); }

 private:
  struct Range {
    uint64_t base, size;
    std::shared_ptr<MmioDevice> device;
  };
  const Range* find(uint64_t addr, uint64_t size) const;
  std::vector<Range> ranges_;
};

}  // namespace skiff
