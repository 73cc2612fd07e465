// A split virtqueue (virtio 1.2 §2.7), device side: the driver's descriptor table, available ring
// and used ring at guest addresses, walked with every index, address, length and flag checked
// before use. A driver that breaks a rule fails the queue (failed(), failure()); it is never
// trusted further, never overrun, never looped on.
#pragma once
#include <sys/uio.h>

#include <cstdint>
#include <string>
#include <vector>

#include "devices/virtio/memory.h"

namespace skiff {
namespace virtio {

// One guest buffer of a chain; [gpa, gpa+len) lies in guest memory (checked by the walk).
struct Buffer {
  uint64_t gpa;
  uint32_t len;
};

// A descriptor chain the driver made available, walked and checked: the device-readable buffers
// come first, then the device-writable ones (the walk enforces that order), zero-length
// descriptors are dropped, and each part's total fits in 32 bits (a used-ring length).
struct Chain {
  uint16_t head = 0;
  std::vector<Buffer> readable;
  std::vector<Buffer> writable;
  uint32_t readableBytes = 0;
  uint32_t writableBytes = 0;
};

// Sequential reading or writing through one part of a chain (its readable or writable buffers).
// Every access re-translates through the MemoryMap, so a cursor stays safe even if used after the
// chain's buffers were checked against another map.
class Cursor {
 public:
  Cursor(const MemoryMap& memory, const std::vector<Buffer>& buffers) : memory_(memory), buffers_(buffers) {
    for (const auto& b : buffers) remaining_ += b.len;
  }
  uint64_t remaining() const { return remaining_; }
  uint64_t consumed() const { return consumed_; }
  // False, consuming nothing, when fewer than `len` bytes remain or memory refuses.
  bool read(void* dst, uint64_t len);
  bool write(const void* src, uint64_t len);
  bool skip(uint64_t len);
  // Host spans for the next `len` bytes, consumed; for readv/writev straight into guest memory.
  // False (out restored) when fewer remain, or more than maxSpans spans would be needed.
  bool spans(uint64_t len, std::vector<iovec>& out, size_t maxSpans);

 private:
  template <typename Fn>
  bool walk(uint64_t len, Fn&& fn);

  const MemoryMap& memory_;
  const std::vector<Buffer>& buffers_;
  size_t index_ = 0;      // current buffer
  uint32_t offset_ = 0;   // bytes consumed of it
  uint64_t remaining_ = 0;
  uint64_t consumed_ = 0;
};

class Queue {
 public:
  // Split rings cap the size at 32768 (§2.7); maxSize must be a power of two no larger.
  static constexpr uint16_t kMaxSize = 32768;
  // Linux may make an indirect table longer than the queue (it checks only direct chains), so
  // indirect tables are bounded separately, at QEMU's limit.
  static constexpr uint32_t kMaxIndirect = 1024;

  explicit Queue(uint16_t maxSize = 256);

  // The driver's configuration, as the transport receives it; changes only while !ready().
  uint16_t maxSize() const { return maxSize_; }
  uint16_t size() const { return size_; }
  uint64_t descTable() const { return desc_; }
  uint64_t availRing() const { return avail_; }
  uint64_t usedRing() const { return used_; }
  void setSize(uint16_t size) { if (!ready_) size_ = size; }
  void setDescTable(uint64_t gpa) { if (!ready_) desc_ = gpa; }
  void setAvailRing(uint64_t gpa) { if (!ready_) avail_ = gpa; }
  void setUsedRing(uint64_t gpa) { if (!ready_) used_ = gpa; }
  // vhost-user's SET_VRING_BASE / GET_VRING_BASE: the next available index to process.
  void setNextAvail(uint16_t index) { if (!ready_) nextAvail_ = index; }
  uint16_t nextAvail() const { return nextAvail_; }
  uint16_t nextUsed() const { return nextUsed_; }

  // Checks the configuration (size a power of two <= maxSize, ring alignment, every ring inside
  // one region of guest memory) and makes the queue ready. False with `why` set when it fails;
  // the queue then stays not ready. `features` are the negotiated ones (EVENT_IDX, INDIRECT_DESC).
  // The used index continues from what the used ring holds (0 for a new queue).
  bool activate(const MemoryMap& memory, uint64_t features, std::string& why);
  bool ready() const { return ready_; }
  // Back to the state after construction (size = maxSize, addresses 0, not ready, not failed).
  void reset();

  // The next chain the driver made available, walked and checked, into `chain`. False when none
  // is available, the queue is not ready, or the driver broke a rule: then failed() is true.
  bool pop(Chain& chain);
  // Returns a chain to the driver with `len` bytes written into its writable buffers.
  void push(uint16_t head, uint32_t len);
  // After one or more push(): whether the driver asked to be told (VIRTIO_F_EVENT_IDX's
  // used_event, else the avail ring's NO_INTERRUPT flag). Call once per batch; it remembers.
  bool needsNotification();
  // Kick suppression while the device drains the queue, and its end: enableNotification returns
  // true when more chains arrived meanwhile (process again, or a kick may be lost).
  void disableNotification();
  bool enableNotification();

  bool failed() const { return failed_; }
  const std::string& failure() const { return failure_; }
  // Changes on every activate(): a device holding a popped chain across calls can tell that the
  // queue was reset and set up again under it (its head would name a stale descriptor).
  uint32_t generation() const { return generation_; }

 private:
  bool fail(const std::string& why);
  bool walk(uint16_t head, Chain& chain);
  bool addBuffer(Chain& chain, uint64_t gpa, uint32_t len, bool writable);
  uint16_t loadAvailIdx() const;

  const uint16_t maxSize_;
  uint16_t size_;
  uint64_t desc_ = 0, avail_ = 0, used_ = 0;
  bool ready_ = false;
  bool failed_ = false;
  std::string failure_;
  bool eventIdx_ = false;
  bool indirect_ = false;
  const MemoryMap* memory_ = nullptr;
  // Host views of the rings, translated once by activate() (each lies inside one region).
  uint8_t* descHost_ = nullptr;
  uint8_t* availHost_ = nullptr;
  uint8_t* usedHost_ = nullptr;
  uint16_t nextAvail_ = 0;
  uint16_t nextUsed_ = 0;
  uint16_t signalledUsed_ = 0;  // nextUsed_ when needsNotification() last ran
  uint32_t generation_ = 0;
};

}  // namespace virtio
}  // namespace skiff
