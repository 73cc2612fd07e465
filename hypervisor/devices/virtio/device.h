// What every virtio device model is written against, whatever carries it (virtio-mmio in the native
// VMM, vhost-user for a QEMU guest): guest memory (memory.h), its queues (queue.h), and the Guest
// below for "tell the driver". Nothing here knows about a transport, a VM or Node.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "devices/virtio/memory.h"
#include "devices/virtio/queue.h"

namespace skiff {
namespace virtio {

// A device that cannot be created (its backing file, say), with the call and errno in the message.
class DeviceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Device IDs (virtio 1.2 §5).
enum DeviceType : uint32_t { kNet = 1, kBlock = 2, kConsole = 3, kRng = 4, kVsock = 19, kFs = 26 };

// Feature bits every device may offer (§6). Device-specific bits live with each device.
constexpr uint64_t kFIndirectDesc = 1ull << 28;
constexpr uint64_t kFEventIdx = 1ull << 29;
constexpr uint64_t kFVersion1 = 1ull << 32;

// Device status bits (§2.1).
constexpr uint32_t kAcknowledge = 1, kDriver = 2, kDriverOk = 4, kFeaturesOk = 8, kDeviceNeedsReset = 64, kFailed = 128;

// The transport's side of "notify the guest", as a device model sees it.
class Guest {
 public:
  virtual ~Guest() = default;
  // Used buffers were added to `queue` and its suppression rules (Queue::needsNotification) said
  // the driver wants to hear about it.
  virtual void usedBuffers(uint16_t queue) = 0;
  virtual void configChanged() = 0;
  // The driver broke the rules (a bad chain, a malformed request that cannot be answered): the
  // device stops, the transport sets DEVICE_NEEDS_RESET, tells the driver and logs `why` once.
  virtual void fail(const std::string& why) = 0;
};

// One device model. The transport calls these from one thread at a time (it serializes them).
class Device {
 public:
  virtual ~Device() = default;
  virtual DeviceType type() const = 0;
  // Everything the device offers, generic bits (VERSION_1, EVENT_IDX, INDIRECT_DESC) included.
  virtual uint64_t features() const = 0;
  virtual uint16_t queueCount() const = 0;
  virtual uint16_t queueMaxSize(uint16_t queue) const = 0;
  virtual uint32_t configSize() const = 0;
  // offset + size <= configSize(), checked by the transport.
  virtual void readConfig(uint32_t offset, uint8_t* data, uint32_t size) const = 0;
  virtual void writeConfig(uint32_t offset, const uint8_t* data, uint32_t size) = 0;
  // The driver set DRIVER_OK with `features` accepted; every queue in `queues` (queueCount() of
  // them) is configured, and those that are ready() passed Queue::activate. The references stay
  // valid until reset().
  virtual void activate(const MemoryMap& memory, std::vector<Queue>& queues, uint64_t features, Guest& guest) = 0;
  // The driver notified `queue` (< queueCount()): process what it made available. Work per call is
  // bounded (a guest can keep a queue full forever); true means chains are left: call it again
  // after giving other work its turn.
  virtual bool process(uint16_t queue) = 0;
  // Back to the state before activate(); drops the references it was given.
  virtual void reset() = 0;
};

// The loop every device runs on a notified queue: pop each available chain, hand it to `handle`,
// return it to the driver, and tell the driver per its suppression rules. `handle(chain, usedLen,
// why)` returns false when the request cannot even be answered; the device then fails. Returns
// true when `budget` chains were handled and more may be waiting.
template <typename Handle>
bool drainQueue(Queue& queue, uint16_t index, Guest& guest, uint32_t budget, Handle&& handle) {
  Chain chain;
  bool pushed = false;
  bool more = false;
  for (bool first = true;; first = false) {
    queue.disableNotification();
    uint32_t before = budget;
    while (budget > 0 && queue.pop(chain)) {
      uint32_t usedLen = 0;
      std::string why;
      if (!handle(chain, usedLen, why)) {
        guest.fail(why);
        return false;
      }
      queue.push(chain.head, usedLen);
      pushed = true;
      --budget;
    }
    if (queue.failed()) {
      guest.fail(queue.failure());
      return false;
    }
    if (budget == 0) {
      more = true;
      break;
    }
    // enableNotification() said more had arrived, yet nothing was there: the driver moved its idx
    // back (a hostile guest, or rings placed over our own writes). Stop rather than spin on it.
    if (!first && budget == before) break;
    if (!queue.enableNotification()) break;
  }
  if (pushed && queue.needsNotification()) guest.usedBuffers(index);
  return more;
}

}  // namespace virtio
}  // namespace skiff
