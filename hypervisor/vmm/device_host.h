// What the machine offers a device (virtio-mmio or any other): a range on the MMIO bus, doorbells
// and interrupt lines that bypass the VMM where the backend can, guest memory, and the event loop
// on which device work runs. No backend type appears here.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "loop/event_loop.h"
#include "vmm/memory.h"

namespace skiff {

// Register accesses the VMM sees (everything but the doorbells), on the vCPU thread that made
// them: `offset` is from the device's base, and offset + size lies inside the device's range.
// For reads the device fills all `size` bytes. Must not block.
class MmioDevice {
 public:
  virtual ~MmioDevice() = default;
  virtual void mmioRead(uint64_t offset, uint8_t* data, uint32_t size) = 0;
  virtual void mmioWrite(uint64_t offset, const uint8_t* data, uint32_t size) = 0;
};

// How a doorbell or an interrupt line is carried out: by the hypervisor itself (KVM: ioeventfd,
// irqfd), or by the VMM (an MMIO exit handled on the vCPU thread; a KVM_IRQ_LINE pulse from the
// event loop thread).
enum class EventPath { Backend, Emulated };
inline const char* eventPathName(EventPath p) { return p == EventPath::Backend ? "backend" : "emulated"; }

// A guest write to one MMIO address that only says "look at your queue": onRing runs on the
// event loop with how many rings arrived since the last call (at least 1; rings coalesce).
class Doorbell {
 public:
  virtual ~Doorbell() = default;
  virtual EventPath path() const = 0;
};

// One interrupt line into the VM's IO-APIC, edge-triggered: trigger() pulses it. From any thread;
// never blocks (it signals a notifier the hypervisor, or the event loop, waits on).
class InterruptLine {
 public:
  virtual ~InterruptLine() = default;
  virtual void trigger() = 0;
  virtual uint32_t line() const = 0;
  virtual EventPath path() const = 0;
};

// A free virtio-mmio slot (layout.h): where a device's registers go and which line it raises.
struct VirtioSlot {
  uint32_t index;
  uint64_t base;
  uint64_t size;
  uint32_t irq;
  // The kernel command-line word that tells Linux about it: virtio_mmio.device=0x200@0xd0000000:16
  std::string cmdline() const;
};

// Handed to each device's attach function once, during boot: after the VM and guest memory exist
// and the event loop runs, before the kernel's command line is written and before any vCPU runs.
// Everything returned lives until the machine ends; the machine stops the event loop first, so no
// handler runs after that. Throws on a bad request (overlapping ranges, an unknown line).
class DeviceHost {
 public:
  virtual ~DeviceHost() = default;
  virtual const GuestMemory& memory() = 0;
  virtual EventLoop& loop() = 0;
  // [base, base + size) on the MMIO bus; must not overlap RAM, another device or the APICs.
  virtual void addMmio(uint64_t base, uint64_t size, std::shared_ptr<MmioDevice> device) = 0;
  // A doorbell at `addr` (inside a range the same device added), for writes of `size` bytes
  // (1, 2, 4 or 8), and with `match` only when the value written equals it (virtio-mmio's
  // QueueNotify: one doorbell per queue index).
  virtual Doorbell& addDoorbell(uint64_t addr, uint32_t size, std::optional<uint64_t> match, std::function<void(uint64_t rings)> onRing) = 0;
  // Interrupt line `line` (an IO-APIC pin, layout.h) as an InterruptLine.
  virtual InterruptLine& interruptLine(uint32_t line) = 0;
  // Words for the kernel command line (VirtioSlot::cmdline()).
  virtual void appendCmdline(const std::string& words) = 0;
  // The lowest virtio-mmio slot whose range and line nobody has taken yet; it is the caller's to
  // addMmio and interruptLine. Throws when all are taken.
  virtual VirtioSlot freeVirtioSlot() = 0;
};

using DeviceAttach = std::function<void(DeviceHost& host)>;

}  // namespace skiff
