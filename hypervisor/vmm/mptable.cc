// The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns its CPUs,
// its IO-APIC and how ISA interrupts reach it (what Firecracker and QEMU's qboot provide too).
#include <cstring>
#include <vector>

#include "vmm/boot.h"
#include "vmm/layout.h"

namespace skiff {
namespace {

constexpr uint8_t kSpecRev = 4;
constexpr uint8_t kApicVersion = 0x14;
constexpr uint8_t kIoApicVersion = 0x11;
constexpr uint8_t kEntryProcessor = 0, kEntryBus = 1, kEntryIoApic = 2, kEntryIoInterrupt = 3, kEntryLocalInterrupt = 4;
constexpr uint8_t kIntINT = 0, kIntNMI = 1, kIntExtINT = 3;
constexpr uint8_t kCpuEnabled = 1, kCpuBootstrap = 2;

class Writer {
 public:
  void u8(uint8_t v) { bytes.push_back(v); }
  void u16(uint16_t v) { raw(&v, 2); }
  void u32(uint32_t v) { raw(&v, 4); }
  void raw(const void* p, size_t n) { bytes.insert(bytes.end(), static_cast<const uint8_t*>(p), static_cast<const uint8_t*>(p) + n); }
  void text(const char* s, size_t n) {  // space-padded, as the spec's ID strings are
    for (size_t i = 0; i < n; i++) u8(i < std::strlen(s) ? uint8_t(s[i]) : uint8_t(' '));
  }
  std::vector<uint8_t> bytes;
};

uint8_t checksum(const uint8_t* p, size_t n) {
  uint8_t sum = 0;
  for (size_t i = 0; i < n; i++) sum = uint8_t(sum + p[i]);
  return uint8_t(-sum);
}

}  // namespace

void writeMpTable(const GuestMemory& mem, uint32_t cpus) {
  const uint8_t ioApicId = uint8_t(cpus);  // the first id after the processors'
  Writer entries;
  uint16_t count = 0;
  for (uint32_t id = 0; id < cpus; id++, count++) {
    entries.u8(kEntryProcessor);
    entries.u8(uint8_t(id));
    entries.u8(kApicVersion);
    entries.u8(kCpuEnabled | (id == 0 ? kCpuBootstrap : 0));
    entries.u32(0x600);  // CPU signature: family 6
    entries.u32(0x201);  // features: FPU, APIC
    entries.u32(0);
    entries.u32(0);
  }
  entries.u8(kEntryBus);
  entries.u8(0);
  entries.text("ISA", 6);
  count++;
  entries.u8(kEntryIoApic);
  entries.u8(ioApicId);
  entries.u8(kIoApicVersion);
  entries.u8(1);  // enabled
  entries.u32(static_cast<uint32_t>(layout::kIoApic));
  count++;
  for (uint32_t pin = 0; pin < layout::kIoApicPins; pin++, count++) {
    entries.u8(kEntryIoInterrupt);
    entries.u8(kIntINT);
    entries.u16(0);  // polarity and trigger: as the bus says
    entries.u8(0);   // ISA bus
    entries.u8(uint8_t(pin));
    entries.u8(ioApicId);
    entries.u8(uint8_t(pin));
  }
  for (uint8_t lint = 0; lint < 2; lint++, count++) {
    entries.u8(kEntryLocalInterrupt);
    entries.u8(lint == 0 ? kIntExtINT : kIntNMI);
    entries.u16(0);
    entries.u8(0);
    entries.u8(0);
    entries.u8(0xff);  // every local APIC
    entries.u8(lint);
  }

  Writer table;
  table.text("PCMP", 4);
  table.u16(uint16_t(44 + entries.bytes.size()));
  table.u8(kSpecRev);
  table.u8(0);  // checksum, below
  table.text("SKIFF", 8);
  table.text("MICROVM", 12);
  table.u32(0);  // no OEM table
  table.u16(0);
  table.u16(count);
  table.u32(static_cast<uint32_t>(layout::kLocalApic));
  table.u16(0);  // no extended table
  table.u8(0);
  table.u8(0);
  table.raw(entries.bytes.data(), entries.bytes.size());
  table.bytes[7] = checksum(table.bytes.data(), table.bytes.size());

  const uint64_t tableAddr = layout::kMpTable + 16;
  Writer floating;
  floating.text("_MP_", 4);
  floating.u32(static_cast<uint32_t>(tableAddr));
  floating.u8(1);  // length in 16-byte units
  floating.u8(kSpecRev);
  floating.u8(0);  // checksum, below
  for (int i = 0; i < 5; i++) floating.u8(0);  // feature bytes: a configuration table is present
  floating.bytes[10] = checksum(floating.bytes.data(), floating.bytes.size());

  if (16 + table.bytes.size() > layout::kMpTableMax || !mem.write(layout::kMpTable, floating.bytes.data(), 16) ||
      !mem.write(tableAddr, table.bytes.data(), table.bytes.size())) {
    throw BootError("guest memory too small for the MP table");
  }
}

}  // namespace skiff
