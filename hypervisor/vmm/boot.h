// Loading a kernel into guest memory: the PVH boot of an ELF vmlinux. Every offset and size read
// from the file is checked against the file and against guest memory before it is used.
#pragma once
#include <cstdint>
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

// Copies the initrd as high as it fits below the initrd ceiling and above the kernel.
InitrdPlacement placeInitrd(const std::vector<uint8_t>& initrd, const GuestMemory& mem, uint64_t kernelEnd);

// Writes the GDT, command line, memory map, module list and hvm_start_info; returns the vCPU's
// starting state for the PVH entry.
BootCpuState writePvhBootInfo(const GuestMemory& mem, const LoadedKernel& kernel, const std::string& cmdline, const InitrdPlacement& initrd);

}  // namespace skiff
