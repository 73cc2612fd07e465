// What every boot format shares: the RAM map, the initrd's place, the command line, the GDT.
#include <algorithm>
#include <cstring>

#include "vmm/boot.h"
#include "vmm/layout.h"

namespace skiff {
namespace {
uint64_t lowMemoryEnd(const GuestMemory& mem) { return mem.regions().front().size; }
}  // namespace

std::vector<RamRange> ramMap(const GuestMemory& mem) {
  std::vector<RamRange> map;
  map.push_back({0, layout::kEbda, kE820Ram});
  map.push_back({layout::kEbda, layout::kHighMemory - layout::kEbda, kE820Reserved});
  map.push_back({layout::kHighMemory, lowMemoryEnd(mem) - layout::kHighMemory, kE820Ram});
  for (size_t i = 1; i < mem.regions().size(); i++) map.push_back({mem.regions()[i].gpa, mem.regions()[i].size, kE820Ram});
  return map;
}

InitrdPlacement placeInitrd(const std::vector<uint8_t>& initrd, const GuestMemory& mem, uint64_t kernelEnd, uint64_t ceiling) {
  InitrdPlacement place{0, initrd.size()};
  if (initrd.empty()) return place;
  uint64_t top = std::min({lowMemoryEnd(mem), layout::kInitrdCeiling, ceiling});
  uint64_t floor = (kernelEnd + layout::kPageSize - 1) & ~(layout::kPageSize - 1);
  if (initrd.size() > top || ((top - initrd.size()) & ~(layout::kPageSize - 1)) < floor) {
    throw BootError("initrd (" + std::to_string(initrd.size() >> 10) + " KiB) does not fit in guest memory above the kernel; give more memory");
  }
  place.gpa = (top - initrd.size()) & ~(layout::kPageSize - 1);
  mem.write(place.gpa, initrd.data(), initrd.size());
  return place;
}

void writeCmdline(const GuestMemory& mem, const std::string& cmdline) {
  if (cmdline.size() + 1 > layout::kCmdlineMax) throw BootError("kernel command line is longer than " + std::to_string(layout::kCmdlineMax - 1) + " bytes");
  if (!mem.write(layout::kCmdline, cmdline.c_str(), cmdline.size() + 1)) throw BootError("guest memory too small for the command line");
}

BootCpuState bootGdtState(const GuestMemory& mem, BootCpuState::Mode mode) {
  // Selector 0x10: flat code (32-bit for PVH, 64-bit for long mode); 0x18: flat data.
  const uint64_t code = mode == BootCpuState::Mode::Long64 ? 0x00af9b000000ffffULL : 0x00cf9b000000ffffULL;
  const uint64_t gdt[4] = {0, 0, code, 0x00cf93000000ffffULL};
  if (!mem.write(layout::kGdt, gdt, sizeof gdt)) throw BootError("guest memory too small for the GDT");
  BootCpuState state;
  state.mode = mode;
  state.rsp = layout::kBootStack;
  state.gdtBase = layout::kGdt;
  state.gdtLimit = sizeof gdt - 1;
  return state;
}

}  // namespace skiff
