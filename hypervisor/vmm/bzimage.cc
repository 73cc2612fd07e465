// The Linux x86 boot protocol (Documentation/x86/boot.rst), 64-bit entry: the VMM does what the
// real-mode setup code would, fills the zero page, and starts the vCPU in long mode at
// load address + 0x200. Every header field read from the file is checked before use.
#include <algorithm>
#include <cstring>

#include "vmm/boot.h"
#include "vmm/layout.h"

namespace skiff {
namespace {

// Setup header offsets, relative to the start of the file (and of boot_params).
constexpr size_t kSetupSects = 0x1f1;
constexpr size_t kBootFlag = 0x1fe;
constexpr size_t kJump = 0x200;           // "jmp short": the byte at 0x201 gives the header's end
constexpr size_t kHeaderMagic = 0x202;    // "HdrS"
constexpr size_t kVersion = 0x206;
constexpr size_t kTypeOfLoader = 0x210;
constexpr size_t kRamdiskImage = 0x218;
constexpr size_t kRamdiskSize = 0x21c;
constexpr size_t kCmdLinePtr = 0x228;
constexpr size_t kInitrdAddrMax = 0x22c;
constexpr size_t kRelocatable = 0x234;
constexpr size_t kXloadflags = 0x236;
constexpr size_t kPrefAddress = 0x258;
constexpr size_t kInitSize = 0x260;
constexpr size_t kHeaderLimit = 0x268;    // end of struct setup_header in boot_params
// boot_params fields outside the header.
constexpr size_t kExtRamdiskImage = 0x0c0;
constexpr size_t kExtRamdiskSize = 0x0c4;
constexpr size_t kExtCmdLinePtr = 0x0c8;
constexpr size_t kE820Entries = 0x1e8;
constexpr size_t kE820Table = 0x2d0;
constexpr size_t kE820Max = 128;
constexpr uint16_t kMinVersion = 0x020c;  // 2.12: xloadflags, and with it the 64-bit entry
constexpr uint8_t kXlfKernel64 = 1;
constexpr uint64_t kEntry64Offset = 0x200;
constexpr uint64_t kDefaultLoad = 0x100000;

template <typename T>
void set(uint8_t* page, size_t off, T v) {
  std::memcpy(page + off, &v, sizeof v);
}

}  // namespace

LoadedBzImage loadBzImage(const std::vector<uint8_t>& f, const GuestMemory& mem) {
  if (f.size() < kHeaderLimit || fileField<uint16_t>(f, kBootFlag) != 0xaa55 || std::memcmp(f.data() + kHeaderMagic, "HdrS", 4) != 0) {
    throw BootError("kernel is not a bzImage (no Linux boot protocol header)");
  }
  uint16_t version = fileField<uint16_t>(f, kVersion);
  if (version < kMinVersion) throw BootError("bzImage boot protocol " + std::to_string(version >> 8) + "." + std::to_string(version & 0xff) + " is older than 2.12: no 64-bit entry");
  if (!(f[kXloadflags] & kXlfKernel64)) throw BootError("bzImage has no 64-bit entry point (XLF_KERNEL_64 not set)");

  uint64_t setupSects = f[kSetupSects] == 0 ? 4 : f[kSetupSects];  // 0 means 4, for old kernels
  uint64_t setupBytes = (setupSects + 1) * 512;
  if (setupBytes >= f.size()) throw BootError("bzImage setup (" + std::to_string(setupBytes) + " bytes) is not followed by a kernel");
  uint64_t payload = f.size() - setupBytes;

  // A relocatable kernel says where it likes to be; a fixed one runs at 1 MiB.
  uint64_t load = kDefaultLoad;
  if (f[kRelocatable] && fileField<uint64_t>(f, kPrefAddress) >= layout::kHighMemory) load = fileField<uint64_t>(f, kPrefAddress);
  uint64_t need = std::max<uint64_t>(payload, fileField<uint32_t>(f, kInitSize));
  uint8_t* dst = mem.at(load, need);
  if (!dst) throw BootError("bzImage needs " + std::to_string(need >> 10) + " KiB at " + std::to_string(load >> 20) + " MiB: it does not fit in guest memory; give more memory");
  std::memcpy(dst, f.data() + setupBytes, payload);

  LoadedBzImage image;
  image.kernel.entry = load + kEntry64Offset;
  image.kernel.end = load + need;
  // The header runs from 0x1f1 to the jump's target; never past struct setup_header's end.
  size_t headerEnd = std::min<size_t>(kJump + 2 + f[kJump + 1], kHeaderLimit);
  image.setupHeader.assign(f.begin() + kSetupSects, f.begin() + headerEnd);
  uint32_t initrdMax = fileField<uint32_t>(f, kInitrdAddrMax);
  image.initrdCeiling = initrdMax ? uint64_t(initrdMax) + 1 : UINT64_MAX;
  return image;
}

BootCpuState writeBzImageBootInfo(const GuestMemory& mem, const LoadedBzImage& image, const std::string& cmdline, const InitrdPlacement& initrd) {
  writeCmdline(mem, cmdline);

  // Identity map of the first 4 GiB with 2 MiB pages: the kernel, the zero page, the command
  // line and the initrd must all be reachable at their physical addresses.
  constexpr uint64_t kPresentWritable = 0x3, kLargePage = 0x80;
  constexpr uint64_t kDirs = layout::kIdentityMapBytes >> 30;
  bool ok = mem.put<uint64_t>(layout::kPml4, layout::kPdpt | kPresentWritable);
  for (uint64_t d = 0; d < kDirs; d++) {
    ok = ok && mem.put<uint64_t>(layout::kPdpt + d * 8, (layout::kPageDirs + d * layout::kPageSize) | kPresentWritable);
    for (uint64_t e = 0; e < 512; e++) {
      uint64_t addr = (d << 30) | (e << 21);
      ok = ok && mem.put<uint64_t>(layout::kPageDirs + d * layout::kPageSize + e * 8, addr | kPresentWritable | kLargePage);
    }
  }

  uint8_t* zero = mem.at(layout::kZeroPage, layout::kPageSize);
  if (!ok || !zero) throw BootError("guest memory too small for the boot structures");
  std::memset(zero, 0, layout::kPageSize);
  std::memcpy(zero + kSetupSects, image.setupHeader.data(), image.setupHeader.size());
  set<uint8_t>(zero, kTypeOfLoader, 0xff);  // "undefined" loader
  set<uint32_t>(zero, kCmdLinePtr, static_cast<uint32_t>(layout::kCmdline));
  set<uint32_t>(zero, kExtCmdLinePtr, static_cast<uint32_t>(layout::kCmdline >> 32));
  set<uint32_t>(zero, kRamdiskImage, static_cast<uint32_t>(initrd.gpa));
  set<uint32_t>(zero, kExtRamdiskImage, static_cast<uint32_t>(initrd.gpa >> 32));
  set<uint32_t>(zero, kRamdiskSize, static_cast<uint32_t>(initrd.size));
  set<uint32_t>(zero, kExtRamdiskSize, static_cast<uint32_t>(initrd.size >> 32));
  std::vector<RamRange> map = ramMap(mem);
  if (map.size() > kE820Max) throw BootError("too many memory ranges for the e820 table");
  set<uint8_t>(zero, kE820Entries, static_cast<uint8_t>(map.size()));
  for (size_t i = 0; i < map.size(); i++) {
    uint8_t* e = zero + kE820Table + i * 20;  // struct boot_e820_entry: packed u64, u64, u32
    set<uint64_t>(e, 0, map[i].addr);
    set<uint64_t>(e, 8, map[i].size);
    set<uint32_t>(e, 16, map[i].type);
  }

  BootCpuState state = bootGdtState(mem, BootCpuState::Mode::Long64);
  state.rip = image.kernel.entry;
  state.rsi = layout::kZeroPage;
  state.cr3 = layout::kPml4;
  return state;
}

}  // namespace skiff
