// The driver side of a split virtqueue over fake guest memory, for tests and fuzzers: it lays out
// and fills descriptor tables, available rings and indirect tables the way Linux's virtio_ring does
// (free-list descriptor allocation, write barrier before the avail idx, event-idx fields), and can
// also poke any raw value a hostile driver might.
#pragma once
#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <vector>

#include "devices/virtio/memory.h"

namespace skiff {
namespace virtio {
namespace testing {

// Page-aligned anonymous mappings placed at chosen guest-physical addresses.
class FakeMemory {
 public:
  FakeMemory(std::initializer_list<std::pair<uint64_t, uint64_t>> regions) {
    for (auto [gpa, size] : regions) {
      // NORESERVE: large fake regions cost nothing until a test touches them.
      void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) std::abort();
      mappings_.push_back({gpa, size, static_cast<uint8_t*>(p)});
      if (!map.add(mappings_.back())) std::abort();
    }
  }
  ~FakeMemory() {
    for (auto& m : mappings_) munmap(m.host, m.size);
  }
  FakeMemory(const FakeMemory&) = delete;
  FakeMemory& operator=(const FakeMemory&) = delete;

  // Host address of a guest address the test knows to be mapped.
  uint8_t* at(uint64_t gpa, uint64_t len = 1) const {
    uint8_t* p = map.translate(gpa, len);
    if (p == nullptr) std::abort();
    return p;
  }
  template <typename T>
  T get(uint64_t gpa) const {
    T v;
    std::memcpy(&v, at(gpa, sizeof v), sizeof v);
    return v;
  }
  template <typename T>
  void set(uint64_t gpa, T v) const {
    std::memcpy(at(gpa, sizeof v), &v, sizeof v);
  }

  MemoryMap map;

 private:
  std::vector<MemoryRegion> mappings_;
};

struct DriverBuffer {
  uint64_t gpa;
  uint32_t len;
  bool writable;
};

class Driver {
 public:
  static constexpr uint16_t kNext = 1, kWrite = 2, kIndirect = 4;

  // Rings at `base` (page-aligned): descriptors, then the avail ring, then the used ring on the next
  // 4 KiB boundary; indirect tables are allocated from `scratch` upwards.
  Driver(const FakeMemory& memory, uint16_t size, uint64_t base, uint64_t scratch, bool eventIdx)
      : mem_(memory), size_(size), eventIdx_(eventIdx), scratch_(scratch) {
    desc = base;
    avail = desc + 16ull * size;
    used = (avail + 6 + 2ull * size + 4095) & ~4095ull;
    std::memset(mem_.at(desc, 16ull * size), 0, 16ull * size);
    std::memset(mem_.at(avail, 6 + 2ull * size), 0, 6 + 2ull * size);
    std::memset(mem_.at(used, 6 + 8ull * size), 0, 6 + 8ull * size);
    for (uint16_t i = 0; i < size; ++i) free_.push_back(static_cast<uint16_t>(size - 1 - i));
  }

  uint64_t desc, avail, used;

  void setDesc(uint64_t table, uint32_t index, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next) const {
    uint64_t at = table + 16ull * index;
    mem_.set<uint64_t>(at, addr);
    mem_.set<uint32_t>(at + 8, len);
    mem_.set<uint16_t>(at + 12, flags);
    mem_.set<uint16_t>(at + 14, next);
  }

