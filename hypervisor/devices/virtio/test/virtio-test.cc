// Tests of the virtio device core against fake guest memory, with this program playing the driver
// (test/driver.h). Built with ASan and UBSan by test/virtio-core.test.ts:
//   g++ -std=c++17 -fsanitize=address,undefined -DSKIFF_SLIRP -Ihypervisor hypervisor/devices/virtio/*.cc
//       hypervisor/loop/epoll.cc hypervisor/devices/virtio/test/virtio-test.cc -lslirp -o virtio-test
//   ./virtio-test [scratch-dir]
// (Without -DSKIFF_SLIRP, -lslirp and epoll.cc the libslirp tests are left out.)
// Ends with "N passed, N failed"; exits non-zero on any failure.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "devices/virtio/blk.h"
#include "devices/virtio/mmio.h"
#include "devices/virtio/net.h"
#include "devices/virtio/queue.h"
#include "devices/virtio/rng.h"
#include "devices/virtio/slirp_backend.h"
#include "devices/virtio/vsock.h"
#include "devices/virtio/vsock_unix.h"
#include "devices/virtio/test/driver.h"
#include "devices/virtio/test/harness.h"
#include "devices/virtio/test/registers.h"

using namespace skiff::virtio;
using namespace skiff::virtio::testing;

namespace {

std::string scratchDir = "/tmp";

constexpr uint64_t kRam = 0x100000;  // fake RAM at 1 MiB, 4 MiB long
constexpr uint64_t kRamSize = 4 << 20;
constexpr uint64_t kRings = kRam;
constexpr uint64_t kScratch = kRam + 0x100000;  // indirect tables
constexpr uint64_t kData = kRam + 0x200000;     // buffers

// A queue activated over `mem` with the driver's ring addresses.
bool activate(Queue& q, const FakeMemory& mem, const Driver& d, uint16_t size, uint64_t features) {
  q.setSize(size);
  q.setDescTable(d.desc);
  q.setAvailRing(d.avail);
  q.setUsedRing(d.used);
  std::string why;
  return q.activate(mem.map, features, why);
}

constexpr uint64_t kAll = kFVersion1 | kFEventIdx | kFIndirectDesc;

// ---- memory map ---------------------------------------------------------------------------------

TEST(memory_map_bounds) {
  alignas(8) static uint8_t a[4096], b[4096];
  MemoryMap m;
  CHECK(m.add({0x1000, 4096, a}));
  CHECK(m.add({0x2000, 4096, b}));  // adjacent
  CHECK(!m.add({0x2800, 16, a}));   // overlaps
  CHECK(!m.add({0x0, 0, a}));       // empty
  CHECK(!m.add({UINT64_MAX - 4095, 4096, a}));  // reaches the top: gpa + size would wrap
  CHECK(!m.add({0x9001, 16, a}));   // host not congruent with gpa modulo 8
  CHECK(m.translate(0x1000, 4096) == a);
  CHECK(m.translate(0x1ff0, 16) == a + 0xff0);
  CHECK(m.translate(0x1ff0, 17) == nullptr);  // crosses into the next region: not one span
  CHECK(m.translate(0x2000, 0) != nullptr && m.translate(0x2001, 0) == b + 1);
  CHECK(m.translate(0xfff, 1) == nullptr);
  CHECK(m.translate(0x1000, UINT64_MAX) == nullptr);
  CHECK(m.translate(UINT64_MAX, 2) == nullptr);
  CHECK(m.contains(0x1ff0, 32));
  CHECK(!m.contains(0x1ff0, 0x2000));
  std::vector<iovec> iov;
  CHECK(m.spans(0x1ff8, 16, iov) && iov.size() == 2 && iov[0].iov_len == 8 && iov[1].iov_base == b);
  iov.clear();
  CHECK(!m.spans(0x1ff8, 0x3000, iov) && iov.empty());
  CHECK(!m.spans(0x1ff8, 16, iov, 1) && iov.empty());
  uint8_t buf[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}, back[16] = {};
  CHECK(m.write(0x1ff8, buf, 16) && m.read(0x1ff8, back, 16) && std::memcmp(buf, back, 16) == 0);
  CHECK(b[0] == 9);
  CHECK(!m.write(0x2ff8, buf, 16));
}

// ---- queue: configuration -----------------------------------------------------------------------

TEST(queue_activation_checks) {
  FakeMemory mem{{kRam, kRamSize}};
  Driver d(mem, 256, kRings, kScratch, true);
  std::string why;
  for (uint16_t bad : {0, 3, 100, 512}) {
    Queue q(256);
    q.setSize(bad);
    q.setDescTable(d.desc), q.setAvailRing(d.avail), q.setUsedRing(d.used);
    CHECK(!q.activate(mem.map, kAll, why) && !q.ready());
  }
  {
    Queue q(256);
    q.setDescTable(d.desc + 8), q.setAvailRing(d.avail), q.setUsedRing(d.used);
    CHECK(!q.activate(mem.map, kAll, why));
    q.setDescTable(d.desc), q.setAvailRing(d.avail + 1);
    CHECK(!q.activate(mem.map, kAll, why));
    q.setAvailRing(d.avail), q.setUsedRing(d.used + 2);
    CHECK(!q.activate(mem.map, kAll, why));
    q.setUsedRing(kRam + kRamSize - 16);  // runs past the end of memory
    CHECK(!q.activate(mem.map, kAll, why));
    q.setUsedRing(UINT64_MAX - 3);
    CHECK(!q.activate(mem.map, kAll, why));
    q.setUsedRing(d.used);
    CHECK(q.activate(mem.map, kAll, why) && q.ready());
    q.setSize(8);  // ignored while ready
    CHECK(q.size() == 256);
  }
  Queue odd(100);  // a non-power-of-two maximum falls back to 256
  CHECK(odd.maxSize() == 256);
}

// ---- queue: well-formed chains ------------------------------------------------------------------

TEST(queue_walks_linux_like_chains) {
  FakeMemory mem{{kRam, kRamSize}};
  Driver d(mem, 16, kRings, kScratch, true);
  Queue q(16);
  CHECK(activate(q, mem, d, 16, kAll));
  Chain c;
  CHECK(!q.pop(c) && !q.failed());  // nothing yet

  int h1 = d.add({{kData, 16, false}, {kData + 512, 512, false}, {kData + 4096, 1, true}});
  int h2 = d.add({{kData + 8192, 16, false}, {kData + 9000, 4096, true}, {kData + 20000, 1, true}}, true);
  CHECK(d.publish());  // first kick: avail_event starts at 0
  CHECK(q.pop(c) && c.head == h1 && c.readable.size() == 2 && c.writable.size() == 1);
  CHECK(c.readableBytes == 528 && c.writableBytes == 1);
  CHECK(q.pop(c) && c.head == h2 && c.readable.size() == 1 && c.writable.size() == 2 && c.writableBytes == 4097);
  CHECK(!q.pop(c) && !q.failed());

  // Zero or more direct descriptors followed by an indirect one (§2.7.5.3.2).
  uint64_t table = kScratch + 0x8000;
  d.setDesc(table, 0, kData + 100, 10, Driver::kWrite, 0);
  d.setDesc(d.desc, 10, kData, 16, Driver::kNext, 11);
  d.setDesc(d.desc, 11, table, 16, Driver::kIndirect, 0);
  d.pushAvail(10);
  d.publish();
  CHECK(q.pop(c) && c.head == 10 && c.readableBytes == 16 && c.writableBytes == 10);

  // Zero-length descriptors are dropped, not checked against memory.
  d.setDesc(d.desc, 12, 0xdead0000, 0, Driver::kNext, 13);
  d.setDesc(d.desc, 13, kData, 8, 0, 0);
  d.pushAvail(12);
  d.publish();
  CHECK(q.pop(c) && c.readable.size() == 1 && c.readableBytes == 8);
}

TEST(queue_buffer_across_regions) {
  FakeMemory mem{{kRam, kRamSize}, {kRam + kRamSize, 0x10000}};  // contiguous, two mappings
  Driver d(mem, 8, kRings, kScratch, false);
  Queue q(8);
  CHECK(activate(q, mem, d, 8, kAll));
  d.add({{kRam + kRamSize - 8, 16, false}});
  d.publish();
  Chain c;
  CHECK(q.pop(c) && c.readableBytes == 16);
  Cursor cur(mem.map, c.readable);
  std::vector<iovec> iov;
  CHECK(cur.spans(16, iov, 8) && iov.size() == 2);
}

// ---- queue: hostile chains ------------------------------------------------------------------------

// Runs one raw chain at `head` through a fresh queue; returns the failure text ("" if it passed).
std::string walkRaw(const std::function<void(FakeMemory&, Driver&)>& build, uint64_t features = kAll, uint16_t head = 0) {
  FakeMemory mem{{kRam, kRamSize}};
  Driver d(mem, 16, kRings, kScratch, true);
  Queue q(16);
  if (!activate(q, mem, d, 16, features)) return "activate";
  build(mem, d);
  d.pushAvail(head);
  d.publish();
  Chain c;
  bool popped = q.pop(c);
  if (popped == q.failed()) return "pop and failed() disagree";
  // Once failed, the queue stays failed: nothing more is taken from the driver.
  if (q.failed()) {
    d.pushAvail(0);
    d.publish();
    if (q.pop(c)) return "popped after failure";
  }
  return q.failure();
}

TEST(queue_rejects_malformed_chains) {
  using F = std::function<void(FakeMemory&, Driver&)>;
  auto fails = [](const F& f, uint64_t features = kAll, uint16_t head = 0) { return !walkRaw(f, features, head).empty(); };
  // Head index out of range.
  CHECK(fails([](FakeMemory&, Driver&) {}, kAll, 16));
  CHECK(fails([](FakeMemory&, Driver&) {}, kAll, 0xffff));
  // next out of range.
  CHECK(fails([](FakeMemory&, Driver& d) { d.setDesc(d.desc, 0, kData, 16, Driver::kNext, 16); }));
  // Loops: self, two-cycle, and a long cycle that covers the whole table.
  CHECK(fails([](FakeMemory&, Driver& d) { d.setDesc(d.desc, 0, kData, 16, Driver::kNext, 0); }));
  CHECK(fails([](FakeMemory&, Driver& d) {
    d.setDesc(d.desc, 0, kData, 16, Driver::kNext, 1);
    d.setDesc(d.desc, 1, kData, 16, Driver::kNext, 0);
  }));
  CHECK(fails([](FakeMemory&, Driver& d) {
    for (uint16_t i = 0; i < 16; ++i) d.setDesc(d.desc, i, kData, 16, Driver::kNext, static_cast<uint16_t>((i + 1) % 16));
  }));
  // The longest legal direct chain: every descriptor once.
  CHECK(!fails([](FakeMemory&, Driver& d) {
    for (uint16_t i = 0; i < 16; ++i) d.setDesc(d.desc, i, kData, 16, i < 15 ? Driver::kNext : 0, static_cast<uint16_t>(i + 1));
  }));
  // Out of guest memory, and addr + len overflowing 64 bits.
  CHECK(fails([](FakeMemory&, Driver& d) { d.setDesc(d.desc, 0, kRam + kRamSize - 8, 16, 0, 0); }));
  CHECK(fails([](FakeMemory&, Driver& d) { d.setDesc(d.desc, 0, 0x10, 16, 0, 0); }));
  CHECK(fails([](FakeMemory&, Driver& d) { d.setDesc(d.desc, 0, UINT64_MAX - 7, 16, 0, 0); }));
  CHECK(fails([](FakeMemory&, Driver& d) { d.setDesc(d.desc, 0, kData, UINT32_MAX, Driver::kWrite, 0); }));
  // Device-readable after device-writable.
  CHECK(fails([](FakeMemory&, Driver& d) {
    d.setDesc(d.desc, 0, kData, 16, Driver::kWrite | Driver::kNext, 1);
    d.setDesc(d.desc, 1, kData, 16, 0, 0);
  }));
  // Indirect: not negotiated; with NEXT; bad lengths; out of memory; nested; loops; too long.
  auto indirect = [](uint64_t addr, uint32_t len, uint16_t flags = Driver::kIndirect) {
    return [=](FakeMemory&, Driver& d) { d.setDesc(d.desc, 0, addr, len, flags, 1); };
  };
  CHECK(!fails([](FakeMemory&, Driver& d) {
    d.setDesc(kScratch, 0, kData, 16, 0, 0);
    d.setDesc(d.desc, 0, kScratch, 16, Driver::kIndirect, 0);
  }));
  CHECK(fails(indirect(kScratch, 16), kFVersion1));
  CHECK(fails(indirect(kScratch, 16, Driver::kIndirect | Driver::kNext)));
  CHECK(fails(indirect(kScratch, 0)));
  CHECK(fails(indirect(kScratch, 24)));
  CHECK(fails(indirect(kRam + kRamSize - 16, 32)));
  CHECK(fails(indirect(UINT64_MAX - 15, 32)));
  CHECK(fails(indirect(kScratch, 16 * (Queue::kMaxIndirect + 1))));
  CHECK(fails([](FakeMemory&, Driver& d) {
    d.setDesc(kScratch, 0, kScratch + 64, 16, Driver::kIndirect, 0);  // indirect in indirect
    d.setDesc(d.desc, 0, kScratch, 16, Driver::kIndirect, 0);
  }));
  CHECK(fails([](FakeMemory&, Driver& d) {
    d.setDesc(kScratch, 0, kData, 16, Driver::kNext, 1);
    d.setDesc(kScratch, 1, kData, 16, Driver::kNext, 0);
    d.setDesc(d.desc, 0, kScratch, 32, Driver::kIndirect, 0);
  }));
  CHECK(fails([](FakeMemory&, Driver& d) {
    d.setDesc(kScratch, 0, kData, 16, Driver::kNext, 2);  // next past the table's 2 entries
    d.setDesc(d.desc, 0, kScratch, 32, Driver::kIndirect, 0);
  }));
  // An indirect table longer than the queue is fine (Linux makes them) up to kMaxIndirect.
  CHECK(!fails([](FakeMemory&, Driver& d) {
    for (uint32_t i = 0; i < 100; ++i) d.setDesc(kScratch, i, kData, 16, i < 99 ? Driver::kNext : 0, static_cast<uint16_t>(i + 1));
    d.setDesc(d.desc, 0, kScratch, 1600, Driver::kIndirect, 0);
  }));
}

TEST(queue_rejects_chain_over_4gib) {
  // Three 2 GiB buffers over one 2 GiB (untouched, unreserved) region: each is in memory, the sum
  // does not fit a used-ring length.
  FakeMemory mem{{kRam, kRamSize}, {1ull << 32, 1ull << 31}};
  Driver d(mem, 8, kRings, kScratch, false);
  Queue q(8);
  CHECK(activate(q, mem, d, 8, kAll));
  d.add({{1ull << 32, 1u << 31, true}, {1ull << 32, 1u << 31, true}, {1ull << 32, 1u << 31, true}});
  d.publish();
  Chain c;
  CHECK(!q.pop(c) && q.failed());
}

TEST(queue_rejects_avail_index_jump) {
  FakeMemory mem{{kRam, kRamSize}};
  Driver d(mem, 16, kRings, kScratch, false);
  Queue q(16);
  CHECK(activate(q, mem, d, 16, kAll));
  d.setAvailIdx(17);
  Chain c;
  CHECK(!q.pop(c) && q.failed());
  q.reset();
  CHECK(!q.failed() && !q.ready());
}

// ---- queue: used ring and notifications -------------------------------------------------------

TEST(queue_used_ring_and_event_idx) {
  FakeMemory mem{{kRam, kRamSize}};
  Driver d(mem, 8, kRings, kScratch, true);
  Queue q(8);
  CHECK(activate(q, mem, d, 8, kAll));
  Chain c;
  // 300 requests through a queue of 8: indices wrap the ring many times and the u16 once... not
  // quite; start near the wrap to cover it.
  for (int round = 0; round < 40; ++round) {
    for (int i = 0; i < 4; ++i) d.add({{kData, 16, false}, {kData + 64, 8, true}});
    d.publish();
    q.disableNotification();
    int n = 0;
    while (q.pop(c)) {
      q.push(c.head, 8);
      ++n;
    }
    CHECK(n == 4);
    CHECK(!q.enableNotification());
    CHECK(d.availEvent() == q.nextAvail());
    // The driver asked (used_event = its last seen used idx) to hear of the first new one.
    CHECK(q.needsNotification());
    CHECK(!q.needsNotification());  // nothing new since
    uint32_t id, len;
    int got = 0;
    while (d.getUsed(id, len)) {
      CHECK(len == 8);
      ++got;
    }
    CHECK(got == 4);
  }
  // used_event far ahead: the driver does not want an interrupt for these.
  d.add({{kData, 16, false}});
  d.publish();
  CHECK(q.pop(c));
  q.push(c.head, 0);
  d.setUsedEvent(static_cast<uint16_t>(q.nextUsed() + 10));
  CHECK(!q.needsNotification());
  // An entry published after enableNotification's fence is seen by its re-check.
  d.add({{kData, 16, false}});
  d.publish();
  CHECK(q.enableNotification());
}

TEST(queue_event_idx_wraps_u16) {
  FakeMemory mem{{kRam, kRamSize}};
  Driver d(mem, 4, kRings, kScratch, true);
  // Start both sides at 65534 (vhost-user's SET_VRING_BASE, and a used ring left there).
  d.setAvailIdx(65534);
  mem.set<uint16_t>(d.used + 2, 65534);
  Queue q(4);
  q.setNextAvail(65534);
  CHECK(activate(q, mem, d, 4, kAll));
  CHECK(q.nextUsed() == 65534);
  d.setDesc(d.desc, 0, kData, 16, 0, 0);
  for (int i = 0; i < 4; ++i) d.pushAvail(0);
  d.publish();
  Chain c;
  int n = 0;
  while (q.pop(c)) {
    q.push(c.head, 1);
    ++n;
  }
  CHECK(n == 4 && !q.failed() && q.nextAvail() == 2 && q.nextUsed() == 2);
  d.setUsedEvent(65535);  // in [65534, 2) modulo 2^16
  CHECK(q.needsNotification());
}

TEST(queue_no_event_idx_flags) {
  FakeMemory mem{{kRam, kRamSize}};
  Driver d(mem, 8, kRings, kScratch, false);
  Queue q(8);
  CHECK(activate(q, mem, d, 8, kFVersion1));
  d.add({{kData, 16, false}});
  CHECK(d.publish());
  q.disableNotification();
  CHECK(d.usedFlags() == 1);
  d.add({{kData, 16, false}});
  CHECK(!d.publish());  // device asked for no kicks
  Chain c;
  while (q.pop(c)) q.push(c.head, 0);
  CHECK(!q.enableNotification() && d.usedFlags() == 0);
  d.setAvailFlags(1);  // VIRTQ_AVAIL_F_NO_INTERRUPT
  CHECK(!q.needsNotification());
  d.setAvailFlags(0);
  d.add({{kData, 16, false}});
  d.publish();
  CHECK(q.pop(c));
  q.push(c.head, 0);
  CHECK(q.needsNotification());
}

// Found by the mmio fuzz target: the avail ring's idx placed on the used ring's flags, without
// event idx. Kick suppression then rewrites the avail idx (1 on disable, 0 on enable), so
// enableNotification keeps reporting "more" while pop finds nothing: the loop must stay bounded.
TEST(queue_overlapping_rings_do_not_spin) {
  struct Quiet : Guest {
    void usedBuffers(uint16_t) override {}
    void configChanged() override {}
    void fail(const std::string&) override {}
  } guest;
  FakeMemory mem{{kRam, kRamSize}};
  Queue q(4);
  q.setSize(4);
  q.setDescTable(kRam);
  q.setAvailRing(kRam + 0x7e);
  q.setUsedRing(kRam + 0x80);
  std::string why;
  CHECK(q.activate(mem.map, kFVersion1, why));
  int rounds = 0;
  for (; rounds < 100 && drainQueue(q, 0, guest, 64, [](const Chain&, uint32_t&, std::string&) { return true; }); ++rounds) {
  }
  CHECK(rounds < 100);  // every call returns, and the device stops asking to be called again
}

// ---- virtio-mmio --------------------------------------------------------------------------------

struct MmioHarness {
  explicit MmioHarness(Device& dev, uint64_t features = kAll)
      : mem{{kRam, kRamSize}},
        mmio(dev, mem.map, [this](bool level) { levels.push_back(level); }, [this](const std::string& m) { logs.push_back(m); }),
        features(features) {}
  // virtio_mmio's probe and vm_setup_vq, in Linux's order. Returns the final status.
  uint32_t bringUp(uint16_t queueSize = 8) {
    wr(mmio, 0x70, kAcknowledge);
    wr(mmio, 0x70, kAcknowledge | kDriver);
    wr(mmio, 0x24, 0), wr(mmio, 0x20, uint32_t(features));
    wr(mmio, 0x24, 1), wr(mmio, 0x20, uint32_t(features >> 32));
    wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk);
    if (!(rd(mmio, 0x70) & kFeaturesOk)) return rd(mmio, 0x70);
    driver = std::make_unique<Driver>(mem, queueSize, kRings, kScratch, features & kFEventIdx);
    wr(mmio, 0x30, 0);
    if (rd(mmio, 0x44) != 0 || rd(mmio, 0x34) < queueSize) return 0;
    wr(mmio, 0x38, queueSize);
    wr(mmio, 0x80, uint32_t(driver->desc)), wr(mmio, 0x84, uint32_t(driver->desc >> 32));
    wr(mmio, 0x90, uint32_t(driver->avail)), wr(mmio, 0x94, 0);
    wr(mmio, 0xa0, uint32_t(driver->used)), wr(mmio, 0xa4, 0);
    wr(mmio, 0x44, 1);
    wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk | kDriverOk);
    return rd(mmio, 0x70);
  }
  void kick() { wr(mmio, 0x50, 0); }

  FakeMemory mem;
  std::vector<bool> levels;
  std::vector<std::string> logs;
  Mmio mmio;
  uint64_t features;
  std::unique_ptr<Driver> driver;
};

