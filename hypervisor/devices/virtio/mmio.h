// virtio-mmio, version 2 (modern only; virtio 1.2 §4.2.2): the register window of one device as the
// guest sees it, on an MMIO range of kWindowSize bytes. The VMM's bus hands it "read/write N bytes
// at offset X"; it negotiates features, configures queues, and turns driver kicks and device
// interrupts into two callbacks the machine maps onto ioeventfd/irqfd (or a plain IRQ line).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "devices/virtio/device.h"

namespace skiff {
namespace virtio {

class Mmio final : private Guest {
 public:
  static constexpr uint64_t kWindowSize = 0x200;  // registers to 0xff, device config from 0x100
  static constexpr uint64_t kQueueNotifyOffset = 0x50;
  static constexpr uint64_t kConfigOffset = 0x100;
  static constexpr uint32_t kVendorId = 0x46494b53;  // "SKIF"

  // The interrupt line. true: InterruptStatus is non-zero and the driver must look, now; it comes
  // each time the device sets a bit (also when some were set already) and after an ACK that left
  // bits set. false: the driver acknowledged everything. Edge-style transports (irqfd) send an
  // edge on every true and ignore false; a level-style line is asserted on true (again: harmless)
  // and deasserted on false. Why not only on 0 -> non-zero: see raise() in mmio.cc.
  // Called with an internal lock held: it must not call back into this Mmio.
  using Interrupt = std::function<void(bool level)>;
  // The driver wrote QueueNotify for `queue` (< the device's queue count). The machine either runs
  // processQueue(queue) on its device thread or, with an ioeventfd registered at
  // kQueueNotifyOffset, never sees this at all. Null: processQueue runs inline on the vCPU thread, a bounded number of
  // rounds (tests, and machines without an event loop).
  using Notify = std::function<void(uint16_t queue)>;
  using Log = std::function<void(const std::string& message)>;

  // `memory` and `device` must outlive the Mmio.
  Mmio(Device& device, const MemoryMap& memory, Interrupt interrupt, Log log, Notify notify = nullptr);
  Mmio(const Mmio&) = delete;
  Mmio& operator=(const Mmio&) = delete;

  // vCPU threads. Any offset and size (out-of-window, unaligned, odd sizes) is handled: reads
  // that the spec does not define return zeros, such writes are ignored.
  void read(uint64_t offset, uint8_t* data, uint32_t size);
  void write(uint64_t offset, const uint8_t* data, uint32_t size);
  // The device thread, on a kick. Ignored unless the driver is running the device. True: work is
  // left (Device::process's budget ran out); call again after the event loop's other work.
  bool processQueue(uint16_t queue);

  // Runs `fn` serialized with register accesses and queue processing, if the driver is running the
  // device; false if it is not. Every device entry point that does not come through the transport
  // (vsock's host-socket readiness, say) must be called through this: the driver may reset the
  // device or a queue at any moment from a vCPU.
  bool withDevice(const std::function<void()>& fn);

  uint32_t status();
  uint32_t interruptStatus();
  bool failed();

 private:
  // Guest (what the device model calls, with mu_ held by processQueue)
  void usedBuffers(uint16_t queue) override;
  void configChanged() override;
  void fail(const std::string& why) override;

  uint32_t readRegister(uint64_t offset);
  void writeRegister(uint64_t offset, uint32_t value);
  void writeStatus(uint32_t value);
  void reset();
  void raise(uint32_t bits);
  Queue* selectedQueue();

  Device& device_;
  const MemoryMap& memory_;
  Interrupt interrupt_;
  Log log_;
  Notify notify_;

  // mu_ serializes register accesses with device work; irqMu_ (taken under mu_ or alone, never the
  // other way round) keeps InterruptStatus and the line level in step, so an ACK on one vCPU does
  // not wait for a device's I/O.
  std::mutex mu_;
  std::mutex irqMu_;
  uint32_t interruptStatus_ = 0;

  std::vector<Queue> queues_;
  uint32_t status_ = 0;
  bool needsReset_ = false;
  bool active_ = false;  // device.activate() ran since the last reset
  uint64_t driverFeatures_ = 0;
  uint32_t deviceFeaturesSel_ = 0, driverFeaturesSel_ = 0, queueSel_ = 0;
  uint32_t configGeneration_ = 0;
  uint64_t failures_ = 0;  // logged once; later ones only counted
};

}  // namespace virtio
}  // namespace skiff
