#include <algorithm>
#include <cstdio>
#include <cstring>

#include "vmm/boot.h"
#include "vmm/layout.h"

namespace skiff {
namespace {

// ELF64 layout (System V gABI); read field by field with memcpy, never by casting file bytes.
constexpr uint32_t kPtLoad = 1;
constexpr uint32_t kPtNote = 4;
constexpr uint32_t kXenElfNotePhys32Entry = 18;
constexpr uint32_t kPvhMagic = 0x336ec578;

// True if [off, off+len) lies inside a buffer of `size` bytes, without overflow.
bool inside(uint64_t size, uint64_t off, uint64_t len) { return off <= size && len <= size - off; }

struct Phdr {
  uint32_t type;
  uint64_t offset, paddr, filesz, memsz, align;
};

std::vector<Phdr> programHeaders(const std::vector<uint8_t>& f) {
  if (f.size() < 64 || std::memcmp(f.data(), "\x7f" "ELF", 4) != 0) throw BootError("kernel is not an ELF file");
  if (f[4] != 2 || f[5] != 1) throw BootError("kernel is not a little-endian ELF64 file");
  if (fileField<uint16_t>(f, 18) != 62) throw BootError("kernel ELF is not for x86-64");
  uint64_t phoff = fileField<uint64_t>(f, 32);
  uint16_t phentsize = fileField<uint16_t>(f, 54), phnum = fileField<uint16_t>(f, 56);
  if (phentsize < 56 || !inside(f.size(), phoff, uint64_t(phentsize) * phnum)) throw BootError("kernel ELF program headers lie outside the file");
  std::vector<Phdr> out;
  for (uint16_t i = 0; i < phnum; i++) {
    uint64_t at = phoff + uint64_t(i) * phentsize;
    Phdr p{fileField<uint32_t>(f, at), fileField<uint64_t>(f, at + 8), fileField<uint64_t>(f, at + 24), fileField<uint64_t>(f, at + 32), fileField<uint64_t>(f, at + 40), fileField<uint64_t>(f, at + 48)};
    if (!inside(f.size(), p.offset, p.filesz)) throw BootError("kernel ELF segment " + std::to_string(i) + " lies outside the file");
    out.push_back(p);
  }
  return out;
}

// Finds the Xen PVH entry note in one PT_NOTE segment, or 0.
uint64_t pvhEntryIn(const std::vector<uint8_t>& f, const Phdr& note) {
  uint64_t pos = note.offset, end = note.offset + note.filesz;
  auto align4 = [](uint64_t v) { return (v + 3) & ~uint64_t(3); };
  while (end - pos >= 12) {
    uint32_t namesz = fileField<uint32_t>(f, pos), descsz = fileField<uint32_t>(f, pos + 4), type = fileField<uint32_t>(f, pos + 8);
    uint64_t name = pos + 12, desc = name + align4(namesz);
    if (!inside(end, name, align4(namesz)) || !inside(end, desc, descsz)) return 0;
    if (namesz == 4 && std::memcmp(f.data() + name, "Xen", 4) == 0 && type == kXenElfNotePhys32Entry) {
      if (descsz == 4) return fileField<uint32_t>(f, desc);
      if (descsz == 8) return fileField<uint64_t>(f, desc);
      throw BootError("kernel PVH entry note has a " + std::to_string(descsz) + "-byte value");
    }
    pos = desc + align4(descsz);
  }
  return 0;
}

struct HvmStartInfo {
  uint32_t magic, version, flags, nr_modules;
  uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
  uint32_t memmap_entries, reserved;
};
struct HvmModlistEntry {
  uint64_t paddr, size, cmdline_paddr, reserved;
};
struct HvmMemmapEntry {
  uint64_t addr, size;
  uint32_t type, reserved;
};
static_assert(sizeof(HvmStartInfo) == 56 && sizeof(HvmModlistEntry) == 32 && sizeof(HvmMemmapEntry) == 24, "PVH ABI layout");

}  // namespace

LoadedKernel loadPvhElf(const std::vector<uint8_t>& f, const GuestMemory& mem) {
  LoadedKernel k;
  for (const Phdr& p : programHeaders(f)) {
    if (p.type == kPtNote && k.entry == 0) k.entry = pvhEntryIn(f, p);
    if (p.type != kPtLoad || p.memsz == 0) continue;
    if (p.filesz > p.memsz) throw BootError("kernel ELF segment has more file bytes than memory bytes");
    uint8_t* dst = mem.at(p.paddr, p.memsz);
    if (!dst || p.paddr < layout::kHighMemory) {
      char at[32];
      snprintf(at, sizeof at, "0x%llx", static_cast<unsigned long long>(p.paddr));
      throw BootError(std::string("kernel segment at ") + at + " (" + std::to_string(p.memsz >> 10) + " KiB) does not fit in guest memory; give more memory");
    }
    std::memcpy(dst, f.data() + p.offset, p.filesz);
    std::memset(dst + p.filesz, 0, p.memsz - p.filesz);
    if (p.paddr + p.memsz > k.end) k.end = p.paddr + p.memsz;
  }
  if (k.entry == 0) throw BootError("kernel ELF has no PVH entry note (Xen note 18): build it with CONFIG_PVH=y");
  if (k.entry >= (uint64_t(1) << 32)) throw BootError("kernel PVH entry lies above 4 GiB");
  return k;
}

BootCpuState writePvhBootInfo(const GuestMemory& mem, const LoadedKernel& kernel, const std::string& cmdline, const InitrdPlacement& initrd) {
  writeCmdline(mem, cmdline);
  std::vector<HvmMemmapEntry> map;
  for (const RamRange& r : ramMap(mem)) map.push_back({r.addr, r.size, r.type, 0});
  bool ok = mem.write(layout::kPvhMemmap, map.data(), map.size() * sizeof(HvmMemmapEntry));

  HvmStartInfo info{};
  info.magic = kPvhMagic;
  info.version = 1;
  info.cmdline_paddr = layout::kCmdline;
  info.memmap_paddr = layout::kPvhMemmap;
  info.memmap_entries = static_cast<uint32_t>(map.size());
  if (initrd.size > 0) {
    HvmModlistEntry mod{initrd.gpa, initrd.size, 0, 0};
    ok = ok && mem.put(layout::kPvhModlist, mod);
    info.nr_modules = 1;
    info.modlist_paddr = layout::kPvhModlist;
  }
  ok = ok && mem.put(layout::kPvhStartInfo, info);
  if (!ok) throw BootError("guest memory too small for the boot structures");

  BootCpuState state = bootGdtState(mem, BootCpuState::Mode::Flat32);
  state.rip = kernel.entry;
  state.rbx = layout::kPvhStartInfo;
  return state;
}

}  // namespace skiff