TEST(mmio_identity_and_features) {
  Rng rng;
  MmioHarness h(rng);
  CHECK(rd(h.mmio, 0x00) == 0x74726976);
  CHECK(rd(h.mmio, 0x04) == 2);
  CHECK(rd(h.mmio, 0x08) == kRng);
  CHECK(rd(h.mmio, 0x0c) == Mmio::kVendorId);
  wr(h.mmio, 0x14, 0);
  CHECK(rd(h.mmio, 0x10) == uint32_t(kFEventIdx | kFIndirectDesc));
  wr(h.mmio, 0x14, 1);
  CHECK(rd(h.mmio, 0x10) == 1);  // VERSION_1
  wr(h.mmio, 0x14, 7);
  CHECK(rd(h.mmio, 0x10) == 0);
  wr(h.mmio, 0x30, 5);  // no such queue
  CHECK(rd(h.mmio, 0x34) == 0 && rd(h.mmio, 0x44) == 0);
  wr(h.mmio, 0x38, 8);  // ignored
  wr(h.mmio, 0x30, 0);
  CHECK(rd(h.mmio, 0x34) == Rng::kQueueSize);
  CHECK(rd(h.mmio, 0xb0) == 0xffffffff && rd(h.mmio, 0xbc) == 0xffffffff);  // no shm regions
  // Odd sizes and offsets: zeros and no effect.
  uint8_t b[8] = {1, 1, 1, 1, 1, 1, 1, 1};
  h.mmio.read(0x01, b, 4);
  CHECK(b[0] == 0 && b[3] == 0);
  h.mmio.read(0x00, b, 2);
  CHECK(b[0] == 0);
  h.mmio.read(0x00, b, 0);
  h.mmio.read(0x00, b, 9);
  h.mmio.write(0x70, b, 1);
  CHECK(rd(h.mmio, 0x70) == 0);
  h.mmio.read(UINT64_MAX - 1, b, 8);
  h.mmio.write(UINT64_MAX - 1, b, 8);
  CHECK(rd(h.mmio, 0x100) == 0);  // rng has no config space
}

TEST(mmio_feature_negotiation) {
  Rng rng;
  {
    MmioHarness h(rng, kFEventIdx);  // a legacy driver: no VERSION_1
    CHECK(!(h.bringUp() & kFeaturesOk));
  }
  {
    MmioHarness h(rng, kAll | (1ull << 40));  // a feature never offered
    CHECK(!(h.bringUp() & kFeaturesOk));
  }
  {
    MmioHarness h(rng, kFVersion1);  // the minimum
    CHECK(h.bringUp() == (kAcknowledge | kDriver | kFeaturesOk | kDriverOk));
    // Features are frozen after FEATURES_OK: clearing VERSION_1 now changes nothing.
    wr(h.mmio, 0x24, 1), wr(h.mmio, 0x20, 0);
    wr(h.mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk | kDriverOk);
    CHECK(rd(h.mmio, 0x70) == (kAcknowledge | kDriver | kFeaturesOk | kDriverOk));
  }
}