  // Adds a chain like virtqueue_add_split: readable buffers first, then writable ones; with
  // `indirect`, one descriptor pointing at a table holding them all. Returns the head, or -1 when
  // no descriptors are free.
  int add(const std::vector<DriverBuffer>& bufs, bool indirect = false) {
    if (indirect) {
      uint64_t table = scratch_;
      scratch_ += (16ull * bufs.size() + 15) & ~15ull;
      for (size_t i = 0; i < bufs.size(); ++i) {
        uint16_t flags = (bufs[i].writable ? kWrite : 0) | (i + 1 < bufs.size() ? kNext : 0);
        setDesc(table, static_cast<uint32_t>(i), bufs[i].gpa, bufs[i].len, flags, static_cast<uint16_t>(i + 1));
      }
      if (free_.empty()) return -1;
      uint16_t head = take();
      setDesc(desc, head, table, static_cast<uint32_t>(16 * bufs.size()), kIndirect, 0);
      chains_[head] = {head};
      pushAvail(head);
      return head;
    }
    if (free_.size() < bufs.size() || bufs.empty()) return -1;
    std::vector<uint16_t> ids;
    for (size_t i = 0; i < bufs.size(); ++i) ids.push_back(take());
    for (size_t i = 0; i < bufs.size(); ++i) {
      uint16_t flags = (bufs[i].writable ? kWrite : 0) | (i + 1 < bufs.size() ? kNext : 0);
      setDesc(desc, ids[i], bufs[i].gpa, bufs[i].len, flags, i + 1 < bufs.size() ? ids[i + 1] : 0);
    }
    chains_[ids[0]] = ids;
    pushAvail(ids[0]);
    return ids[0];
  }

  // Puts `head` in the next avail slot without publishing it.
  void pushAvail(uint16_t head) {
    mem_.set<uint16_t>(avail + 4 + 2ull * (availIdx_ % size_), head);
    ++availIdx_;
    ++added_;
  }

  // virtqueue_kick_prepare + the idx store: publish, then decide whether the device wants a kick.
  bool publish() {
    uint16_t old = static_cast<uint16_t>(availIdx_ - added_);
    std::atomic_thread_fence(std::memory_order_release);
    mem_.set<uint16_t>(avail + 2, availIdx_);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    added_ = 0;
    if (eventIdx_) {
      uint16_t event = mem_.get<uint16_t>(used + 4 + 8ull * size_);
      return static_cast<uint16_t>(availIdx_ - event - 1) < static_cast<uint16_t>(availIdx_ - old);
    }
    return !(mem_.get<uint16_t>(used) & 1);
  }
  // A raw avail idx, for hostile tests.
  void setAvailIdx(uint16_t idx) {
    availIdx_ = idx;
    mem_.set<uint16_t>(avail + 2, idx);
  }

  // virtqueue_get_buf: the next used element, if any; frees its descriptors.
  bool getUsed(uint32_t& id, uint32_t& len) {
    // virtqueue_poll's mb: a used_event stored by the previous call must be visible before the used
    // idx is read, or the device may skip the interrupt while this misses its entry.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    uint16_t usedIdx = mem_.get<uint16_t>(used + 2);
    if (usedIdx == lastUsed_) return false;
    std::atomic_thread_fence(std::memory_order_acquire);
    uint64_t elem = used + 4 + 8ull * (lastUsed_ % size_);
    id = mem_.get<uint32_t>(elem);
    len = mem_.get<uint32_t>(elem + 4);
    ++lastUsed_;
    auto it = chains_.find(static_cast<uint16_t>(id));
    if (it != chains_.end()) {
      for (uint16_t d : it->second) free_.push_back(d);
      chains_.erase(it);
    }
    if (eventIdx_) mem_.set<uint16_t>(avail + 4 + 2ull * size_, lastUsed_);  // used_event: next one
    return true;
  }
  uint16_t lastUsed() const { return lastUsed_; }
  void setUsedEvent(uint16_t v) const { mem_.set<uint16_t>(avail + 4 + 2ull * size_, v); }
  void setAvailFlags(uint16_t v) const { mem_.set<uint16_t>(avail, v); }
  uint16_t availEvent() const { return mem_.get<uint16_t>(used + 4 + 8ull * size_); }
  uint16_t usedFlags() const { return mem_.get<uint16_t>(used); }

 private:
  uint16_t take() {
    uint16_t d = free_.back();
    free_.pop_back();
    return d;
  }

  const FakeMemory& mem_;
  uint16_t size_;
  bool eventIdx_;
  uint64_t scratch_;
  std::vector<uint16_t> free_;
  std::map<uint16_t, std::vector<uint16_t>> chains_;
  uint16_t availIdx_ = 0, added_ = 0, lastUsed_ = 0;
};

}  // namespace testing
}  // namespace virtio
}  // namespace skiff
