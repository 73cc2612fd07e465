#include "devices/virtio/mmio.h"

#include <cstring>

namespace skiff {
namespace virtio {
namespace {

// Register offsets (§4.2.2, table "MMIO Device Register Layout").
enum Reg : uint64_t {
  kMagicValue = 0x000,
  kVersion = 0x004,
  kDeviceId = 0x008,
  kVendorIdReg = 0x00c,
  kDeviceFeatures = 0x010,
  kDeviceFeaturesSel = 0x014,
  kDriverFeatures = 0x020,
  kDriverFeaturesSel = 0x024,
  kQueueSel = 0x030,
  kQueueNumMax = 0x034,
  kQueueNum = 0x038,
  kQueueReady = 0x044,
  kQueueNotify = 0x050,
  kInterruptStatus = 0x060,
  kInterruptAck = 0x064,
  kStatus = 0x070,
  kQueueDescLow = 0x080,
  kQueueDescHigh = 0x084,
  kQueueDriverLow = 0x090,
  kQueueDriverHigh = 0x094,
  kQueueDeviceLow = 0x0a0,
  kQueueDeviceHigh = 0x0a4,
  kShmSel = 0x0ac,
  kShmLenLow = 0x0b0,
  kShmLenHigh = 0x0b4,
  kShmBaseLow = 0x0b8,
  kShmBaseHigh = 0x0bc,
  kConfigGeneration = 0x0fc,
};
constexpr uint32_t kMagic = 0x74726976;  // "virt"
constexpr uint32_t kInterruptUsedBuffer = 1, kInterruptConfigChange = 2;

const char* typeName(DeviceType type) {
  switch (type) {
    case kNet: return "virtio-net";
    case kBlock: return "virtio-blk";
    case kConsole: return "virtio-console";
    case kRng: return "virtio-rng";
    case kVsock: return "virtio-vsock";
    case kFs: return "virtio-fs";
  }
  return "virtio";
}

uint64_t setLow(uint64_t v, uint32_t low) { return (v & ~0xffffffffull) | low; }
uint64_t setHigh(uint64_t v, uint32_t high) { return (v & 0xffffffffull) | (uint64_t(high) << 32); }

}  // namespace

Mmio::Mmio(Device& device, const MemoryMap& memory, Interrupt interrupt, Log log, Notify notify)
    : device_(device), memory_(memory), interrupt_(std::move(interrupt)), log_(std::move(log)), notify_(std::move(notify)) {
  for (uint16_t i = 0; i < device_.queueCount(); ++i) queues_.emplace_back(device_.queueMaxSize(i));
}

void Mmio::read(uint64_t offset, uint8_t* data, uint32_t size) {
  if (size == 0 || size > 8) return;
  std::memset(data, 0, size);
  if (offset >= kConfigOffset) {
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t off = offset - kConfigOffset;
    // Config space takes any natural width; past its end reads are zeros.
    if (off <= device_.configSize() && size <= device_.configSize() - off) device_.readConfig(static_cast<uint32_t>(off), data, size);
    return;
  }
  // Registers are 32 bits wide and aligned (§4.2.2.2); the spec leaves other accesses undefined.
  if (size != 4 || offset % 4 != 0) return;
  uint32_t value;
  if (offset == kInterruptStatus) {
    value = interruptStatus();
  } else {
    std::lock_guard<std::mutex> lock(mu_);
    value = readRegister(offset);
  }
  std::memcpy(data, &value, 4);
}

void Mmio::write(uint64_t offset, const uint8_t* data, uint32_t size) {
  if (size == 0 || size > 8) return;
  if (offset >= kConfigOffset) {
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t off = offset - kConfigOffset;
    if (off <= device_.configSize() && size <= device_.configSize() - off) {
      device_.writeConfig(static_cast<uint32_t>(off), data, size);
    }
    return;
  }
  if (size != 4 || offset % 4 != 0) return;
  uint32_t value;
  std::memcpy(&value, data, 4);
  if (offset == kInterruptAck) {
    std::lock_guard<std::mutex> irqLock(irqMu_);
    uint32_t cleared = interruptStatus_ & value;
    if (cleared == 0) return;
    interruptStatus_ &= ~cleared;
    // Bits left set came after the driver read the register (Linux's vm_interrupt acknowledges
    // what it read): their edge was sent when they were set, and may be the one that got lost,
    // or may have been taken while this handler was running. Signal again so they are not
    // stranded; a handler that then finds nothing costs one spurious interrupt (see raise()).
    if (interrupt_) interrupt_(interruptStatus_ != 0);
    return;
  }
  if (offset == kQueueNotify) {
    // In v2 without VIRTIO_F_NOTIFICATION_DATA the value is the queue index.
    if (value >= queues_.size()) return;
    if (notify_) {
      notify_(static_cast<uint16_t>(value));
    } else {
      // Bounded: a vCPU held here forever could not be stopped. A benign driver's queue is
      // drained long before; a hostile one is left to kick again.
      for (int round = 0; round < 16 && processQueue(static_cast<uint16_t>(value)); ++round) {
      }
    }
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  writeRegister(offset, value);
}

uint32_t Mmio::readRegister(uint64_t offset) {
  Queue* q = selectedQueue();
  switch (offset) {
    case kMagicValue: return kMagic;
    case kVersion: return 2;
    case kDeviceId: return device_.type();
    case kVendorIdReg: return kVendorId;
    case kDeviceFeatures: {
      uint64_t f = device_.features();
      return deviceFeaturesSel_ == 0 ? uint32_t(f) : deviceFeaturesSel_ == 1 ? uint32_t(f >> 32) : 0;
    }
    case kQueueNumMax: return q ? q->maxSize() : 0;  // 0: the queue does not exist
    case kQueueReady: return q && q->ready() ? 1 : 0;
    case kStatus: return status_ | (needsReset_ ? kDeviceNeedsReset : 0);
    // No shared memory regions: their length and base read as all ones (§4.2.2.1).
    case kShmLenLow: case kShmLenHigh: case kShmBaseLow: case kShmBaseHigh: return 0xffffffff;
    case kConfigGeneration: return configGeneration_;
    default: return 0;  // write-only and reserved registers
  }
}

void Mmio::writeRegister(uint64_t offset, uint32_t value) {
  Queue* q = selectedQueue();
  switch (offset) {
    case kDeviceFeaturesSel: deviceFeaturesSel_ = value; return;
    case kDriverFeaturesSel: driverFeaturesSel_ = value; return;
    case kDriverFeatures:
      // Features are fixed once FEATURES_OK is set; selectors past 1 name no features.
      if (status_ & kFeaturesOk) return;
      if (driverFeaturesSel_ == 0) driverFeatures_ = setLow(driverFeatures_, value);
      if (driverFeaturesSel_ == 1) driverFeatures_ = setHigh(driverFeatures_, value);
      return;
    case kQueueSel: queueSel_ = value; return;
    case kStatus: writeStatus(value); return;
    default: break;
  }
  // Queue registers: ignored for a queue that does not exist, and (inside Queue) while it is ready.
  if (q == nullptr) return;
  switch (offset) {
    case kQueueNum:
      // A size that is not a power of two or exceeds QueueNumMax is refused when QueueReady is set.
      q->setSize(value > 0xffff ? 0 : static_cast<uint16_t>(value));
      return;
    case kQueueDescLow: q->setDescTable(setLow(q->descTable(), value)); return;
    case kQueueDescHigh: q->setDescTable(setHigh(q->descTable(), value)); return;
    case kQueueDriverLow: q->setAvailRing(setLow(q->availRing(), value)); return;
    case kQueueDriverHigh: q->setAvailRing(setHigh(q->availRing(), value)); return;
    case kQueueDeviceLow: q->setUsedRing(setLow(q->usedRing(), value)); return;
    case kQueueDeviceHigh: q->setUsedRing(setHigh(q->usedRing(), value)); return;
    case kQueueReady:
      if (value == 0) {
        q->reset();  // Linux writes 0 when it deletes a queue and reads back 0
      } else if (!(status_ & kFeaturesOk)) {
        fail("queue " + std::to_string(queueSel_) + " made ready before FEATURES_OK");
      } else {
        std::string why;
        if (!q->activate(memory_, driverFeatures_, why)) fail("queue " + std::to_string(queueSel_) + ": " + why);
      }
      return;
    default: return;
  }
}

void Mmio::writeStatus(uint32_t value) {
  if (value == 0) {
    reset();
    return;
  }
  // Bits are only ever added (§2.1.2: the driver never clears one but by reset).
  uint32_t added = value & ~status_;
  if (added & kFeaturesOk) {
    uint64_t offered = device_.features();
    // Without VERSION_1 this would be a legacy driver, which a version-2 device does not serve.
    if ((driverFeatures_ & ~offered) != 0 || !(driverFeatures_ & kFVersion1)) added &= ~kFeaturesOk;
  }
  status_ |= added & (kAcknowledge | kDriver | kDriverOk | kFeaturesOk | kFailed);
  if ((added & kDriverOk) && !active_ && !needsReset_) {
    if (!(status_ & kFeaturesOk)) {
      fail("DRIVER_OK without FEATURES_OK");
      return;
    }
    active_ = true;
    device_.activate(memory_, queues_, driverFeatures_, *this);
  }
}

void Mmio::reset() {
  if (active_) device_.reset();
  active_ = false;
  for (auto& q : queues_) q.reset();
  status_ = 0;
  needsReset_ = false;
  driverFeatures_ = 0;
  deviceFeaturesSel_ = driverFeaturesSel_ = queueSel_ = 0;
  std::lock_guard<std::mutex> irqLock(irqMu_);
  if (interruptStatus_ != 0) {
    interruptStatus_ = 0;
    if (interrupt_) interrupt_(false);
  }
}

Queue* Mmio::selectedQueue() { return queueSel_ < queues_.size() ? &queues_[queueSel_] : nullptr; }

bool Mmio::processQueue(uint16_t queue) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!active_ || needsReset_ || queue >= queues_.size() || !queues_[queue].ready()) return false;
  bool more = device_.process(queue);
  // A device reports a broken chain itself; this catches one that did not.
  if (queues_[queue].failed() && !needsReset_) fail(queues_[queue].failure());
  return more && !needsReset_;
}

bool Mmio::withDevice(const std::function<void()>& fn) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!active_ || needsReset_) return false;
  fn();
  return true;
}