TEST(mmio_queue_config_hostile) {
  Rng rng;
  for (uint32_t size : {0u, 3u, 128u, 65535u, 0x10000u, 0xffffffffu}) {
    MmioHarness h(rng);
    wr(h.mmio, 0x70, kAcknowledge | kDriver);
    wr(h.mmio, 0x24, 1), wr(h.mmio, 0x20, 1);
    wr(h.mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk);
    wr(h.mmio, 0x38, size);
    wr(h.mmio, 0x80, uint32_t(kRings)), wr(h.mmio, 0x90, uint32_t(kRings + 0x1000)), wr(h.mmio, 0xa0, uint32_t(kRings + 0x2000));
    wr(h.mmio, 0x44, 1);
    CHECK(rd(h.mmio, 0x44) == 0);
    CHECK(rd(h.mmio, 0x70) & kDeviceNeedsReset);
    CHECK(h.logs.size() == 1);
    wr(h.mmio, 0x70, 0);  // reset clears it
    CHECK(rd(h.mmio, 0x70) == 0);
  }
  // Queue ready before FEATURES_OK, and DRIVER_OK without FEATURES_OK.
  MmioHarness h(rng);
  wr(h.mmio, 0x44, 1);
  CHECK(rd(h.mmio, 0x70) & kDeviceNeedsReset);
  wr(h.mmio, 0x70, 0);
  wr(h.mmio, 0x70, kAcknowledge | kDriver | kDriverOk);
  CHECK(rd(h.mmio, 0x70) & kDeviceNeedsReset);
  CHECK(h.logs.size() == 1);  // logged once per device, not once per failure
  // Ring addresses outside memory, via the high halves.
  wr(h.mmio, 0x70, 0);
  CHECK(h.bringUp() & kDriverOk);
  wr(h.mmio, 0x44, 0);  // Linux's del_vq: back to not ready
  CHECK(rd(h.mmio, 0x44) == 0);
  wr(h.mmio, 0x84, 0xffffffff);
  wr(h.mmio, 0x38, 8);
  wr(h.mmio, 0x44, 1);
  CHECK(rd(h.mmio, 0x44) == 0 && (rd(h.mmio, 0x70) & kDeviceNeedsReset));
}

TEST(mmio_rng_end_to_end) {
  Rng rng;
  MmioHarness h(rng);
  CHECK(h.bringUp() & kDriverOk);
  std::memset(h.mem.at(kData, 64), 0, 64);
  h.driver->add({{kData, 64, true}});
  CHECK(h.driver->publish());
  h.kick();
  uint32_t id, len;
  CHECK(h.driver->getUsed(id, len) && len == 64);
  int nonzero = 0;
  for (int i = 0; i < 64; ++i) nonzero += h.mem.at(kData)[i] != 0;
  CHECK(nonzero > 32);
  CHECK(h.levels.size() == 1 && h.levels[0]);
  CHECK(rd(h.mmio, 0x60) == 1);
  wr(h.mmio, 0x64, 1);
  CHECK(rd(h.mmio, 0x60) == 0 && h.levels.size() == 2 && !h.levels[1]);
  // Readable-only chain: answered with nothing. Indirect chain: filled.
  h.driver->add({{kData, 64, false}});
  h.driver->add({{kData + 100, 10, true}, {kData + 200, 20, true}}, true);
  h.driver->publish();
  h.kick();
  CHECK(h.driver->getUsed(id, len) && len == 0);
  CHECK(h.driver->getUsed(id, len) && len == 30);
  // A malformed chain fails the device: NEEDS_RESET, a config interrupt, one log line.
  h.driver->setDesc(h.driver->desc, 0, kData, 16, Driver::kNext | Driver::kWrite, 0);
  h.driver->pushAvail(0);
  h.driver->publish();
  h.kick();
  CHECK(rd(h.mmio, 0x70) & kDeviceNeedsReset);
  CHECK(rd(h.mmio, 0x60) & 2);
  CHECK(h.logs.size() == 1 && h.logs[0].find("virtio-rng") == 0);
  h.kick();  // ignored now
  // Reset and start over.
  wr(h.mmio, 0x70, 0);
  CHECK(rd(h.mmio, 0x60) == 0);
  CHECK(h.bringUp() & kDriverOk);
  h.driver->add({{kData, 8, true}});
  h.driver->publish();
  h.kick();
  CHECK(h.driver->getUsed(id, len) && len == 8);
}

// Driver and device on two threads, kicks and interrupts only through the transport's callbacks,
// as in a VM: any lost kick or lost interrupt (a memory-ordering or suppression bug) shows as a
// stall, caught by a 5 s wait. Run with and without VIRTIO_F_EVENT_IDX.
void stress(uint64_t features) {
  Rng rng;
  FakeMemory mem{{kRam, kRamSize}};
  std::mutex mu;
  std::condition_variable cv;
  uint64_t kicks = 0, irqs = 0;
  bool stop = false;
  auto signal = [&](uint64_t& counter) {
    std::lock_guard<std::mutex> lock(mu);
    ++counter;
    cv.notify_all();
  };
  Mmio mmio(rng, mem.map, [&](bool level) { if (level) signal(irqs); }, [](const std::string&) {}, [&](uint16_t) { signal(kicks); });
  std::thread device([&] {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return kicks != seen || stop; });
        if (stop) return;
        seen = kicks;
      }
      while (mmio.processQueue(0)) {
      }
    }
  });

  constexpr uint16_t kSize = 8;
  wr(mmio, 0x70, kAcknowledge | kDriver);
  wr(mmio, 0x24, 0), wr(mmio, 0x20, uint32_t(features));
  wr(mmio, 0x24, 1), wr(mmio, 0x20, uint32_t(features >> 32));
  wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk);
  Driver d(mem, kSize, kRings, kScratch, features & kFEventIdx);
  wr(mmio, 0x38, kSize);
  wr(mmio, 0x80, uint32_t(d.desc)), wr(mmio, 0x90, uint32_t(d.avail)), wr(mmio, 0xa0, uint32_t(d.used));
  wr(mmio, 0x44, 1);
  wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk | kDriverOk);

  constexpr int kRequests = 20000;
  int sent = 0, done = 0;
  uint64_t irqSeen = 0;
  bool stalled = false;
  while (done < kRequests && !stalled) {
    int batch = 0;
    while (sent < kRequests && batch < 3 && d.add({{kData + 64 * uint64_t(sent % kSize), 16, true}}) >= 0) ++sent, ++batch;
    if (batch && d.publish()) wr(mmio, 0x50, 0);
    // Linux's interrupt path: take what is used; then (event idx) used_event was moved past it by
    // getUsed, so re-check after a fence before sleeping, or an entry added meanwhile is missed.
    uint32_t id, len;
    bool got = false;
    while (d.getUsed(id, len)) {
      if (len != 16) stalled = true;
      ++done, got = true;
    }
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (got || done == kRequests || (sent < kRequests && sent - done < kSize)) continue;
    std::unique_lock<std::mutex> lock(mu);
    if (!cv.wait_for(lock, std::chrono::seconds(5), [&] { return irqs != irqSeen; })) {
      uint32_t id2, len2;
      lock.unlock();
      stalled = !d.getUsed(id2, len2);  // a used entry without an interrupt is also a lost wakeup
      if (!stalled) ++done;
      stalled = true;
      break;
    }
    irqSeen = irqs;
    lock.unlock();
    wr(mmio, 0x64, rd(mmio, 0x60));  // acknowledge before reading the ring, as vm_interrupt does
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    stop = true;
    cv.notify_all();
  }
  device.join();
  CHECK(!stalled);
  CHECK(done == kRequests);
  CHECK(!(rd(mmio, 0x70) & kDeviceNeedsReset));
}

TEST(stress_two_threads_event_idx) { stress(kAll); }
TEST(stress_two_threads_flags) { stress(kFVersion1); }

// ---- virtio-blk ----------------------------------------------------------------------------------

constexpr uint64_t kDiskSize = 16 << 20;

std::string tempDisk(const char* name, uint64_t size) {
  std::string path = scratchDir + "/" + name + "-" + std::to_string(getpid());
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0 || ftruncate(fd, static_cast<off_t>(size)) != 0) std::abort();  // sparse: no blocks yet
  ::close(fd);
  return path;
}

struct BlkHarness {
  // The driver accepts everything offered, as Linux's virtio_blk does for these features.
  explicit BlkHarness(const std::string& path, BlockOptions options = {}) : disk(Block::open(path, options)), h(*disk, disk->features()) {
    if (!(h.bringUp(16) & kDriverOk)) std::abort();
  }
  // One request the way virtio_blk queues it: header, data, status in separate descriptors.
  uint8_t request(uint32_t type, uint64_t sector, uint64_t dataGpa, uint32_t dataLen, bool dataWritable, uint32_t* used = nullptr, bool indirect = false) {
    uint64_t hdr = kData, status = kData + 16;
    h.mem.set<uint32_t>(hdr, type);
    h.mem.set<uint32_t>(hdr + 4, 0);
    h.mem.set<uint64_t>(hdr + 8, sector);
    h.mem.set<uint8_t>(status, 0xff);
    std::vector<DriverBuffer> bufs{{hdr, 16, false}};
    if (dataLen) bufs.push_back({dataGpa, dataLen, dataWritable});
    bufs.push_back({status, 1, true});
    h.driver->add(bufs, indirect);
    h.driver->publish();
    h.kick();
    uint32_t id, len;
    if (!h.driver->getUsed(id, len)) return 0xee;
    if (used) *used = len;
    return h.mem.get<uint8_t>(status);
  }
  std::unique_ptr<Block> disk;
  MmioHarness h;
};

constexpr uint64_t kBuf = kData + 0x1000;

uint64_t allocatedBytes(const std::string& path) {
  struct stat st;
  stat(path.c_str(), &st);
  return uint64_t(st.st_blocks) * 512;
}
bool isHole(const std::string& path, off_t offset, off_t len) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  off_t hole = lseek(fd, offset, SEEK_HOLE);
  off_t data = lseek(fd, offset, SEEK_DATA);
  ::close(fd);
  // A hole at offset, and no data until offset + len (or none at all).
  return hole == offset && (data < 0 || data >= offset + len);
}

TEST(blk_config_space) {
  std::string path = tempDisk("cfg", kDiskSize + 100);  // a tail under a sector is not addressable
  BlkHarness b(path);
  uint64_t cap;
  b.h.mmio.read(0x100, reinterpret_cast<uint8_t*>(&cap), 8);  // uint64_t storage as bytes
  CHECK(cap == kDiskSize / 512);
  CHECK(rd(b.h.mmio, 0x100 + 12) == Block::kQueueSize - 2);
  CHECK(rd(b.h.mmio, 0x100 + 20) == 512);
  CHECK(rd(b.h.mmio, 0x100 + 40) == Block::kMaxDiscardSegments);
  uint8_t byte = 0;
  b.h.mmio.read(0x100 + 56, &byte, 1);
  CHECK(byte == 1);
  uint32_t past = 0xdeadbeef;
  b.h.mmio.read(0x100 + 58, reinterpret_cast<uint8_t*>(&past), 4);  // crosses the end: zeros
  CHECK(past == 0);
  wr(b.h.mmio, 0x100, 0);  // read-only config: ignored
  b.h.mmio.read(0x100, reinterpret_cast<uint8_t*>(&cap), 8);
  CHECK(cap == kDiskSize / 512);
  wr(b.h.mmio, 0x14, 0);
  uint32_t f = rd(b.h.mmio, 0x10);
  CHECK((f & (1u << 9)) && (f & (1u << 13)) && (f & (1u << 14)) && !(f & (1u << 5)));
  unlink(path.c_str());
}

TEST(blk_read_write_flush_getid) {
  std::string path = tempDisk("rw", kDiskSize);
  BlkHarness b(path, {false, "skiff-disk-0123456789abc"});
  uint8_t* buf = b.h.mem.at(kBuf, 8192);
  for (int i = 0; i < 8192; ++i) buf[i] = uint8_t(i * 7 + 3);
  uint32_t used = 0;
  CHECK(b.request(Block::kTOut, 100, kBuf, 8192, false, &used) == Block::kSOk && used == 1);
  CHECK(b.request(Block::kTFlush, 0, 0, 0, false) == Block::kSOk);
  // The data is in the file, as another reader sees it.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  std::vector<uint8_t> file(8192);
  CHECK(pread(fd, file.data(), 8192, 100 * 512) == 8192 && std::memcmp(file.data(), buf, 8192) == 0);
  ::close(fd);
  std::memset(b.h.mem.at(kBuf + 0x4000, 8192), 0, 8192);
  CHECK(b.request(Block::kTIn, 100, kBuf + 0x4000, 8192, true, &used) == Block::kSOk && used == 8193);
  CHECK(std::memcmp(b.h.mem.at(kBuf + 0x4000, 8192), buf, 8192) == 0);
  // Through an indirect table, too.
  std::memset(b.h.mem.at(kBuf + 0x4000, 512), 0, 512);
  CHECK(b.request(Block::kTIn, 101, kBuf + 0x4000, 512, true, &used, true) == Block::kSOk);
  CHECK(std::memcmp(b.h.mem.at(kBuf + 0x4000, 512), buf + 512, 512) == 0);
  // A sparse region reads as zeros.
  CHECK(b.request(Block::kTIn, 5000, kBuf + 0x4000, 512, true) == Block::kSOk && b.h.mem.at(kBuf + 0x4000)[0] == 0);
  // GET_ID: 20 bytes, cut, not NUL-terminated.
  CHECK(b.request(Block::kTGetId, 0, kBuf, 20, true, &used) == Block::kSOk && used == 21);
  CHECK(std::memcmp(b.h.mem.at(kBuf, 20), "skiff-disk-012345678", 20) == 0);
  // Errors: past the end, straddling the end, not a whole sector, unknown type, short header.
  CHECK(b.request(Block::kTIn, kDiskSize / 512, kBuf, 512, true) == Block::kSIoErr);
  CHECK(b.request(Block::kTIn, kDiskSize / 512 - 1, kBuf, 1024, true) == Block::kSIoErr);
  CHECK(b.request(Block::kTIn, UINT64_MAX, kBuf, 512, true) == Block::kSIoErr);
  CHECK(b.request(Block::kTOut, UINT64_MAX / 512, kBuf, 512, false) == Block::kSIoErr);
  CHECK(b.request(Block::kTOut, 0, kBuf, 100, false) == Block::kSIoErr);
  CHECK(b.request(Block::kTIn, kDiskSize / 512, kBuf, 0, true) == Block::kSOk);  // empty read at the end
  CHECK(b.request(99, 0, kBuf, 512, true) == Block::kSUnsupp);
  CHECK(b.request(10, 0, kBuf, 512, true) == Block::kSUnsupp);  // GET_LIFETIME: not offered
  b.h.driver->add({{kData, 8, false}, {kData + 16, 1, true}});  // 8-byte header
  b.h.driver->publish();
  b.h.kick();
  uint32_t id;
  CHECK(b.h.driver->getUsed(id, used) && used == 1 && b.h.mem.get<uint8_t>(kData + 16) == Block::kSIoErr);
  CHECK(!(rd(b.h.mmio, 0x70) & kDeviceNeedsReset));
  // No status byte at all: nothing can be answered, the device fails.
  b.h.driver->add({{kData, 16, false}});
  b.h.driver->publish();
  b.h.kick();
  CHECK(rd(b.h.mmio, 0x70) & kDeviceNeedsReset);
  CHECK(b.h.logs.size() == 1 && b.h.logs[0].find("virtio-blk") == 0);
  unlink(path.c_str());
}

