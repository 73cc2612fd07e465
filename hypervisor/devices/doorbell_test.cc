#include "devices/doorbell_test.h"

#include <atomic>
#include <cstring>

#include "vmm/layout.h"

namespace skiff {
namespace {

class DoorbellTest final : public MmioDevice {
 public:
  explicit DoorbellTest(const GuestMemory& memory) : memory_(memory) {}

  void mmioRead(uint64_t offset, uint8_t* data, uint32_t size) override {
    uint32_t value = 0;
    switch (offset) {
      case 0x00: value = kDoorbellTestMagic; break;
      case 0x04: value = (bellBackend_ ? 1u : 0u) | (irqBackend_ ? 2u : 0u); break;
      case 0x08: value = static_cast<uint32_t>(reply_.load()); break;
      case 0x0c: value = static_cast<uint32_t>(reply_.load() >> 32); break;
      case 0x10: value = static_cast<uint32_t>(rings_.load()); break;
      case 0x14: value = static_cast<uint32_t>(lostReplies_.load()); break;
      default: value = 0; break;
    }
    // Any width; bytes past the 32-bit register read as 0.
    std::memset(data, 0, size);
    std::memcpy(data, &value, size < 4 ? size : 4);
  }

  void mmioWrite(uint64_t offset, const uint8_t* data, uint32_t size) override {
    if (size != 4 || (offset != 0x08 && offset != 0x0c)) return;  // a wrong access vanishes
    uint32_t v;
    std::memcpy(&v, data, 4);
    uint64_t old = reply_.load();
    reply_.store(offset == 0x08 ? (old & ~0xffffffffull) | v : (old & 0xffffffffull) | (uint64_t(v) << 32));
  }

  // On the event loop.
  void ring(uint64_t rings) {
    uint64_t count = rings_.fetch_add(rings) + rings;
    // The address is the guest's: GuestMemory checks it lies in RAM before anything is written.
    if (!memory_.put(reply_.load(), count)) lostReplies_.fetch_add(1);
    irq_->trigger();
  }

  const GuestMemory& memory_;
  InterruptLine* irq_ = nullptr;
  bool bellBackend_ = false, irqBackend_ = false;
  std::atomic<uint64_t> reply_{0}, rings_{0}, lostReplies_{0};
};

}  // namespace

void attachDoorbellTest(DeviceHost& host) {
  const VirtioSlot slot{layout::kDoorbellTestSlot, layout::virtioMmioSlot(layout::kDoorbellTestSlot), layout::kVirtioMmioSlotSize, layout::virtioIrq(layout::kDoorbellTestSlot)};
  const uint64_t base = slot.base;
  auto device = std::make_shared<DoorbellTest>(host.memory());
  host.addMmio(base, slot.size, device);
  device->irq_ = &host.interruptLine(slot.irq);
  // Not a virtio device, so not virtio_mmio.device=: a word of its own, in the same form.
  host.appendCmdline("skiff.doorbell_test=" + slot.cmdline().substr(slot.cmdline().find('=') + 1));
  device->irqBackend_ = device->irq_->path() == EventPath::Backend;
  DoorbellTest* d = device.get();  // the bus holds the device until the machine ends
  Doorbell& bell = host.addDoorbell(base + kDoorbellTestRing, 4, std::nullopt, [d](uint64_t rings) { d->ring(rings); });
  device->bellBackend_ = bell.path() == EventPath::Backend;
}

}  // namespace skiff
