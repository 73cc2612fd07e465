#include "vmm/memory.h"

#include <sys/mman.h>

#include <cerrno>
#include <string>

#include "backend/backend.h"
#include "vmm/layout.h"

namespace skiff {

GuestMemory::GuestMemory(uint64_t bytes) : size_(bytes) {
  if (bytes == 0 || bytes % layout::kPageSize != 0) throw HypervisorError("guest memory size must be a non-zero multiple of 4 KiB");
  uint64_t low = bytes < layout::kMmioHoleStart ? bytes : layout::kMmioHoleStart;
  uint64_t chunks[2][2] = {{0, low}, {layout::kMmioHoleEnd, bytes - low}};
  for (auto& c : chunks) {
    if (c[1] == 0) continue;
    // NORESERVE: untouched guest pages cost the host nothing.
    void* p = mmap(nullptr, c[1], PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      for (auto& r : regions_) munmap(r.host, r.size);
      throw HypervisorError("mmap(guest memory, " + std::to_string(c[1] >> 20) + " MiB): " + std::strerror(errno));
    }
    regions_.push_back({c[0], c[1], static_cast<uint8_t*>(p)});
  }
}

GuestMemory::~GuestMemory() {
  for (auto& r : regions_) munmap(r.host, r.size);
}

uint8_t* GuestMemory::at(uint64_t gpa, uint64_t len) const {
  for (const auto& r : regions_) {
    // Written to avoid overflow: gpa - r.gpa is only formed once gpa >= r.gpa.
    if (gpa >= r.gpa && gpa - r.gpa <= r.size && len <= r.size - (gpa - r.gpa)) return r.host + (gpa - r.gpa);
  }
  return nullptr;
}

}  // namespace skiff