TEST(blk_discard_and_write_zeroes_punch_holes) {
  std::string path = tempDisk("discard", kDiskSize);
  BlkHarness b(path);
  // Fill 1 MiB at sector 2048.
  uint8_t* buf = b.h.mem.at(kBuf, 0x100000);
  std::memset(buf, 0xab, 0x100000);
  CHECK(b.request(Block::kTOut, 2048, kBuf, 0x100000, false) == Block::kSOk);
  CHECK(b.request(Block::kTFlush, 0, 0, 0, false) == Block::kSOk);
  uint64_t before = allocatedBytes(path);
  CHECK(before >= 0x100000);
  CHECK(!isHole(path, 2048 * 512, 0x100000));

  auto segment = [&](uint64_t gpa, uint64_t sector, uint32_t sectors, uint32_t flags) {
    b.h.mem.set<uint64_t>(gpa, sector);
    b.h.mem.set<uint32_t>(gpa + 8, sectors);
    b.h.mem.set<uint32_t>(gpa + 12, flags);
  };
  uint64_t seg = kData + 0x100;
  // DISCARD the first 256 KiB: a hole, fewer blocks.
  segment(seg, 2048, 512, 0);
  CHECK(b.request(Block::kTDiscard, 0, seg, 16, false) == Block::kSOk);
  CHECK(isHole(path, 2048 * 512, 256 * 1024));
  CHECK(allocatedBytes(path) <= before - 256 * 1024);
  // WRITE_ZEROES with unmap: a hole too.
  segment(seg, 2560, 512, 1);
  CHECK(b.request(Block::kTWriteZeroes, 0, seg, 16, false) == Block::kSOk);
  CHECK(isHole(path, 2560 * 512, 256 * 1024));
  // WRITE_ZEROES without unmap: zeros, still allocated where the file system can zero in place.
  segment(seg, 3072, 8, 0);
  CHECK(b.request(Block::kTWriteZeroes, 0, seg, 16, false) == Block::kSOk);
  CHECK(b.request(Block::kTIn, 3072, kBuf, 8192, true) == Block::kSOk);
  bool zeros = true;
  for (int i = 0; i < 4096; ++i) zeros &= buf[i] == 0;
  CHECK(zeros && buf[4096] == 0xab);
  // Two segments in one request.
  segment(seg, 3584, 8, 0);
  segment(seg + 16, 3600, 8, 0);
  CHECK(b.request(Block::kTDiscard, 0, seg, 32, false) == Block::kSOk);
  // Rejected: unmap on discard, reserved flags, out of range, oversize, bad lengths.
  segment(seg, 3800, 8, 1);
  CHECK(b.request(Block::kTDiscard, 0, seg, 16, false) == Block::kSUnsupp);
  segment(seg, 3800, 8, 2);
  CHECK(b.request(Block::kTWriteZeroes, 0, seg, 16, false) == Block::kSUnsupp);
  segment(seg, kDiskSize / 512 - 4, 8, 0);
  CHECK(b.request(Block::kTDiscard, 0, seg, 16, false) == Block::kSIoErr);
  segment(seg, UINT64_MAX - 2, 8, 0);
  CHECK(b.request(Block::kTWriteZeroes, 0, seg, 16, false) == Block::kSIoErr);
  segment(seg, 0, Block::kMaxDiscardSectors + 1, 0);
  CHECK(b.request(Block::kTDiscard, 0, seg, 16, false) == Block::kSIoErr);
  CHECK(b.request(Block::kTDiscard, 0, seg, 15, false) == Block::kSIoErr);
  CHECK(b.request(Block::kTDiscard, 0, seg, 0, false) == Block::kSIoErr);
  CHECK(b.request(Block::kTDiscard, 0, seg, 16 * (Block::kMaxDiscardSegments + 1), false) == Block::kSIoErr);
  // A bad segment after a good one: nothing is done.
  CHECK(b.request(Block::kTOut, 4000, kBuf + 0x80000, 4096, false) == Block::kSOk);
  segment(seg, 4000, 8, 0);
  segment(seg + 16, 4000, 8, 4);
  CHECK(b.request(Block::kTDiscard, 0, seg, 32, false) == Block::kSUnsupp);
  CHECK(!isHole(path, 4000 * 512, 4096));
  unlink(path.c_str());
}

TEST(blk_read_only) {
  std::string path = tempDisk("ro", kDiskSize);
  {
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    CHECK(pwrite(fd, "hello", 5, 512) == 5);
    ::close(fd);
  }
  BlkHarness b(path, {true, "ro"});
  wr(b.h.mmio, 0x14, 0);
  uint32_t f = rd(b.h.mmio, 0x10);
  CHECK((f & (1u << 5)) && !(f & (1u << 13)) && !(f & (1u << 14)));
  std::memset(b.h.mem.at(kBuf, 512), 'x', 512);
  CHECK(b.request(Block::kTOut, 1, kBuf, 512, false) == Block::kSIoErr);
  CHECK(b.request(Block::kTIn, 1, kBuf, 512, true) == Block::kSOk);
  CHECK(std::memcmp(b.h.mem.at(kBuf, 5), "hello", 5) == 0);
  b.h.mem.set<uint64_t>(kData + 0x100, 1);
  b.h.mem.set<uint64_t>(kData + 0x108, 1);
  CHECK(b.request(Block::kTDiscard, 0, kData + 0x100, 16, false) == Block::kSUnsupp);
  CHECK(b.request(Block::kTFlush, 0, 0, 0, false) == Block::kSOk);
  unlink(path.c_str());
}

TEST(blk_host_io_errors_become_ioerr) {
  // A disk the host can only read, offered to the guest as writable: every write, discard and
  // zeroing fails on the host (EBADF) and the guest gets IOERR, never a crash or a hang.
  std::string path = tempDisk("ioerr", kDiskSize);
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  Block disk(fd, {});
  MmioHarness h(disk, disk.features());
  CHECK(h.bringUp(16) & kDriverOk);
  auto request = [&](uint32_t type, uint64_t dataGpa, uint32_t dataLen) {
    h.mem.set<uint32_t>(kData, type);
    h.mem.set<uint64_t>(kData + 8, 0);
    std::vector<DriverBuffer> bufs{{kData, 16, false}};
    if (dataLen) bufs.push_back({dataGpa, dataLen, false});
    bufs.push_back({kData + 16, 1, true});
    h.driver->add(bufs);
    h.driver->publish();
    h.kick();
    uint32_t id, len;
    h.driver->getUsed(id, len);
    return h.mem.get<uint8_t>(kData + 16);
  };
  CHECK(request(Block::kTOut, kBuf, 512) == Block::kSIoErr);
  h.mem.set<uint64_t>(kData + 0x100, 0);
  h.mem.set<uint32_t>(kData + 0x108, 8);
  h.mem.set<uint32_t>(kData + 0x10c, 0);
  CHECK(request(Block::kTWriteZeroes, kData + 0x100, 16) == Block::kSIoErr);
  h.mem.set<uint32_t>(kData + 0x10c, 1);
  CHECK(request(Block::kTWriteZeroes, kData + 0x100, 16) == Block::kSIoErr);
  CHECK(!(rd(h.mmio, 0x70) & kDeviceNeedsReset));
  unlink(path.c_str());
}

TEST(blk_several_disks_and_locking) {
  std::string p1 = tempDisk("d1", 1 << 20), p2 = tempDisk("d2", 2 << 20);
  BlkHarness a(p1), b(p2);
  std::memset(a.h.mem.at(kBuf, 512), 1, 512);
  std::memset(b.h.mem.at(kBuf, 512), 2, 512);
  CHECK(a.request(Block::kTOut, 0, kBuf, 512, false) == Block::kSOk);
  CHECK(b.request(Block::kTOut, 0, kBuf, 512, false) == Block::kSOk);
  CHECK(a.request(Block::kTIn, 0, kBuf, 512, true) == Block::kSOk && a.h.mem.at(kBuf)[0] == 1);
  CHECK(b.request(Block::kTIn, 0, kBuf, 512, true) == Block::kSOk && b.h.mem.at(kBuf)[0] == 2);
  CHECK(a.disk->capacitySectors() == 2048 && b.disk->capacitySectors() == 4096);
  // A second writer on the same image is refused; so is a missing file.
  bool refused = false;
  try {
    Block::open(p1, {});
  } catch (const DeviceError& e) {
    refused = std::string(e.what()).find("in use") != std::string::npos;
  }
  CHECK(refused);
  refused = false;
  try {
    Block::open(scratchDir + "/no-such-disk", {});
  } catch (const DeviceError& e) {
    refused = std::string(e.what()).find("No such file") != std::string::npos;
  }
  CHECK(refused);
  unlink(p1.c_str());
  unlink(p2.c_str());
}

TEST(blk_many_requests_in_one_kick) {
  std::string path = tempDisk("batch", kDiskSize);
  BlkHarness b(path);
  // 8 requests outstanding at once (half the queue of 16, 2 descriptors each), one kick.
  for (int i = 0; i < 8; ++i) {
    uint64_t hdr = kData + 0x1000 * uint64_t(i);
    b.h.mem.set<uint32_t>(hdr, Block::kTIn);
    b.h.mem.set<uint64_t>(hdr + 8, uint64_t(i));
    b.h.driver->add({{hdr, 16, false}, {hdr + 512, 513, true}});  // data and status in one buffer
  }
  b.h.driver->publish();
  b.h.kick();
  uint32_t id, len;
  int n = 0;
  while (b.h.driver->getUsed(id, len)) {
    CHECK(len == 513);
    CHECK(b.h.mem.get<uint8_t>(kData + 0x1000 * uint64_t(n) + 512 + 512) == Block::kSOk);
    ++n;
  }
  CHECK(n == 8);
  CHECK(b.h.levels.size() == 1);  // one interrupt for the batch
  unlink(path.c_str());
}


// ---- virtio-vsock --------------------------------------------------------------------------------

// The machine's side of vsock: host ports are socketpairs whose far ends the test holds, and a
// poll() over the watched sockets plays the event loop.
struct FakeVsockHost : VsockHost {
  int connect(uint32_t port) override {
    if (refuse) return -1;
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0) std::abort();
    peers[port] = sv[1];
    return sv[0];
  }
  void connected(int fd, bool accepted) override { results.emplace_back(fd, accepted); }
  void watch(int fd, bool r, bool w) override { interest[fd] = {r, w}; }
  void unwatch(int fd) override { interest.erase(fd); }
  // One event-loop turn: every watched socket that is ready goes to the device.
  void poll(Mmio& mmio, Vsock& vsock) {
    std::vector<pollfd> fds;
    for (auto& [fd, rw] : interest) fds.push_back({fd, short((rw.first ? POLLIN : 0) | (rw.second ? POLLOUT : 0)), 0});
    if (fds.empty() || ::poll(fds.data(), fds.size(), 0) <= 0) return;
    for (auto& p : fds) {
      if (p.revents) mmio.withDevice([&] { vsock.hostReady(p.fd, p.revents & (POLLIN | POLLHUP | POLLERR), p.revents & POLLOUT); });
    }
  }
  bool refuse = false;
  std::map<uint32_t, int> peers;
  std::map<int, std::pair<bool, bool>> interest;
  std::vector<std::pair<int, bool>> results;
};

