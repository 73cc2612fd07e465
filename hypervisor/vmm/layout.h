// Every guest-physical address and I/O port the native VMM uses, in one place.
#pragma once
#include <cstdint>

namespace skiff::layout {

// Low memory: the boot structures the VMM writes before the first instruction.
constexpr uint64_t kGdt = 0x500;              // boot GDT: null, null, code 0x10, data 0x18
constexpr uint64_t kZeroPage = 0x3000;        // bzImage: struct boot_params (4 KiB)
constexpr uint64_t kPvhStartInfo = 0x6000;    // struct hvm_start_info
constexpr uint64_t kPvhModlist = 0x6100;      // struct hvm_modlist_entry[1] (the initrd)
constexpr uint64_t kPvhMemmap = 0x7000;       // struct hvm_memmap_table_entry[]
constexpr uint64_t kPvhMemmapMax = 64;
constexpr uint64_t kBootStack = 0x8ff0;      // grows down towards 0x8000
// bzImage: identity map of the first 4 GiB with 2 MiB pages: PML4, PDPT, then 4 page directories.
constexpr uint64_t kPml4 = 0x9000;
constexpr uint64_t kPdpt = 0xa000;
constexpr uint64_t kPageDirs = 0xb000;        // 4 pages, up to 0xefff
constexpr uint64_t kIdentityMapBytes = 4ull << 30;
constexpr uint64_t kCmdline = 0x20000;
constexpr uint64_t kCmdlineMax = 4096;        // including the NUL; x86 Linux takes 2048

// Intel MP table (floating pointer, then the configuration table) where Linux scans for it:
// the BIOS area 0xf0000-0xfffff, inside the reserved legacy hole.
constexpr uint64_t kMpTable = 0xf0000;
constexpr uint64_t kMpTableMax = 0x10000;
constexpr uint64_t kLocalApic = 0xfee00000;
constexpr uint64_t kIoApic = 0xfec00000;
constexpr uint32_t kIoApicPins = 24;

// RAM: [0, kEbda) and [kHighMemory, ...) are usable; the legacy hole between is reserved.
constexpr uint64_t kEbda = 0x9fc00;
constexpr uint64_t kHighMemory = 0x100000;
// RAM stops below the 32-bit MMIO hole and continues at 4 GiB.
constexpr uint64_t kMmioHoleStart = 0xc0000000;
constexpr uint64_t kMmioHoleEnd = 0x100000000;
// The initrd goes as high as it fits below this (kernels read it through 32-bit fields).
constexpr uint64_t kInitrdCeiling = kMmioHoleStart;

constexpr uint64_t kPageSize = 0x1000;

// virtio-mmio devices: one page of 0x200-byte slots at the start of the MMIO hole (below the
// IO-APIC and local APIC pages), as Firecracker places its devices. Slot i is at
// kVirtioMmioBase + i * kVirtioMmioSlotSize and raises IO-APIC pin kVirtioIrqFirst + i: pins
// 16-23, which the MP table (mptable.cc) routes like every other pin (edge, active high), and
// which no ISA device uses (timer 0, COM1 4, and what a kernel probes for: 1, 8, 12, 14, 15), so a
// guest never shares them. The kernel learns each from virtio_mmio.device=0x200@BASE:IRQ.
constexpr uint64_t kVirtioMmioBase = 0xd0000000;
constexpr uint64_t kVirtioMmioSlotSize = 0x200;
constexpr uint32_t kVirtioMmioSlots = 8;
constexpr uint32_t kVirtioIrqFirst = 16;
static_assert(kVirtioIrqFirst + kVirtioMmioSlots <= kIoApicPins, "a virtio IRQ beyond the IO-APIC's pins");
static_assert(kVirtioMmioBase >= kMmioHoleStart && kVirtioMmioBase + kVirtioMmioSlots * kVirtioMmioSlotSize <= kIoApic, "virtio-mmio window outside the MMIO hole");
constexpr uint64_t virtioMmioSlot(uint32_t i) { return kVirtioMmioBase + uint64_t(i) * kVirtioMmioSlotSize; }
constexpr uint32_t virtioIrq(uint32_t i) { return kVirtioIrqFirst + i; }
// The doorbell test device (devices/doorbell_test.h), only when a test asks for it: the last
// slot, so virtio devices keep slots from 0.
constexpr uint32_t kDoorbellTestSlot = kVirtioMmioSlots - 1;

// I/O ports and interrupt lines.
constexpr uint16_t kSerialPort = 0x3f8;       // COM1, 8 registers
constexpr uint32_t kSerialIrq = 4;
constexpr uint16_t kExitPort = 0xf4;          // skiff exit device: a 32-bit write ends the VM
constexpr uint16_t kI8042CommandPort = 0x64;  // 0xfe written here resets the machine

}  // namespace skiff::layout
