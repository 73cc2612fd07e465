// Loading a kernel into guest memory: the PVH boot of an ELF vmlinux. Every offset and size read
// from the file is checked against the file and against guest memory before it is used.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "vmm/memory.h"

namespace skiff {

class BootError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct LoadedKernel {
  uint64_t entry = 0;  // PVH 32-bit entry (Xen ELF note 18)
  uint64_t end = 0;    // first byte above the loaded image
};

// Copies the PT_LOAD segments of an ELF64 x86-64 vmlinux to their physical addresses.
LoadedKernel loadPvhElf(const std::vector<uint8_t>& file, const GuestMemory& mem);

struct InitrdPlacement {
  uint64_t gpa = 0;
  uint64_t size = 0;
};

// Copies the initrd as high as it fits below `ceiling` (and layout's), above the kernel.
InitrdPlacement placeInitrd(const std::vector<uint8_t>& initrd, const GuestMemory& mem, uint64_t kernelEnd, uint64_t ceiling = UINT64_MAX);

// Writes the GDT, command line, memory map, module list and hvm_start_info; returns the vCPU's
// starting state for the PVH entry.
BootCpuState writePvhBootInfo(const GuestMemory& mem, const LoadedKernel& kernel, const std::string& cmdline, const InitrdPlacement& initrd);

// The Linux x86 boot protocol, 64-bit entry: a bzImage's protected-mode part copied to its load
// address; the setup header kept for the zero page.
struct LoadedBzImage {
  LoadedKernel kernel;               // entry: the 64-bit entry (load address + 0x200)
  std::vector<uint8_t> setupHeader;  // file bytes [0x1f1, header end)
  uint64_t initrdCeiling = 0;        // from initrd_addr_max
};
LoadedBzImage loadBzImage(const std::vector<uint8_t>& file, const GuestMemory& mem);

// Writes the GDT, identity page tables, command line and boot_params (zero page); returns the
// vCPU's starting state: long mode at the 64-bit entry with %rsi = the zero page.
BootCpuState writeBzImageBootInfo(const GuestMemory& mem, const LoadedBzImage& image, const std::string& cmdline, const InitrdPlacement& initrd);

// Writes an Intel MP table (spec 1.4) describing `cpus` processors (APIC ids 0..cpus-1, 0 the
// bootstrap processor), the IO-APIC and ISA interrupt routing, so the guest can find and start
// its vCPUs without ACPI.
void writeMpTable(const GuestMemory& mem, uint32_t cpus);

// Shared by the formats.
// A little-endian field of a kernel file; the caller has checked off + sizeof(T) <= f.size().
template <typename T>
T fileField(const std::vector<uint8_t>& f, size_t off) {
  T v;
  std::memcpy(&v, f.data() + off, sizeof v);
  return v;
}

constexpr uint32_t kE820Ram = 1;
constexpr uint32_t kE820Reserved = 2;
struct RamRange {
  uint64_t addr, size;
  uint32_t type;
};
std::vector<RamRange> ramMap(const GuestMemory& mem);
void writeCmdline(const GuestMemory& mem, const std::string& cmdline);
BootCpuState bootGdtState(const GuestMemory& mem, BootCpuState::Mode mode);

}  // namespace skiff