constexpr uint64_t kGuestCid = 3;

struct VsockHarness {
  VsockHarness() : mem{{kRam, kRamSize}}, vsock(kGuestCid, host), mmio(vsock, mem.map, nullptr, [this](const std::string& m) { logs.push_back(m); }) {
    wr(mmio, 0x70, kAcknowledge | kDriver);
    wr(mmio, 0x24, 1), wr(mmio, 0x20, 1);
    wr(mmio, 0x24, 0), wr(mmio, 0x20, uint32_t(kFEventIdx));
    wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk);
    for (uint16_t q = 0; q < 3; ++q) {
      drivers.push_back(std::make_unique<Driver>(mem, 16, kRings + 0x4000 * q, kScratch + 0x10000 * q, true));
      Driver& d = *drivers.back();
      wr(mmio, 0x30, q), wr(mmio, 0x38, 16);
      wr(mmio, 0x80, uint32_t(d.desc)), wr(mmio, 0x90, uint32_t(d.avail)), wr(mmio, 0xa0, uint32_t(d.used));
      wr(mmio, 0x44, 1);
    }
    wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk | kDriverOk);
  }
  // Rx buffers, each 4 KiB, from kData upwards (slot i at kData + 4 KiB * i).
  void postRx(int n, uint32_t len = 4096) {
    for (int i = 0; i < n; ++i) {
      uint64_t gpa = kData + 0x1000 * uint64_t(rxSlot++ % 16);
      drivers[0]->add({{gpa, len, true}});
      rxLen[gpa] = len;
    }
    if (drivers[0]->publish()) wr(mmio, 0x50, 0);
  }
  // One packet from the guest: header and payload in two readable descriptors, as Linux sends them.
  bool send(uint16_t op, uint32_t srcPort, uint32_t dstPort, const std::string& payload = "", uint32_t flags = 0, uint32_t bufAlloc = 65536, uint32_t fwdCnt = 0, uint64_t dstCid = Vsock::kHostCid) {
    Vsock::Header h{kGuestCid, dstCid, srcPort, dstPort, uint32_t(payload.size()), Vsock::kTypeStream, op, flags, bufAlloc, fwdCnt};
    uint64_t hdr = kData + 0x20000 + 0x100 * uint64_t(txSlot % 16), data = kData + 0x30000 + 0x10000 * uint64_t(txSlot % 16);
    ++txSlot;
    std::memcpy(mem.at(hdr, sizeof h), &h, sizeof h);
    std::vector<DriverBuffer> bufs{{hdr, sizeof h, false}};
    if (!payload.empty()) {
      std::memcpy(mem.at(data, payload.size()), payload.data(), payload.size());
      bufs.push_back({data, uint32_t(payload.size()), false});
    }
    if (drivers[1]->add(bufs) < 0) return false;  // every tx descriptor still with the device
    if (drivers[1]->publish()) wr(mmio, 0x50, 1);
    uint32_t id, len;
    while (drivers[1]->getUsed(id, len)) {
    }
    return true;
  }
  // The next packet the device put in an rx buffer.
  bool receive(Vsock::Header& h, std::string& payload) {
    uint32_t id, len;
    if (!drivers[0]->getUsed(id, len)) return false;
    // Buffers are reused in order: the used id's descriptor holds the address.
    uint64_t gpa = mem.get<uint64_t>(drivers[0]->desc + 16ull * id);
    std::memcpy(&h, mem.at(gpa, sizeof h), sizeof h);
    payload.assign(reinterpret_cast<const char*>(mem.at(gpa + sizeof h, h.len ? h.len : 1)), h.len);  // bytes the device wrote, as chars
    return len == sizeof h + h.len;
  }
  // A guest connection from guestPort to the host's hostPort, answered (the rx buffers posted
  // first): the host's end of it.
  int connect(uint32_t guestPort, uint32_t hostPort) {
    send(Vsock::kOpRequest, guestPort, hostPort);
    Vsock::Header h;
    std::string data;
    CHECK(receive(h, data) && h.op == Vsock::kOpResponse);
    return host.peers.at(hostPort);
  }
  FakeMemory mem;
  FakeVsockHost host;
  Vsock vsock;
  Mmio mmio;
  std::vector<std::string> logs;
  std::vector<std::unique_ptr<Driver>> drivers;
  std::map<uint64_t, uint32_t> rxLen;
  int rxSlot = 0, txSlot = 0;
};

TEST(vsock_guest_connects_to_host) {
  VsockHarness v;
  uint64_t cid = 0;
  v.mmio.read(0x100, reinterpret_cast<uint8_t*>(&cid), 8);  // uint64_t storage as bytes
  CHECK(cid == kGuestCid);
  v.postRx(8);
  v.send(Vsock::kOpRequest, 50000, 1234);
  Vsock::Header h;
  std::string data;
  CHECK(v.receive(h, data) && h.op == Vsock::kOpResponse && h.srcPort == 1234 && h.dstPort == 50000 && h.dstCid == kGuestCid && h.srcCid == 2);
  CHECK(h.bufAlloc == Vsock::kBufAlloc);
  int peer = v.host.peers.at(1234);
  v.send(Vsock::kOpRw, 50000, 1234, "hello");
  char buf[64] = {};
  CHECK(read(peer, buf, sizeof buf) == 5 && std::string(buf, 5) == "hello");
  CHECK(write(peer, "world!", 6) == 6);
  v.host.poll(v.mmio, v.vsock);
  CHECK(v.receive(h, data) && h.op == Vsock::kOpRw && data == "world!" && h.fwdCnt == 5);
  // The guest closes: SHUTDOWN both ways, answered with RST; the host end sees EOF.
  v.send(Vsock::kOpShutdown, 50000, 1234, "", Vsock::kShutdownRecv | Vsock::kShutdownSend);
  CHECK(v.receive(h, data) && h.op == Vsock::kOpRst);
  CHECK(read(peer, buf, sizeof buf) == 0);
  CHECK(v.vsock.connectionCount() == 0);
  close(peer);
  // The host end goes away while the guest still sends: the connection is reset (EPIPE), and the
  // process is not killed by SIGPIPE (found by the vsock fuzz target).
  v.send(Vsock::kOpRequest, 50002, 1235);
  CHECK(v.receive(h, data) && h.op == Vsock::kOpResponse);
  close(v.host.peers.at(1235));
  v.send(Vsock::kOpRw, 50002, 1235, "anyone there?");
  CHECK(v.receive(h, data) && h.op == Vsock::kOpRst && h.dstPort == 50002);
  CHECK(v.vsock.connectionCount() == 0);
  // A refused port: RST.
  v.host.refuse = true;
  v.send(Vsock::kOpRequest, 50001, 99);
  CHECK(v.receive(h, data) && h.op == Vsock::kOpRst && h.dstPort == 50001);
  CHECK(!(rd(v.mmio, 0x70) & kDeviceNeedsReset));
}

TEST(vsock_host_connects_to_guest) {
  VsockHarness v;
  v.postRx(8);
  int sv[2];
  CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
  bool taken = false;
  v.mmio.withDevice([&] { taken = v.vsock.hostConnect(sv[0], 52); });
  CHECK(taken);
  Vsock::Header h;
  std::string data;
  CHECK(v.receive(h, data) && h.op == Vsock::kOpRequest && h.dstPort == 52 && h.srcPort >= Vsock::kHostPortBase);
  uint32_t hostPort = h.srcPort;
  v.send(Vsock::kOpResponse, 52, hostPort, "", 0, 4096);
  CHECK(v.host.results.size() == 1 && v.host.results[0].second);
  // Credit: the guest's 4 KiB buffer limits what it is sent until it reports progress.
  std::string big(10000, 'x');
  CHECK(write(sv[1], big.data(), big.size()) == ssize_t(big.size()));
  v.host.poll(v.mmio, v.vsock);
  uint32_t got = 0;
  while (v.receive(h, data)) got += h.len;
  CHECK(got == 4096);
  v.send(Vsock::kOpCreditUpdate, 52, hostPort, "", 0, 4096, 4096);
  v.postRx(4);
  v.host.poll(v.mmio, v.vsock);
  while (v.receive(h, data)) got += h.len;
  CHECK(got == 8192);
  // The host closes: the guest is told both directions are shut, and its RST ends the connection.
  close(sv[1]);
  v.send(Vsock::kOpCreditUpdate, 52, hostPort, "", 0, 65536, 8192);
  for (int i = 0; i < 3; ++i) v.host.poll(v.mmio, v.vsock);
  bool shutdown = false;
  while (v.receive(h, data)) {
    got += h.len;
    shutdown |= h.op == Vsock::kOpShutdown && h.flags == 3;
  }
  CHECK(got == 10000 && shutdown);
  v.send(Vsock::kOpRst, 52, hostPort);
  CHECK(v.vsock.connectionCount() == 0);
  // A host connection the guest refuses.
  CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
  v.mmio.withDevice([&] { v.vsock.hostConnect(sv[0], 53); });
  CHECK(v.receive(h, data) && h.op == Vsock::kOpRequest);
  v.send(Vsock::kOpRst, 53, h.srcPort);
  CHECK(v.host.results.size() == 2 && !v.host.results[1].second);
  close(sv[1]);
}

// One read from the host socket fills several rx buffers (one packet each, in ring order, bytes in
// stream order), no more than the guest's credit allows; buffers the read did not need stay with
// the device and carry the next packets.
TEST(vsock_rx_one_read_fills_several_buffers) {
  VsockHarness v;
  v.postRx(8);
  v.send(Vsock::kOpRequest, 41000, 8, "", 0, 10000);
  Vsock::Header h;
  std::string data;
  CHECK(v.receive(h, data) && h.op == Vsock::kOpResponse);
  int peer = v.host.peers.at(8);
  std::string stream;
  for (int i = 0; i < 20000; ++i) stream += char('a' + i % 23);
  CHECK(write(peer, stream.data(), stream.size()) == ssize_t(stream.size()));
  v.host.poll(v.mmio, v.vsock);
  // Credit 10000 over 4 KiB buffers (4052 bytes of payload after the header): 4052, 4052, 1896.
  std::string got;
  std::vector<uint32_t> lens;
  while (v.receive(h, data)) {
    CHECK(h.op == Vsock::kOpRw && h.dstPort == 41000 && h.srcPort == 8 && h.len == data.size());
    lens.push_back(h.len);
    got += data;
  }
  CHECK((lens == std::vector<uint32_t>{4052, 4052, 1896}));
  CHECK(got == stream.substr(0, 10000));
  // The guest read it all: the rest comes in the buffers still posted (5 left: 20260 bytes of room).
  v.send(Vsock::kOpCreditUpdate, 41000, 8, "", 0, 65536, 10000);
  v.host.poll(v.mmio, v.vsock);
  lens.clear();
  while (v.receive(h, data)) {
    CHECK(h.op == Vsock::kOpRw);
    lens.push_back(h.len);
    got += data;
  }
  CHECK((lens == std::vector<uint32_t>{4052, 4052, 1896}));
  CHECK(got == stream.substr(0, 20000));
  // The two buffers left were popped for that read (it found less than they hold): the device
  // kept them, and the next data goes into them.
  CHECK(write(peer, "tail", 4) == 4);
  v.host.poll(v.mmio, v.vsock);
  CHECK(v.receive(h, data) && h.op == Vsock::kOpRw && data == "tail");
  CHECK(!v.receive(h, data));
  CHECK(!(rd(v.mmio, 0x70) & kDeviceNeedsReset));
  close(peer);
}

// A batch of tx packets that crosses the credit-update threshold (a quarter of buf_alloc) twice
// before rx runs queues one CREDIT_UPDATE, carrying the fwd_cnt of when it is sent.
TEST(vsock_one_credit_update_per_batch) {
  VsockHarness v;
  v.postRx(1);
  int peer = v.connect(42000, 9);
  Vsock::Header h;
  std::string data;
  // Three 33 KiB packets in one kick with no rx buffer posted: 66 KiB and 99 KiB forwarded both
  // cross the 64 KiB threshold.
  std::string chunk(33 * 1024, 'q');
  for (int i = 0; i < 3; ++i) {
    Vsock::Header t{kGuestCid, Vsock::kHostCid, 42000, 9, uint32_t(chunk.size()), Vsock::kTypeStream, Vsock::kOpRw, 0, 65536, 0};
    uint64_t hdr = kData + 0x20000 + 0x100 * uint64_t(i), buf = kData + 0x30000 + 0x10000 * uint64_t(i);
    std::memcpy(v.mem.at(hdr, sizeof t), &t, sizeof t);
    std::memcpy(v.mem.at(buf, chunk.size()), chunk.data(), chunk.size());
    CHECK(v.drivers[1]->add({{hdr, sizeof t, false}, {buf, uint32_t(chunk.size()), false}}) >= 0);
  }
  if (v.drivers[1]->publish()) wr(v.mmio, 0x50, 1);
  uint32_t id, len;
  int done = 0;
  while (v.drivers[1]->getUsed(id, len)) ++done;
  CHECK(done == 3);
  std::vector<char> buf(256 * 1024);
  size_t got = 0;
  for (ssize_t n; (n = read(peer, buf.data(), buf.size())) > 0;) got += size_t(n);
  CHECK(got == 3 * chunk.size());
  v.postRx(4);
  int updates = 0;
  while (v.receive(h, data)) {
    CHECK(h.op == Vsock::kOpCreditUpdate && h.fwdCnt == 3 * chunk.size());
    ++updates;
  }
  CHECK(updates == 1);
  close(peer);
}