// Every cause signals, also when InterruptStatus was already non-zero. Signalling only on
// 0 -> non-zero assumes every edge is delivered: one that is lost (suspected once on KVM on PVM,
// not reproduced since, docs/backends.md) or that a handler misses leaves InterruptStatus set;
// every later cause then finds it set and stays silent, and the whole device is mute until the
// driver reads the register on its own, which Linux never does. Signalling each time, the next cause on any of the device's queues
// re-sends the edge, and Linux's handler looks at every queue. (Firecracker's IrqTrigger and
// cloud-hypervisor's mmio transport also write their irqfd on every trigger.) Not covered: a lost
// edge after which the device has no new cause at all (with EVENT_IDX the same queue stays quiet
// until the driver catches up) waits for one; only the machine can do more (a level-triggered
// line with a resampling irqfd, or re-signalling a line whose status stays set; docs/backends.md).
//
// What the extra edges cost the driver. A Linux vm_interrupt that finds InterruptStatus == 0 (or
// only a used-buffer bit for rings it already emptied) returns IRQ_NONE; note_interrupt() disables
// the line ("nobody cared") only when 99,900 of 100,000 interrupts on it went unhandled, an
// unhandled one more than 100 ms after the previous resetting the count. That cannot come from
// here: an edge is sent only while a bit is set that no handler has acknowledged yet (just after
// a cause, or after an ACK that left it), and the first handler to run after that reads the bit
// and acknowledges it; that run is handled (a used-buffer bit whose entries the
// driver already took by polling makes it unhandled, exactly as it did with one edge per
// 0 -> non-zero; that case is the driver's, not added here). Edges sent while the
// vector is pending or in service collapse into one more delivery (the local APIC keeps one
// pending bit per vector), which may find nothing. Every unhandled run thus follows a handled one:
// at most about half are unhandled, far from 99.9%. With EVENT_IDX (every skiff device offers it,
// Linux takes it) a cause is raised only when the driver asked to hear about the used index, so
// extra edges are rare: a cause while the previous one is not yet acknowledged.
// Each slot has its own line, so no other device's handler shares these runs.
void Mmio::raise(uint32_t bits) {
  std::lock_guard<std::mutex> irqLock(irqMu_);
  interruptStatus_ |= bits;
  if (interrupt_) interrupt_(true);
}

void Mmio::usedBuffers(uint16_t) { raise(kInterruptUsedBuffer); }

void Mmio::configChanged() {
  ++configGeneration_;
  if (status_ & kDriverOk) raise(kInterruptConfigChange);
}

void Mmio::fail(const std::string& why) {
  if (needsReset_) return;
  needsReset_ = true;
  if (failures_++ == 0 && log_) log_(std::string(typeName(device_.type())) + ": device failed (the driver must reset it): " + why);
  // §2.1.2: DEVICE_NEEDS_RESET is announced with a configuration change notification.
  if (status_ & kDriverOk) raise(kInterruptConfigChange);
}

uint32_t Mmio::status() {
  std::lock_guard<std::mutex> lock(mu_);
  return status_ | (needsReset_ ? kDeviceNeedsReset : 0);
}

uint32_t Mmio::interruptStatus() {
  std::lock_guard<std::mutex> irqLock(irqMu_);
  return interruptStatus_;
}

bool Mmio::failed() {
  std::lock_guard<std::mutex> lock(mu_);
  return needsReset_;
}

}  // namespace virtio
}  // namespace skiff
