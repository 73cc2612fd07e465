// Guest memory as a virtio device sees it: a set of guest-physical ranges, each backed by a host
// mapping. Every address and length a guest hands a device is translated here, and only here,
// before a byte of it is touched.
//
// The region shape {gpa, size, host} is vmm/memory.h's MemoryRegion, so the native VMM builds a
// MemoryMap from GuestMemory::regions(); vhost-user builds one from VHOST_USER_SET_MEM_TABLE (its
// guest_phys_addr, memory_size and the host address of its mmap). It is a separate type, not
// vmm/memory.h itself, because the vhost-user side has no VMM: this header depends on nothing.
#pragma once
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

// virtio 1.x structures are little-endian; the device code reads them as native integers.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "virtio devices assume a little-endian host");

namespace skiff {
namespace virtio {

struct MemoryRegion {
  uint64_t gpa;
  uint64_t size;
  uint8_t* host;
};

class MemoryMap {
 public:
  MemoryMap() = default;

  // Adds a region. Refused (false) when it is empty, reaches the top of the 64-bit address space
  // (so gpa + size never wraps, and walking past a region's end never lands at 0), overlaps a
  // region already added, or its host address is not congruent to its gpa modulo 8: ring indices
  // are accessed atomically, which needs the host pointer as aligned as the guest address the
  // queue checked (page-aligned mappings always satisfy this).
  bool add(const MemoryRegion& region) {
    if (region.size == 0 || region.host == nullptr) return false;
    if (region.size > UINT64_MAX - region.gpa) return false;
    if ((reinterpret_cast<uintptr_t>(region.host) - region.gpa) % 8 != 0) return false;
    for (const auto& r : regions_) {
      if (region.gpa <= r.gpa + (r.size - 1) && r.gpa <= region.gpa + (region.size - 1)) return false;
    }
    regions_.push_back(region);
    return true;
  }
  const std::vector<MemoryRegion>& regions() const { return regions_; }

  // Host pointer for [gpa, gpa+len) when the whole range lies inside one region, else nullptr.
  // len 0 is valid anywhere inside a region (or at its end).
  uint8_t* translate(uint64_t gpa, uint64_t len) const {
    for (const auto& r : regions_) {
      // Overflow-free: gpa - r.gpa is formed only once gpa >= r.gpa, and len is compared with
      // what is left of the region instead of computing gpa + len.
      if (gpa >= r.gpa && gpa - r.gpa <= r.size && len <= r.size - (gpa - r.gpa)) return r.host + (gpa - r.gpa);
    }
    return nullptr;
  }

  // Appends the host spans covering [gpa, gpa+len), which may cross adjacent regions (a
  // vhost-user memory table is often split where the guest's RAM is contiguous). False, with
  // `out` restored, when any byte lies outside guest memory or more than `maxSpans` are needed.
  bool spans(uint64_t gpa, uint64_t len, std::vector<iovec>& out, size_t maxSpans = 64) const {
    size_t start = out.size();
    while (len > 0) {
      const MemoryRegion* r = find(gpa);
      if (r == nullptr || out.size() - start >= maxSpans) {
        out.resize(start);
        return false;
      }
      uint64_t offset = gpa - r->gpa;
      uint64_t n = len < r->size - offset ? len : r->size - offset;
      out.push_back({r->host + offset, static_cast<size_t>(n)});
      gpa += n;  // cannot wrap: gpa + n <= r->gpa + r->size < 2^64 (add())
      len -= n;
    }
    return true;
  }

  bool contains(uint64_t gpa, uint64_t len) const {
    while (len > 0) {
      const MemoryRegion* r = find(gpa);
      if (r == nullptr) return false;
      uint64_t left = r->size - (gpa - r->gpa);
      if (len <= left) return true;
      gpa += left;
      len -= left;
    }
    return true;
  }

  // Copies between guest memory and the host, across regions; false (nothing guaranteed copied)
  // when any byte lies outside guest memory.
  bool read(uint64_t gpa, void* dst, uint64_t len) const { return copy(gpa, static_cast<uint8_t*>(dst), len, false); }
  bool write(uint64_t gpa, const void* src, uint64_t len) const {
    // The cast drops const only to share copy(); with toGuest set it reads from `src` only.
    return copy(gpa, const_cast<uint8_t*>(static_cast<const uint8_t*>(src)), len, true);
  }
  template <typename T>
  bool get(uint64_t gpa, T& value) const {
    return read(gpa, &value, sizeof value);
  }
  template <typename T>
  bool put(uint64_t gpa, const T& value) const {
    return write(gpa, &value, sizeof value);
  }

 private:
  const MemoryRegion* find(uint64_t gpa) const {
    for (const auto& r : regions_) {
      if (gpa >= r.gpa && gpa - r.gpa < r.size) return &r;
    }
    return nullptr;
  }
  bool copy(uint64_t gpa, uint8_t* host, uint64_t len, bool toGuest) const {
    if (!contains(gpa, len)) return false;
    while (len > 0) {
      const MemoryRegion* r = find(gpa);  // non-null: contains() walked the same path
      uint64_t offset = gpa - r->gpa;
      uint64_t n = len < r->size - offset ? len : r->size - offset;
      if (toGuest) {
        std::memcpy(r->host + offset, host, n);
      } else {
        std::memcpy(host, r->host + offset, n);
      }
      host += n;
      gpa += n;
      len -= n;
    }
    return true;
  }

  std::vector<MemoryRegion> regions_;
};

}  // namespace virtio
}  // namespace skiff