TEST(vsock_holds_the_guest_to_its_credit) {
  VsockHarness v;
  v.postRx(8);
  int peer = v.connect(40000, 7);
  Vsock::Header h;
  std::string data;
  // The host end never reads: socket buffer, then the device's 256 KiB, then a reset.
  std::string chunk(Vsock::kMaxPayload, 'z');
  bool reset = false;
  for (int i = 0; i < 64 && !reset; ++i) {
    v.send(Vsock::kOpRw, 40000, 7, chunk);
    while (v.receive(h, data)) reset |= h.op == Vsock::kOpRst;
  }
  CHECK(reset);
  CHECK(v.vsock.connectionCount() == 0);
  CHECK(!(rd(v.mmio, 0x70) & kDeviceNeedsReset));  // a connection's fault, not the device's
  close(peer);
}

TEST(vsock_hostile_packets) {
  {
    VsockHarness v;
    v.postRx(8);
    // Wrong destination: RST. Forged source: silence. RST for nothing: silence. Unknown op: RST.
    Vsock::Header h;
    std::string data;
    v.send(Vsock::kOpRequest, 1, 2, "", 0, 0, 0, 7);
    CHECK(v.receive(h, data) && h.op == Vsock::kOpRst);
    v.send(Vsock::kOpRst, 1, 2);
    v.send(Vsock::kOpRw, 1, 2, "data");
    CHECK(v.receive(h, data) && h.op == Vsock::kOpRst);
    v.send(99, 1, 2);
    CHECK(v.receive(h, data) && h.op == Vsock::kOpRst);
    CHECK(!v.receive(h, data));
    CHECK(!(rd(v.mmio, 0x70) & kDeviceNeedsReset));
    // A header longer than its buffers fails the device.
    Vsock::Header bad{kGuestCid, 2, 1, 2, 100, 1, Vsock::kOpRw, 0, 0, 0};
    std::memcpy(v.mem.at(kData + 0x20000, sizeof bad), &bad, sizeof bad);
    v.drivers[1]->add({{kData + 0x20000, sizeof bad, false}});
    v.drivers[1]->publish();
    wr(v.mmio, 0x50, 1);
    CHECK(rd(v.mmio, 0x70) & kDeviceNeedsReset);
    CHECK(v.logs.size() == 1);
  }
  {
    VsockHarness v;
    v.drivers[1]->add({{kData, 20, false}});  // shorter than a header
    v.drivers[1]->publish();
    wr(v.mmio, 0x50, 1);
    CHECK(rd(v.mmio, 0x70) & kDeviceNeedsReset);
  }
  {
    VsockHarness v;
    v.postRx(1, 16);  // an rx buffer too small for any packet
    v.send(Vsock::kOpRequest, 1, 2);
    CHECK(rd(v.mmio, 0x70) & kDeviceNeedsReset);
  }
  {
    // No rx buffers and a flood of refused requests: replies are bounded, tx waits for rx.
    VsockHarness v;
    v.host.refuse = true;
    int sent = 0;
    while (sent < 400 && v.send(Vsock::kOpRequest, uint32_t(1000 + sent), 2)) ++sent;
    // The device stopped taking tx at kMaxControl queued replies; the rest wait in the tx queue.
    CHECK(sent == int(Vsock::kMaxControl) + 16);
    CHECK(!(rd(v.mmio, 0x70) & kDeviceNeedsReset));
    int rsts = 0;
    Vsock::Header h;
    std::string data;
    for (int round = 0; round < 40; ++round) {
      v.postRx(16);
      while (v.receive(h, data)) rsts += h.op == Vsock::kOpRst;
    }
    CHECK(rsts == sent);
  }
}

// ---- virtio-net ----------------------------------------------------------------------------------

// A backend that records what the guest sent and delivers what a test hands it.
struct FakeNetBackend : NetBackend {
  void send(const uint8_t* frame, size_t len) override {
    sent.emplace_back(frame, frame + len);
    where.push_back(frame);
  }
  bool takesGuestMemory() const override { return guestMemory; }
  void flush() override { ++flushes; }
  bool give(const std::vector<uint8_t>& frame) { return deliver(frame.data(), frame.size()); }
  std::vector<std::vector<uint8_t>> sent;
  std::vector<const uint8_t*> where;  // the pointer each send() was given
  bool guestMemory = false;
  int flushes = 0;
};

std::vector<uint8_t> bytes(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = uint8_t(seed + i * 7);
  return v;
}

const std::array<uint8_t, 6> kGuestMac = Net::stableMac("test-vm");

// A net device on virtio-mmio over fake memory, the test playing the driver: queue 0 rx, 1 tx,
// kicks processed inline (no Notify), as on one vCPU.
struct NetHarness {
  explicit NetHarness(uint64_t features = kFVersion1 | kFEventIdx | kFIndirectDesc | Net::kFMac | Net::kFStatus | Net::kFMrgRxbuf)
      : mem{{kRam, kRamSize}},
        net(backend, kGuestMac, [this] { ++wakes; }),
        mmio(net, mem.map, nullptr, [this](const std::string& m) { logs.push_back(m); }) {
    wr(mmio, 0x70, kAcknowledge | kDriver);
    wr(mmio, 0x24, 0), wr(mmio, 0x20, uint32_t(features));
    wr(mmio, 0x24, 1), wr(mmio, 0x20, uint32_t(features >> 32));
    wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk);
    for (uint16_t q = 0; q < 2; ++q) {
      drivers.push_back(std::make_unique<Driver>(mem, 16, kRings + 0x4000 * q, kScratch + 0x10000 * q, (features & kFEventIdx) != 0));
      Driver& d = *drivers.back();
      wr(mmio, 0x30, q), wr(mmio, 0x38, 16);
      wr(mmio, 0x80, uint32_t(d.desc)), wr(mmio, 0x90, uint32_t(d.avail)), wr(mmio, 0xa0, uint32_t(d.used));
      wr(mmio, 0x44, 1);
    }
    wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk | kDriverOk);
  }
  // Rx buffers of `len` bytes, each one writable descriptor (Linux's mergeable and small modes).
  void postRx(int n, uint32_t len) {
    for (int i = 0; i < n; ++i) {
      uint64_t gpa = kData + 0x10000 * uint64_t(rxSlot++ % 16);
      drivers[0]->add({{gpa, len, true}});
    }
    if (drivers[0]->publish()) wr(mmio, 0x50, 0);
  }
  // One frame with its 12-byte header; `split`: header and frame in separate descriptors.
  void send(const std::vector<uint8_t>& frame, bool split = false, bool indirect = false, Net::Header h = {}) {
    uint64_t at = kData + 0x100000 + 0x10000 * uint64_t(txSlot++ % 8);
    uint64_t body = split ? at + 64 : at + sizeof h;
    std::memcpy(mem.at(at, sizeof h), &h, sizeof h);
    std::memcpy(mem.at(body, frame.size()), frame.data(), frame.size());
    std::vector<DriverBuffer> bufs{{at, uint32_t(sizeof h + (split ? 0 : frame.size())), false}};
    if (split && !frame.empty()) bufs.push_back({body, uint32_t(frame.size()), false});
    drivers[1]->add(bufs, indirect);
    if (drivers[1]->publish()) wr(mmio, 0x50, 1);
    uint32_t id, len;
    while (drivers[1]->getUsed(id, len)) {
    }
  }
  // The next received frame (all its merged buffers), header checked and stripped.
  bool receive(std::vector<uint8_t>& frame, uint16_t* buffers = nullptr) {
    uint32_t id, len;
    if (!drivers[0]->getUsed(id, len)) return false;
    uint64_t gpa = mem.get<uint64_t>(drivers[0]->desc + 16ull * id);
    Net::Header h;
    std::memcpy(&h, mem.at(gpa, sizeof h), sizeof h);
    if (buffers) *buffers = h.numBuffers;
    if (len < sizeof h || h.flags != 0 || h.gsoType != 0 || h.numBuffers == 0) return false;
    const uint8_t* p = mem.at(gpa, len);
    frame.assign(p + sizeof h, p + len);
    for (uint16_t i = 1; i < h.numBuffers; ++i) {
      if (!drivers[0]->getUsed(id, len)) return false;
      gpa = mem.get<uint64_t>(drivers[0]->desc + 16ull * id);
      p = mem.at(gpa, len);
      frame.insert(frame.end(), p, p + len);
    }
    return true;
  }
  bool failed() { return (rd(mmio, 0x70) & kDeviceNeedsReset) != 0; }

  FakeMemory mem;
  FakeNetBackend backend;
  int wakes = 0;
  Net net;
  std::vector<std::string> logs;
  Mmio mmio;
  std::vector<std::unique_ptr<Driver>> drivers;
  int rxSlot = 0, txSlot = 0;
};

TEST(net_identity_config_and_mac) {
  NetHarness n;
  CHECK(rd(n.mmio, 0x08) == kNet);
  wr(n.mmio, 0x14, 0);
  uint32_t lo = rd(n.mmio, 0x10);
  CHECK((lo & Net::kFMac) && (lo & Net::kFStatus) && (lo & Net::kFMtu) && (lo & Net::kFMrgRxbuf));
  CHECK(!(lo & 1) && !(lo & (1u << 17)));  // no checksum offload, no control queue
  uint8_t mac[6];
  for (int i = 0; i < 6; ++i) n.mmio.read(0x100 + i, &mac[i], 1);
  CHECK(std::memcmp(mac, kGuestMac.data(), 6) == 0);
  uint16_t status = 0, mtu = 0;
  n.mmio.read(0x106, reinterpret_cast<uint8_t*>(&status), 2);  // le16 config fields as bytes
  n.mmio.read(0x10a, reinterpret_cast<uint8_t*>(&mtu), 2);
  CHECK(status == Net::kStatusLinkUp && mtu == 1500);
  // Stable, locally administered, unicast, and different per seed.
  CHECK(Net::stableMac("test-vm") == kGuestMac);
  CHECK(Net::stableMac("other-vm") != kGuestMac);
  CHECK((kGuestMac[0] & 3) == 2);
}

TEST(net_tx_strips_the_header) {
  NetHarness n;
  auto a = bytes(60, 1), b = bytes(1514, 2), c = bytes(300, 3);
  n.send(a);                // header and frame in one descriptor (Linux pushes the header in front)
  n.send(b, true);          // header and frame apart
  n.send(c, true, true);    // indirect
  CHECK(n.backend.sent.size() == 3 && n.backend.sent[0] == a && n.backend.sent[1] == b && n.backend.sent[2] == c);
  CHECK(n.backend.flushes == 3);
  // Frames no Ethernet carries are dropped and counted, the device carries on.
  n.send(bytes(10, 4));
  CHECK(n.backend.sent.size() == 3 && n.net.stats().txDropped == 1 && !n.failed());
  CHECK(n.net.stats().txFrames == 3 && n.net.stats().txBytes == 60 + 1514 + 300);
  CHECK(n.logs.empty());
}

TEST(net_tx_hands_a_contiguous_frame_in_guest_memory) {
  NetHarness n;
  n.backend.guestMemory = true;
  auto inFront = [&](size_t i) {  // the pointer lies in the fake guest RAM, not in a copy
    const uint8_t* ram = n.mem.at(kRam, kRamSize);
    return n.backend.where[i] >= ram && n.backend.where[i] < ram + kRamSize;
  };
  auto a = bytes(60, 1), b = bytes(9000, 2), c = bytes(300, 3);
  n.send(a);              // header and frame in one descriptor
  n.send(b, true);        // the frame in its own descriptor
  n.send(c, true, true);  // indirect
  CHECK(n.backend.sent.size() == 3 && n.backend.sent[0] == a && n.backend.sent[1] == b && n.backend.sent[2] == c);
  CHECK(inFront(0) && inFront(1) && inFront(2));
  // A frame over two descriptors is not one span: it is gathered into a copy.
  uint64_t at = kData + 0x180000;
  Net::Header h{};
  auto d = bytes(3000, 4);
  std::memcpy(n.mem.at(at, sizeof h), &h, sizeof h);
  std::memcpy(n.mem.at(at + 0x1000, 1000), d.data(), 1000);
  std::memcpy(n.mem.at(at + 0x3000, 2000), d.data() + 1000, 2000);
  n.drivers[1]->add({{at, sizeof h, false}, {at + 0x1000, 1000, false}, {at + 0x3000, 2000, false}});
  if (n.drivers[1]->publish()) wr(n.mmio, 0x50, 1);
  CHECK(n.backend.sent.size() == 4 && n.backend.sent[3] == d && !inFront(3));
  CHECK(n.net.stats().txFrames == 4 && n.net.stats().txBytes == 60 + 9000 + 300 + 3000 && !n.failed());
}

