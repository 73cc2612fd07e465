#include "devices/virtio/queue.h"

#include <atomic>

#include "devices/virtio/device.h"

namespace skiff {
namespace virtio {
namespace {

// Split ring layout (§2.7): descriptor {le64 addr; le32 len; le16 flags; le16 next},
// avail {le16 flags; le16 idx; le16 ring[size]; le16 used_event},
// used {le16 flags; le16 idx; {le32 id; le32 len} ring[size]; le16 avail_event}.
constexpr uint16_t kDescNext = 1, kDescWrite = 2, kDescIndirect = 4;
constexpr uint16_t kAvailNoInterrupt = 1;
constexpr uint16_t kUsedNoNotify = 1;
constexpr uint64_t kDescSize = 16;

struct Desc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};
static_assert(sizeof(Desc) == kDescSize, "virtq_desc is 16 bytes");

// Ring fields are shared with the guest's vCPUs, which write them concurrently: they are read and
// written with atomic builtins (no torn values, and the compiler cannot re-read a checked value).
// The pointers are 2-byte aligned: activate() checked the ring's guest address and MemoryMap::add
// made host and guest addresses congruent modulo 8.
uint16_t load16(const uint8_t* p, int order = __ATOMIC_RELAXED) {
  return __atomic_load_n(reinterpret_cast<const uint16_t*>(p), order);
}
void store16(uint8_t* p, uint16_t v, int order = __ATOMIC_RELAXED) {
  __atomic_store_n(reinterpret_cast<uint16_t*>(p), v, order);
}

bool isPowerOfTwo(uint32_t n) { return n != 0 && (n & (n - 1)) == 0; }

}  // namespace

template <typename Fn>
bool Cursor::walk(uint64_t len, Fn&& fn) {
  if (len > remaining_) return false;
  size_t index = index_;
  uint32_t offset = offset_;
  uint64_t left = len;
  while (left > 0) {
    // index < buffers_.size(): the bytes left fit in remaining_, which counts only those buffers.
    const Buffer& b = buffers_[index];
    uint64_t n = b.len - offset < left ? b.len - offset : left;
    if (!fn(b.gpa + offset, n, len - left)) return false;
    left -= n;
    offset += static_cast<uint32_t>(n);
    if (offset == b.len) {
      ++index;
      offset = 0;
    }
  }
  index_ = index;
  offset_ = offset;
  remaining_ -= len;
  consumed_ += len;
  return true;
}

bool Cursor::read(void* dst, uint64_t len) {
  auto* out = static_cast<uint8_t*>(dst);
  return walk(len, [&](uint64_t gpa, uint64_t n, uint64_t done) { return memory_.read(gpa, out + done, n); });
}

bool Cursor::write(const void* src, uint64_t len) {
  const auto* in = static_cast<const uint8_t*>(src);
  return walk(len, [&](uint64_t gpa, uint64_t n, uint64_t done) { return memory_.write(gpa, in + done, n); });
}

bool Cursor::skip(uint64_t len) {
  return walk(len, [&](uint64_t gpa, uint64_t n, uint64_t) { return memory_.contains(gpa, n); });
}

bool Cursor::spans(uint64_t len, std::vector<iovec>& out, size_t maxSpans) {
  size_t start = out.size();
  bool ok = walk(len, [&](uint64_t gpa, uint64_t n, uint64_t) {
    size_t used = out.size() - start;
    return used < maxSpans && memory_.spans(gpa, n, out, maxSpans - used);
  });
  if (!ok) out.resize(start);
  return ok;
}

Queue::Queue(uint16_t maxSize) : maxSize_(isPowerOfTwo(maxSize) && maxSize <= kMaxSize ? maxSize : 256), size_(maxSize_) {}

void Queue::reset() {
  size_ = maxSize_;
  desc_ = avail_ = used_ = 0;
  ready_ = failed_ = false;
  failure_.clear();
  eventIdx_ = indirect_ = false;
  memory_ = nullptr;
  descHost_ = availHost_ = usedHost_ = nullptr;
  nextAvail_ = nextUsed_ = signalledUsed_ = 0;
}

bool Queue::fail(const std::string& why) {
  if (!failed_) {
    failed_ = true;
    failure_ = why;
  }
  return false;
}

bool Queue::activate(const MemoryMap& memory, uint64_t features, std::string& why) {
  if (ready_) return true;
  if (!isPowerOfTwo(size_) || size_ > maxSize_) {
    why = "queue size " + std::to_string(size_) + " is not a power of two up to " + std::to_string(maxSize_);
    return false;
  }
  // Alignments and sizes are §2.7's; the 2-byte trailer of each ring is event-idx's field, which
  // Linux allocates whether or not the feature is negotiated.
  if (desc_ % 16 || avail_ % 2 || used_ % 4) {
    why = "misaligned ring address";
    return false;
  }
  descHost_ = memory.translate(desc_, kDescSize * size_);
  availHost_ = memory.translate(avail_, 6 + 2ull * size_);
  usedHost_ = memory.translate(used_, 6 + 8ull * size_);
  if (!descHost_ || !availHost_ || !usedHost_) {
    descHost_ = availHost_ = usedHost_ = nullptr;
    why = "ring outside guest memory";
    return false;
  }
  memory_ = &memory;
  eventIdx_ = features & kFEventIdx;
  indirect_ = features & kFIndirectDesc;
  nextUsed_ = signalledUsed_ = load16(usedHost_ + 2);
  failed_ = false;
  failure_.clear();
  ready_ = true;
  ++generation_;
  return true;
}

uint16_t Queue::loadAvailIdx() const {
  // Acquire: the ring entries and descriptors the driver wrote before publishing idx are read
  // after it (the driver's side is a write barrier before its idx store).
  return load16(availHost_ + 2, __ATOMIC_ACQUIRE);
}

bool Queue::pop(Chain& chain) {
  if (!ready_ || failed_) return false;
  uint16_t pending = static_cast<uint16_t>(loadAvailIdx() - nextAvail_);
  if (pending == 0) return false;
  if (pending > size_) return fail("available index ran " + std::to_string(pending) + " entries ahead of a queue of " + std::to_string(size_));
  uint16_t head = load16(availHost_ + 4 + 2u * (nextAvail_ % size_));
  ++nextAvail_;
  return walk(head, chain);
}

bool Queue::addBuffer(Chain& chain, uint64_t gpa, uint32_t len, bool writable) {
  if (!writable && !chain.writable.empty()) return fail("device-readable descriptor after a device-writable one");
  if (len == 0) return true;
  if (!memory_->contains(gpa, len)) return fail("descriptor buffer outside guest memory");
  uint32_t& total = writable ? chain.writableBytes : chain.readableBytes;
  if (len > UINT32_MAX - total) return fail("descriptor chain longer than 4 GiB");
  total += len;
  (writable ? chain.writable : chain.readable).push_back({gpa, len});
  return true;
}

// Walks the chain from `head`. Termination: within one table a chain visits at most that table's
// size of descriptors before it must have repeated one, so both tables are bounded by their size
// and a loop is reported rather than followed.
bool Queue::walk(uint16_t head, Chain& chain) {
  chain.head = head;
  chain.readable.clear();
  chain.writable.clear();
  chain.readableBytes = chain.writableBytes = 0;
  if (head >= size_) return fail("available ring names descriptor " + std::to_string(head) + " of a queue of " + std::to_string(size_));

  const uint8_t* table = descHost_;
  uint32_t tableSize = size_;
  bool inIndirect = false;
  uint32_t index = head;
  uint32_t visited = 0;
  for (;;) {
    if (++visited > tableSize) return fail(inIndirect ? "indirect descriptor chain loops" : "descriptor chain loops or exceeds the queue size");
    Desc d;
    // One copy: every check below is made on this snapshot, never on guest memory again.
    // index < tableSize and the table was translated for tableSize entries.
    std::memcpy(&d, table + kDescSize * index, sizeof d);
    if (d.flags & kDescIndirect) {
      if (!indirect_) return fail("indirect descriptor without VIRTIO_F_INDIRECT_DESC");
      if (inIndirect) return fail("indirect descriptor inside an indirect table");
      if (d.flags & kDescNext) return fail("indirect descriptor with NEXT set");
      if (d.len == 0 || d.len % kDescSize != 0) return fail("indirect table length " + std::to_string(d.len) + " is not a non-zero multiple of 16");
      if (d.len / kDescSize > kMaxIndirect) return fail("indirect table of " + std::to_string(d.len / kDescSize) + " descriptors exceeds " + std::to_string(kMaxIndirect));
      table = memory_->translate(d.addr, d.len);
      if (table == nullptr) return fail("indirect table outside guest memory");
      tableSize = d.len / kDescSize;
      inIndirect = true;
      index = 0;
      visited = 0;
      continue;
    }
    if (!addBuffer(chain, d.addr, d.len, d.flags & kDescWrite)) return false;
    if (!(d.flags & kDescNext)) return true;
    if (d.next >= tableSize) return fail("descriptor next index " + std::to_string(d.next) + " out of a table of " + std::to_string(tableSize));
    index = d.next;
  }
}

void Queue::push(uint16_t head, uint32_t len) {
  if (!ready_ || failed_) return;
  uint8_t* elem = usedHost_ + 4 + 8u * (nextUsed_ % size_);
  uint32_t fields[2] = {head, len};
  std::memcpy(elem, fields, sizeof fields);
  ++nextUsed_;
  // Release: the element (and the buffer contents written before push) are visible before idx.
  store16(usedHost_ + 2, nextUsed_, __ATOMIC_RELEASE);
}

bool Queue::needsNotification() {
  if (!ready_) return false;
  // Full fence: our used idx store must be visible before we read the driver's used_event or
  // flags, or the driver may read an old idx after we read an old used_event: a lost interrupt.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  uint16_t oldUsed = signalledUsed_;
  uint16_t newUsed = nextUsed_;
  signalledUsed_ = newUsed;
  if (eventIdx_) {
    uint16_t usedEvent = load16(availHost_ + 4 + 2u * size_);
    // vring_need_event: notify when used_event lies in [oldUsed, newUsed), modulo 2^16.
    return static_cast<uint16_t>(newUsed - usedEvent - 1) < static_cast<uint16_t>(newUsed - oldUsed);
  }
  return newUsed != oldUsed && !(load16(availHost_) & kAvailNoInterrupt);
}

void Queue::disableNotification() {
  if (!ready_ || eventIdx_) return;  // with event idx, a stale avail_event already suppresses kicks
  store16(usedHost_, kUsedNoNotify);
}

bool Queue::enableNotification() {
  if (!ready_ || failed_) return false;
  if (eventIdx_) {
    store16(usedHost_ + 4 + 8u * size_, nextAvail_);  // avail_event: kick when this entry is published
  } else {
    store16(usedHost_, 0);
  }
  // Full fence: the store above must be visible before we look at avail idx again, or a driver that
  // published meanwhile and read our old value would not kick, and we would not see its entry.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return loadAvailIdx() != nextAvail_;
}

}  // namespace virtio
}  // namespace skiff
