// Guest RAM: host mappings and bounds-checked access by guest-physical address.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

namespace skiff {

struct MemoryRegion {
  uint64_t gpa;
  uint64_t size;
  uint8_t* host;
};

class GuestMemory {
 public:
  // Lays out `bytes` of RAM below the MMIO hole and, past it, from 4 GiB (layout.h).
  explicit GuestMemory(uint64_t bytes);
  ~GuestMemory();
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;

  const std::vector<MemoryRegion>& regions() const { return regions_; }
  uint64_t size() const { return size_; }

  // Host pointer for [gpa, gpa+len) if the whole range lies in one region, else nullptr.
  // Every guest-supplied address goes through here (or read/write) before it is touched.
  uint8_t* at(uint64_t gpa, uint64_t len) const;
  bool write(uint64_t gpa, const void* src, uint64_t len) const {
    uint8_t* p = at(gpa, len);
    if (p && len) std::memcpy(p, src, len);
    return p != nullptr;
  }
  bool read(uint64_t gpa, void* dst, uint64_t len) const {
    uint8_t* p = at(gpa, len);
    if (p && len) std::memcpy(dst, p, len);
    return p != nullptr;
  }
  template <typename T>
  bool put(uint64_t gpa, const T& value) const {
    return write(gpa, &value, sizeof value);
  }

 private:
  std::vector<MemoryRegion> regions_;
  uint64_t size_;
};

}  // namespace skiff