TEST(net_rx_whole_buffers) {
  NetHarness n(kFVersion1 | kFEventIdx | Net::kFMac);  // no MRG_RXBUF: one buffer per frame
  auto f1 = bytes(1514, 9), f2 = bytes(42, 10);
  CHECK(n.backend.give(f1) && n.wakes == 1);
  CHECK(n.backend.give(f2) && n.wakes == 1);  // one wake until process runs
  CHECK(n.net.pendingFrames() == 2);
  n.postRx(4, 1526);  // the kick flushes what waited
  std::vector<uint8_t> got;
  uint16_t buffers = 0;
  CHECK(n.receive(got, &buffers) && got == f1 && buffers == 1);
  CHECK(n.receive(got, &buffers) && got == f2 && buffers == 1);
  CHECK(!n.receive(got));
  // With buffers posted, a frame goes straight in once the device runs (the transport's wake).
  CHECK(n.backend.give(f2) && n.wakes == 2);
  n.mmio.processQueue(Net::kRxQueue);
  CHECK(n.receive(got) && got == f2);
  // A wake set after construction (the transport came later) is the one called.
  int later = 0;
  n.net.setWake([&later] { ++later; });
  CHECK(n.backend.give(f1) && later == 1 && n.wakes == 2);
  n.mmio.processQueue(Net::kRxQueue);
  CHECK(n.receive(got) && got == f1);
  CHECK(n.net.stats().rxFrames == 4 && n.net.stats().rxDropped == 0 && !n.failed());
}

TEST(net_rx_merges_buffers) {
  NetHarness n;
  auto big = bytes(1000, 5);
  n.postRx(2, 256);
  CHECK(n.backend.give(big));
  n.mmio.processQueue(Net::kRxQueue);
  std::vector<uint8_t> got;
  CHECK(!n.receive(got));      // 512 bytes held: not enough, nothing returned yet
  n.postRx(3, 256);            // the kick: 1012 bytes take four of them
  uint16_t buffers = 0;
  CHECK(n.receive(got, &buffers) && buffers == 4 && got == big);
  auto small = bytes(100, 6);  // the fifth buffer is left for the next frame
  CHECK(n.backend.give(small));
  n.mmio.processQueue(Net::kRxQueue);
  CHECK(n.receive(got, &buffers) && buffers == 1 && got == small);
  CHECK(!n.failed() && n.logs.empty());
}

TEST(net_rx_backpressure_is_bounded_and_counted) {
  NetHarness n;
  auto f = bytes(1000, 7);
  size_t taken = 0;
  for (size_t i = 0; i < Net::kMaxPendingFrames + 10; ++i) taken += n.backend.give(f);
  CHECK(taken == Net::kMaxPendingFrames && n.net.stats().rxDropped == 10);
  CHECK(!n.backend.give(bytes(8, 1)));  // a runt is never queued
  std::vector<uint8_t> got;
  size_t received = 0;
  for (int round = 0; round < 200 && received < taken; ++round) {
    n.postRx(16, 2048);
    while (n.receive(got)) received += got == f;
  }
  CHECK(received == taken && n.net.pendingFrames() == 0);
  // A reset drops what waits for the gone driver, counted too.
  n.backend.give(f);
  wr(n.mmio, 0x70, 0);
  CHECK(n.net.pendingFrames() == 0 && n.net.stats().rxDropped == 12);
}

TEST(net_malformed_chains_fail_the_device_once) {
  auto expectFail = [](NetHarness& n, const char* what) {
    CHECK(n.failed());
    CHECK(n.logs.size() == 1);
    if (n.logs.size() != 1 || n.logs[0].find(what) == std::string::npos) std::fprintf(stderr, "  log: %s\n", n.logs.empty() ? "(none)" : n.logs[0].c_str());
  };
  {
    NetHarness n;  // a tx chain shorter than the header
    n.drivers[1]->add({{kData, 8, false}});
    n.drivers[1]->publish();
    wr(n.mmio, 0x50, 1);
    expectFail(n, "shorter than the 12-byte");
    n.send(bytes(60, 1));  // ignored from now on
    wr(n.mmio, 0x50, 1);
    CHECK(n.logs.size() == 1 && n.backend.sent.empty());
  }
  {
    NetHarness n;  // a tx chain with a writable buffer
    n.drivers[1]->add({{kData, 100, false}, {kData + 4096, 100, true}});
    n.drivers[1]->publish();
    wr(n.mmio, 0x50, 1);
    expectFail(n, "device-writable");
  }
  {
    NetHarness n;  // writable before readable: the queue walker refuses the order
    n.drivers[1]->setDesc(n.drivers[1]->desc, 0, kData, 100, Driver::kWrite | Driver::kNext, 1);
    n.drivers[1]->setDesc(n.drivers[1]->desc, 1, kData + 4096, 100, 0, 0);
    n.drivers[1]->pushAvail(0);
    n.drivers[1]->publish();
    wr(n.mmio, 0x50, 1);
    CHECK(n.failed() && n.logs.size() == 1);
  }
  {
    NetHarness n;  // a header asking for segmentation offload, never offered
    Net::Header h{};
    h.gsoType = 1;
    n.send(bytes(100, 1), false, false, h);
    expectFail(n, "offload");
  }
  {
    NetHarness n(kFVersion1 | Net::kFMac);  // no MRG_RXBUF and a buffer smaller than the frame
    n.postRx(1, 600);
    n.backend.give(bytes(1000, 1));
    n.mmio.processQueue(Net::kRxQueue);
    expectFail(n, "whole frame");
  }
  {
    NetHarness n;  // an rx buffer smaller than the header
    n.postRx(1, 8);
    n.backend.give(bytes(100, 1));
    n.mmio.processQueue(Net::kRxQueue);
    expectFail(n, "smaller than the 12-byte");
  }
  {
    NetHarness n;  // a device-readable rx buffer
    n.drivers[0]->add({{kData, 2048, false}});
    n.drivers[0]->publish();
    n.backend.give(bytes(100, 1));
    wr(n.mmio, 0x50, 0);
    expectFail(n, "device-readable");
  }
  {
    NetHarness n;  // merged: every buffer the ring holds together too small, so it would wait forever
    n.postRx(16, 64);
    n.backend.give(bytes(1500, 1));
    n.mmio.processQueue(Net::kRxQueue);
    expectFail(n, "less than a");
  }
  {
    NetHarness n;  // a buffer outside guest memory
    n.drivers[0]->add({{kRam + kRamSize - 100, 2048, true}});
    n.drivers[0]->publish();
    n.backend.give(bytes(100, 1));
    wr(n.mmio, 0x50, 0);
    CHECK(n.failed() && n.logs.size() == 1);
    // Reset and run again: the device works.
    wr(n.mmio, 0x70, 0);
  }
}

#ifdef SKIFF_SLIRP
// ---- virtio-net on libslirp: real NAT, real host sockets ----------------------------------------
//
// The device, libslirp and its sockets run on a real event loop thread, kicks and wakes posted to
// it as in the native VMM; this thread plays the guest, building Ethernet/IPv4/TCP frames by hand.

uint16_t checksum(const uint8_t* p, size_t n, uint32_t sum = 0) {
  for (size_t i = 0; i + 1 < n; i += 2) sum += uint32_t(p[i]) << 8 | p[i + 1];
  if (n & 1) sum += uint32_t(p[n - 1]) << 8;
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return uint16_t(~sum);
}
void put16(uint8_t* p, uint16_t v) { p[0] = uint8_t(v >> 8), p[1] = uint8_t(v); }
void put32(uint8_t* p, uint32_t v) { put16(p, uint16_t(v >> 16)), put16(p + 2, uint16_t(v)); }
uint16_t get16(const uint8_t* p) { return uint16_t(p[0] << 8 | p[1]); }
uint32_t get32(const uint8_t* p) { return uint32_t(get16(p)) << 16 | get16(p + 2); }
std::array<uint8_t, 4> ip(const char* text) {
  std::array<uint8_t, 4> a{};
  inet_pton(AF_INET, text, a.data());
  return a;
}

std::vector<uint8_t> ethernet(const std::array<uint8_t, 6>& dst, uint16_t type, const std::vector<uint8_t>& payload) {
  std::vector<uint8_t> f(14);
  std::memcpy(f.data(), dst.data(), 6);
  std::memcpy(f.data() + 6, kGuestMac.data(), 6);
  put16(f.data() + 12, type);
  f.insert(f.end(), payload.begin(), payload.end());
  return f;
}

std::vector<uint8_t> arp(uint16_t op, const std::array<uint8_t, 6>& targetMac, const char* targetIp) {
  std::vector<uint8_t> a(28);
  put16(&a[0], 1), put16(&a[2], 0x0800), a[4] = 6, a[5] = 4, put16(&a[6], op);
  std::memcpy(&a[8], kGuestMac.data(), 6);
  std::memcpy(&a[14], ip(SlirpBackend::kGuest).data(), 4);
  std::memcpy(&a[18], targetMac.data(), 6);
  std::memcpy(&a[24], ip(targetIp).data(), 4);
  return ethernet(op == 1 ? std::array<uint8_t, 6>{0xff, 0xff, 0xff, 0xff, 0xff, 0xff} : targetMac, 0x0806, a);
}

struct Segment {
  uint16_t srcPort = 0, dstPort = 0;
  uint32_t seq = 0, ack = 0;
  uint8_t flags = 0;  // FIN 1, SYN 2, RST 4, PSH 8, ACK 16
  std::string data;
};
constexpr uint8_t kFin = 1, kSyn = 2, kRst = 4, kAck = 16;

std::vector<uint8_t> tcp(const std::array<uint8_t, 6>& gatewayMac, const char* dst, const Segment& s) {
  std::vector<uint8_t> p(40 + s.data.size());
  uint8_t* iph = p.data();
  uint8_t* th = p.data() + 20;
  iph[0] = 0x45, put16(iph + 2, uint16_t(p.size())), put16(iph + 4, 1), put16(iph + 6, 0x4000), iph[8] = 64, iph[9] = 6;
  std::memcpy(iph + 12, ip(SlirpBackend::kGuest).data(), 4);
  std::memcpy(iph + 16, ip(dst).data(), 4);
  put16(iph + 10, checksum(iph, 20));
  put16(th, s.srcPort), put16(th + 2, s.dstPort), put32(th + 4, s.seq), put32(th + 8, s.ack);
  th[12] = 5 << 4, th[13] = s.flags, put16(th + 14, 65535);
  std::memcpy(th + 20, s.data.data(), s.data.size());
  std::vector<uint8_t> pseudo(12);
  std::memcpy(&pseudo[0], iph + 12, 8), pseudo[9] = 6, put16(&pseudo[10], uint16_t(20 + s.data.size()));
  uint32_t sum = 0;
  for (size_t i = 0; i < 12; i += 2) sum += get16(&pseudo[i]);
  put16(th + 16, checksum(th, 20 + s.data.size(), sum));
  return ethernet(gatewayMac, 0x0800, p);
}

// A TCP segment for the guest, parsed; false for anything else.
bool parseTcp(const std::vector<uint8_t>& f, Segment& s, std::string* from = nullptr) {
  if (f.size() < 54 || get16(&f[12]) != 0x0800 || f[23] != 6 || std::memcmp(&f[30], ip(SlirpBackend::kGuest).data(), 4) != 0) return false;
  size_t ihl = (f[14] & 15) * 4u, total = get16(&f[16]);
  if (total > f.size() - 14 || ihl < 20) return false;
  const uint8_t* th = &f[14 + ihl];
  size_t doff = (th[12] >> 4) * 4u;
  s.srcPort = get16(th), s.dstPort = get16(th + 2), s.seq = get32(th + 4), s.ack = get32(th + 8), s.flags = th[13];
  s.data.assign(reinterpret_cast<const char*>(th + doff), total - ihl - doff);  // payload bytes as chars
  if (from) *from = std::to_string(f[26]) + "." + std::to_string(f[27]) + "." + std::to_string(f[28]) + "." + std::to_string(f[29]);
  return true;
}

struct SlirpHarness {
  explicit SlirpHarness(const SlirpBackend::Options& options = {})
      : mem{{kRam, kRamSize}},
        loop(skiff::EventLoop::create([this](const std::string& m) { std::lock_guard<std::mutex> l(mu); errors.push_back(m); })),
        backend(*loop, options, [this](const std::string& m) { std::lock_guard<std::mutex> l(mu); logs.push_back(m); }),
        net(backend, kGuestMac, [this] { loop->post([this] { mmio.processQueue(Net::kRxQueue); }); }),
        mmio(net, mem.map, nullptr, [this](const std::string& m) { std::lock_guard<std::mutex> l(mu); logs.push_back(m); },
             [this](uint16_t q) { loop->post([this, q] { while (mmio.processQueue(q)) {} }); }) {
    uint64_t features = kFVersion1 | kFEventIdx | Net::kFMac | Net::kFStatus | Net::kFMrgRxbuf | Net::kFMtu;
    wr(mmio, 0x70, kAcknowledge | kDriver);
    wr(mmio, 0x24, 0), wr(mmio, 0x20, uint32_t(features));
    wr(mmio, 0x24, 1), wr(mmio, 0x20, uint32_t(features >> 32));
    wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk);
    for (uint16_t q = 0; q < 2; ++q) {
      drivers.push_back(std::make_unique<Driver>(mem, 64, kRings + 0x4000 * q, kScratch, true));
      Driver& d = *drivers.back();
      wr(mmio, 0x30, q), wr(mmio, 0x38, 64);
      wr(mmio, 0x80, uint32_t(d.desc)), wr(mmio, 0x90, uint32_t(d.avail)), wr(mmio, 0xa0, uint32_t(d.used));
      wr(mmio, 0x44, 1);
    }
    wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk | kDriverOk);
    for (int i = 0; i < 32; ++i) postRx(kData + 0x1000 * uint64_t(i));
  }
  ~SlirpHarness() {
    wr(mmio, 0x70, 0);
    loop->stop();  // before the backend and the device go: no handler runs after this
  }
  void postRx(uint64_t gpa) {
    drivers[0]->add({{gpa, 2048, true}});
    if (drivers[0]->publish()) wr(mmio, 0x50, 0);
  }
  void send(const std::vector<uint8_t>& frame) {
    uint64_t at = kData + 0x100000 + 0x1000 * uint64_t(txSlot++ % 32);
    std::memset(mem.at(at, 12), 0, 12);
    std::memcpy(mem.at(at + 12, frame.size()), frame.data(), frame.size());
    drivers[1]->add({{at, uint32_t(12 + frame.size()), false}});
    if (drivers[1]->publish()) wr(mmio, 0x50, 1);
    uint32_t id, len;
    while (drivers[1]->getUsed(id, len)) {
    }
  }
  // Waits (bounded) for a frame `match` accepts, answering ARP requests for the guest meanwhile
  // and recycling every rx buffer.
  bool await(const std::function<bool(const std::vector<uint8_t>&)>& match, int timeoutMs = 5000) {
    auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeoutMs);
    while (std::chrono::steady_clock::now() < end) {
      uint32_t id, len;
      if (!drivers[0]->getUsed(id, len)) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        continue;
      }
      uint64_t gpa = mem.get<uint64_t>(drivers[0]->desc + 16ull * id);
      const uint8_t* p = mem.at(gpa, len);
      std::vector<uint8_t> frame(p + 12, p + len);  // 2 KiB buffers: every frame in one
      postRx(gpa);
      frames.push_back(frame);
      if (frame.size() >= 42 && get16(&frame[12]) == 0x0806 && get16(&frame[20]) == 1 && std::memcmp(&frame[38], ip(SlirpBackend::kGuest).data(), 4) == 0) {
        std::array<uint8_t, 6> who;
        std::memcpy(who.data(), &frame[22], 6);
        send(arp(2, who, SlirpBackend::kGateway));
      }
      if (match(frame)) return true;
    }
    return false;
  }
  // ARP for the gateway: slirp learns the guest's MAC and tells its own.
  bool resolveGateway() {
    send(arp(1, {}, SlirpBackend::kGateway));
    return await([this](const std::vector<uint8_t>& f) {
      if (f.size() < 42 || get16(&f[12]) != 0x0806 || get16(&f[20]) != 2) return false;
      std::memcpy(gatewayMac.data(), &f[22], 6);
      return std::memcmp(&f[28], ip(SlirpBackend::kGateway).data(), 4) == 0;
    });
  }

  FakeMemory mem;
  std::mutex mu;
  std::vector<std::string> errors, logs;
  std::unique_ptr<skiff::EventLoop> loop;
  SlirpBackend backend;
  Net net;
  Mmio mmio;
  std::vector<std::unique_ptr<Driver>> drivers;
  std::vector<std::vector<uint8_t>> frames;
  std::array<uint8_t, 6> gatewayMac{};
  int txSlot = 0;
};

// A listening TCP socket on 127.0.0.1 with a kernel-chosen port.
int listenLoopback(uint16_t& port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t alen = sizeof a;
  if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || listen(fd, 4) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&a), &alen) != 0) std::abort();  // sockaddr_in as the generic sockaddr
  port = ntohs(a.sin_port);
  return fd;
}

bool readable(int fd, int timeoutMs) {
  pollfd p{fd, POLLIN, 0};
  return poll(&p, 1, timeoutMs) == 1;
}

TEST(net_slirp_nat_to_host_loopback) {
  uint16_t port;
  int listener = listenLoopback(port);
  SlirpHarness s;
  CHECK(s.resolveGateway());
  // SYN to 10.0.2.2:port: libslirp connects to 127.0.0.1:port and answers only once that worked.
  Segment syn{40000, port, 1000, 0, kSyn, ""};
  s.send(tcp(s.gatewayMac, SlirpBackend::kGateway, syn));
  Segment synAck;
  CHECK(s.await([&](const std::vector<uint8_t>& f) { return parseTcp(f, synAck) && synAck.dstPort == 40000 && synAck.srcPort == port; }));
  CHECK(synAck.flags == (kSyn | kAck) && synAck.ack == 1001);
  CHECK(readable(listener, 5000));
  int conn = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
  CHECK(conn >= 0);
  // Data both ways through the NAT.
  s.send(tcp(s.gatewayMac, SlirpBackend::kGateway, {40000, port, 1001, synAck.seq + 1, kAck, ""}));
  s.send(tcp(s.gatewayMac, SlirpBackend::kGateway, {40000, port, 1001, synAck.seq + 1, kAck | 8, "GET / HTTP/1.0\r\n\r\n"}));
  char buf[64] = {};
  CHECK(conn >= 0 && readable(conn, 5000) && read(conn, buf, sizeof buf) == 18 && std::string(buf) == "GET / HTTP/1.0\r\n\r\n");
  CHECK(conn >= 0 && write(conn, "hello", 5) == 5);
  Segment data;
  CHECK(s.await([&](const std::vector<uint8_t>& f) { return parseTcp(f, data) && !data.data.empty(); }));
  CHECK(data.data == "hello" && data.seq == synAck.seq + 1 && data.ack == 1001 + 18);
  if (conn >= 0) close(conn);
  close(listener);
  CHECK(s.net.stats().rxDropped == 0 && !(rd(s.mmio, 0x70) & kDeviceNeedsReset));
  std::lock_guard<std::mutex> l(s.mu);
  CHECK(s.errors.empty() && s.logs.empty());
}

TEST(net_slirp_publish_reaches_the_guest) {
  uint16_t hostPort;
  close(listenLoopback(hostPort));  // a free port, taken back for the forward
  SlirpBackend::Options options;
  options.forwards.push_back({false, hostPort, 8080});
  SlirpHarness s(options);
  CHECK(s.resolveGateway());
  int c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(hostPort);
  CHECK(connect(c, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 || errno == EINPROGRESS);  // sockaddr_in as sockaddr
  // libslirp accepts on 127.0.0.1:hostPort and opens a connection to 10.0.2.15:8080 in the guest.
  Segment syn;
  std::string from;
  CHECK(s.await([&](const std::vector<uint8_t>& f) { return parseTcp(f, syn, &from) && syn.dstPort == 8080; }));
  CHECK(syn.flags == kSyn && from == SlirpBackend::kGateway);
  // The guest accepts: SYN-ACK, then the host client's data arrives as a segment.
  s.send(tcp(s.gatewayMac, SlirpBackend::kGateway, {8080, syn.srcPort, 5000, syn.seq + 1, kSyn | kAck, ""}));
  CHECK(write(c, "ping", 4) == 4 || errno == EAGAIN);
  Segment data;
  bool got = s.await([&](const std::vector<uint8_t>& f) { return parseTcp(f, data) && data.dstPort == 8080 && !data.data.empty(); });
  if (!got) {  // the connect may still have been in flight at the write: once more
    CHECK(write(c, "ping", 4) == 4);
    got = s.await([&](const std::vector<uint8_t>& f) { return parseTcp(f, data) && data.dstPort == 8080 && !data.data.empty(); });
  }
  CHECK(got && data.data == "ping" && data.seq == syn.seq + 1);
  // The guest answers; the host client reads it.
  s.send(tcp(s.gatewayMac, SlirpBackend::kGateway, {8080, syn.srcPort, 5001, syn.seq + 5, kAck | 8, "pong"}));
  char buf[8] = {};
  CHECK(readable(c, 5000) && read(c, buf, sizeof buf) == 4 && std::string(buf) == "pong");
  close(c);
  // A second backend cannot take the same port: a clear error, nothing left behind.
  bool threw = false;
  try {
    auto loop2 = skiff::EventLoop::create(nullptr);
    SlirpBackend again(*loop2, options, nullptr);
  } catch (const DeviceError& e) {
    threw = std::string(e.what()).find("--publish " + std::to_string(hostPort) + ":8080") != std::string::npos;
  }
  CHECK(threw);
}

// ---- the event loop's modify, and vsock's host side using it -------------------------------------
// (Here because epoll.cc is linked only into this build; hypervisor/tools/event-loop-test.cc tests
// the rest of the loop's contract.)

// Waits (bounded) until `done` holds.
bool eventually(const std::function<bool()>& done, int timeoutMs = 2000) {
  auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeoutMs);
  while (!done()) {
    if (std::chrono::steady_clock::now() >= end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

TEST(event_loop_modify_keeps_the_handler) {
  std::atomic<int> errors{0};
  auto loop = skiff::EventLoop::create([&](const std::string&) { ++errors; });
  int sv[2];
  CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
  std::atomic<int> calls{0}, writableCalls{0}, readableCalls{0};
  loop->add(sv[0], skiff::kReadable, [&](uint32_t ev) {
    ++calls;
    if (ev & skiff::kWritable) {
      ++writableCalls;
      loop->modify(sv[0], skiff::kReadable);  // from the handler itself: no more writable events
    }
    if (ev & skiff::kReadable) {
      ++readableCalls;
      char c;
      while (read(sv[0], &c, 1) == 1) {
      }
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  CHECK(calls == 0);  // nothing to read, and writability not asked for
  loop->modify(sv[0], skiff::kReadable | skiff::kWritable);  // from another thread
  CHECK(eventually([&] { return writableCalls == 1; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  CHECK(writableCalls == 1 && readableCalls == 0);  // the handler's modify took effect
  CHECK(write(sv[1], "x", 1) == 1);
  CHECK(eventually([&] { return readableCalls == 1; }));
  bool threw = false;
  try {
    loop->modify(sv[1], skiff::kReadable);  // never added
  } catch (const std::exception&) {
    threw = true;
  }
  CHECK(threw);
  loop->remove(sv[0]);
  loop->stop();
  close(sv[0]);
  close(sv[1]);
  CHECK(errors == 0);
}

TEST(vsock_unix_host_watch_changes_keep_one_registration) {
  std::atomic<int> errors{0};
  auto loop = skiff::EventLoop::create([&](const std::string& m) {
    std::fprintf(stderr, "  loop error: %s\n", m.c_str());
    ++errors;
  });
  std::string dir = scratchDir + "/vsock-unix-XXXXXX";
  CHECK(mkdtemp(&dir[0]) != nullptr);
  UnixVsockHost host(*loop, dir);
  Vsock vsock(kGuestCid, host);  // never activated: hostReady finds no connection and returns
  std::atomic<int> ready{0};
  std::atomic<int> current{-1};
  host.start(vsock, [&](const std::function<void()>& fn) {
    ++ready;
    fn();
    // What a device does once a socket took its pending bytes: only read interest is left (and
    // nothing is readable here), so a writable socket stops calling.
    host.watch(current, true, false);
    return true;
  });
  int sv[2];
  CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
  current = sv[0];
  host.watch(sv[0], true, false);  // from another thread: posted
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  CHECK(ready == 0);
  host.watch(sv[0], true, true);  // the same socket, more interest: a modify
  CHECK(eventually([&] { return ready == 1; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(30));
  CHECK(ready == 1);  // the handler's watch (a modify on the loop thread) took effect
  // The socket goes; a new one gets its number: it needs a fresh registration (epoll forgot the
  // old one at close, so a modify would fail).
  host.unwatch(sv[0]);
  close(sv[0]);
  close(sv[1]);
  CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) == 0);
  current = sv[0];
  host.watch(sv[0], true, true);
  CHECK(eventually([&] { return ready == 2; }));
  host.unwatch(sv[0]);
  loop->post([&] { host.close(); });
  loop->stop();
  close(sv[0]);
  close(sv[1]);
  rmdir(dir.c_str());
  CHECK(errors == 0);
}
#endif  // SKIFF_SLIRP

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) scratchDir = argv[1];
  return runAll();
}
