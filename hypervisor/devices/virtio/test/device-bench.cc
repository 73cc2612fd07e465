// The device models' own host CPU per GiB, without a VM, a transport or an event loop: this program
// plays a Linux-like driver over fake guest memory (test/driver.h) in the same thread as the device,
// keeps the queues full, and reads the thread's CPU clock around the whole run. What it counts: the
// device's ring walks, checks and copies, its syscalls (preadv/pwritev, readv/sendmsg on a Unix
// socket), and the fake driver's ring work (small next to the copies). What it leaves out: kicks,
// interrupts, waking up (the transport's eventfds and the loop's epoll_wait), the guest's pace.
// Guest memory is touched before the clock starts, so no first-touch page faults are counted.
// Built -O2 by bench/devices.ts (--only micro):
//   g++ -std=c++17 -O2 -Ihypervisor hypervisor/devices/virtio/{blk,queue,vsock}.cc
//       hypervisor/devices/virtio/test/device-bench.cc -o device-bench -lpthread
//   ./device-bench GIB
// Prints one line per case: "<case> <ms per GiB>".
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <ctime>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "devices/virtio/blk.h"
#include "devices/virtio/queue.h"
#include "devices/virtio/vsock.h"
#include "devices/virtio/test/driver.h"

using namespace skiff::virtio;
using namespace skiff::virtio::testing;

namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kGiB = 1 << 30;
constexpr uint64_t kRam = 0x100000;
constexpr uint64_t kRamSize = 160 * kMiB;
constexpr uint64_t kRings = kRam;                  // 3 rings, 64 KiB apart
constexpr uint64_t kScratch = kRam + kMiB;         // indirect tables (never reused: 63 MiB of room)
constexpr uint64_t kData = kRam + 64 * kMiB;       // buffers: 96 MiB
constexpr uint64_t kFeatures = kFVersion1 | kFEventIdx | kFIndirectDesc;

double threadCpu() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + double(ts.tv_nsec) / 1e9;
}

[[noreturn]] void die(const std::string& why) {
  std::fprintf(stderr, "device-bench: %s\n", why.c_str());
  std::exit(1);
}

struct BenchGuest : Guest {
  void usedBuffers(uint16_t) override { ++notifications; }
  void configChanged() override {}
  void fail(const std::string& why) override { die("device failed: " + why); }
  uint64_t notifications = 0;
};

// One device's queues over `mem`, each with its own driver, activated like a transport would.
struct Rig {
  Rig(FakeMemory& mem, Device& device, uint16_t queueSize) {
    queues.reserve(device.queueCount());  // no reallocation: the device keeps a reference
    for (uint16_t q = 0; q < device.queueCount(); ++q) {
      drivers.push_back(std::make_unique<Driver>(mem, queueSize, kRings + 0x10000 * q, kScratch, true));
      Queue& queue = queues.emplace_back(device.queueMaxSize(q));
      queue.setSize(queueSize);
      queue.setDescTable(drivers[q]->desc);
      queue.setAvailRing(drivers[q]->avail);
      queue.setUsedRing(drivers[q]->used);
      std::string why;
      if (!queue.activate(mem.map, kFeatures, why)) die(why);
    }
    device.activate(mem.map, queues, kFeatures, guest);
  }
  std::vector<Queue> queues;
  std::vector<std::unique_ptr<Driver>> drivers;
  BenchGuest guest;
};

// virtio-blk: 1 MiB requests the way Linux's page cache makes them (header, 256 separate 4 KiB
// pages, status, in an indirect table), 8 in flight per kick, over a 256 MiB image in a memfd: the
// host's page cache without a disk behind it, so writeback and its throttling stay out of the count.
double blk(uint64_t bytes, bool write) {
  constexpr uint64_t kDisk = 256 * kMiB;
  int fd = memfd_create("device-bench.img", MFD_CLOEXEC);
  if (fd < 0) die("memfd_create");
  {
    std::vector<char> chunk(kMiB, 0x5a);
    for (uint64_t at = 0; at < kDisk; at += kMiB) {
      if (pwrite(fd, chunk.data(), kMiB, off_t(at)) != ssize_t(kMiB)) die("writing the disk image");
    }
  }
  FakeMemory mem{{kRam, kRamSize}};
  std::memset(mem.at(kData, 64 * kMiB), 1, 64 * kMiB);  // no first touch inside the clock
  auto disk = std::make_unique<Block>(fd, BlockOptions{});  // owns fd
  // Linux offers 128 descriptors a queue here; the device allows 256.
  Rig rig(mem, *disk, 128);
  Driver& d = *rig.drivers[0];
  constexpr int kInFlight = 8;
  constexpr uint64_t kRequest = kMiB;
  uint64_t done = 0, sector = 0;
  double t0 = threadCpu();
  while (done < bytes) {
    for (int r = 0; r < kInFlight; ++r) {
      uint64_t hdr = kData + 48 * kMiB + 64 * uint64_t(r), status = hdr + 16;
      mem.set<uint32_t>(hdr, write ? Block::kTOut : Block::kTIn);
      mem.set<uint32_t>(hdr + 4, 0);
      mem.set<uint64_t>(hdr + 8, sector);
      sector = (sector + kRequest / 512) % (kDisk / 512);
      std::vector<DriverBuffer> bufs{{hdr, 16, false}};
      // Pages of the 8 requests' 32 MiB spread with a stride, as a page cache's pages are not
      // contiguous: each 4 KiB is its own span.
      for (uint64_t p = 0; p < kRequest / 4096; ++p) bufs.push_back({kData + (uint64_t(r) * 256 + p) * 8192 % (32 * kMiB), 4096, !write});
      bufs.push_back({status, 1, true});
      if (d.add(bufs, true) < 0) die("blk: no free descriptors");
    }
    d.publish();
    disk->process(0);
    uint32_t id, len;
    int got = 0;
    while (d.getUsed(id, len)) ++got;
    if (got != kInFlight) die("blk: requests not completed");
    done += kInFlight * kRequest;
  }
  double cpu = threadCpu() - t0;
  return cpu / (double(done) / kGiB) * 1000;
}

// vsock's machine side: one host socket, a socketpair whose far end a second thread feeds or drains.
struct PairHost : VsockHost {
  int connect(uint32_t) override {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0) die("socketpair");
    fd = sv[0];
    peer = sv[1];
    return sv[0];
  }
  void connected(int, bool) override {}
  void watch(int f, bool r, bool w) override {
    if (f == fd) readable = r, writable = w;
  }
  void unwatch(int f) override {
    if (f == fd) readable = writable = false;
  }
  int fd = -1, peer = -1;
  bool readable = false, writable = false;
};

struct VsockRig {
  static constexpr uint32_t kRxBuffer = 3776;  // Linux 6.1's rx buffer: SKB_WITH_OVERHEAD(4 KiB)
  explicit VsockRig(FakeMemory& mem) : mem(mem), vsock(3, host), rig(mem, vsock, 128) {}
  // Keeps every free rx descriptor posted, buffers cycling through 16 MiB of guest memory.
  void postRx() {
    Driver& rx = *rig.drivers[0];
    bool added = false;
    while (rx.add({{kData + (rxSlot++ % 4096) * 4096, kRxBuffer, true}}) >= 0) added = true;
    if (added) rx.publish();
    vsock.process(0);
  }
  // Takes the device's rx packets; returns the payload bytes, and the last fwd_cnt the device sent.
  uint64_t takeRx(uint32_t& fwdCnt) {
    Driver& rx = *rig.drivers[0];
    uint64_t payload = 0;
    uint32_t id, len;
    while (rx.getUsed(id, len)) {
      uint64_t gpa = mem.get<uint64_t>(rx.desc + 16ull * id);
      Vsock::Header h;
      std::memcpy(&h, mem.at(gpa, sizeof h), sizeof h);
      if (h.op == Vsock::kOpRst) die("vsock: connection reset");
      if (h.op == Vsock::kOpRw) payload += h.len;
      fwdCnt = h.fwdCnt;
    }
    return payload;
  }
  // One tx packet: header and payload in two readable descriptors, as Linux sends them.
  void send(uint16_t op, uint32_t len, uint32_t bufAlloc) {
    Driver& tx = *rig.drivers[1];
    Vsock::Header h{3, Vsock::kHostCid, 5000, 1234, len, Vsock::kTypeStream, op, 0, bufAlloc, 0};
    uint64_t hdr = kData + 40 * kMiB + 64 * (txSlot % 64), data = kData + 16 * kMiB + (txSlot % 64) * 65536 % (16 * kMiB);
    ++txSlot;
    std::memcpy(mem.at(hdr, sizeof h), &h, sizeof h);
    std::vector<DriverBuffer> bufs{{hdr, sizeof h, false}};
    if (len) bufs.push_back({data, len, false});
    if (tx.add(bufs) < 0) die("vsock: no free tx descriptors");
    tx.publish();
    vsock.process(1);
    uint32_t id, used;
    while (tx.getUsed(id, used)) {
    }
  }
  FakeMemory& mem;
  PairHost host;
  Vsock vsock;
  Rig rig;
  uint64_t rxSlot = 0, txSlot = 0;
};

// Waits for the host socket to be ready for `events` (POLLIN or POLLOUT), as the loop would, then
// tells the device.
void hostWait(VsockRig& v, short events) {
  pollfd p{v.host.fd, events, 0};
  ::poll(&p, 1, -1);
  v.vsock.hostReady(v.host.fd, events == POLLIN, events == POLLOUT);
}

// Host → guest: a thread writes `bytes` into the host socket; the guest never runs out of credit
// (buf_alloc 4 GiB - 1) and keeps its rx ring full.
double vsockToGuest(uint64_t bytes) {
  FakeMemory mem{{kRam, kRamSize}};
  std::memset(mem.at(kData, 64 * kMiB), 1, 64 * kMiB);
  VsockRig v(mem);
  v.postRx();
  v.send(Vsock::kOpRequest, 0, UINT32_MAX);
  uint32_t fwd = 0;
  v.takeRx(fwd);  // RESPONSE
  std::thread feeder([&] {
    std::vector<char> block(kMiB, 'x');
    int fl = fcntl(v.host.peer, F_GETFL);
    fcntl(v.host.peer, F_SETFL, fl & ~O_NONBLOCK);
    for (uint64_t left = bytes; left > 0;) {
      ssize_t n = ::write(v.host.peer, block.data(), std::min<uint64_t>(left, kMiB));
      if (n <= 0) die("feeder write");
      left -= uint64_t(n);
    }
  });
  uint64_t got = 0;
  double t0 = threadCpu();
  for (;;) {
    v.postRx();
    got += v.takeRx(fwd);
    if (got >= bytes) break;
    if (v.host.readable) hostWait(v, POLLIN);  // the device found the socket empty
  }
  double cpu = threadCpu() - t0;
  feeder.join();
  ::close(v.host.peer);
  return cpu / (double(got) / kGiB) * 1000;
}

// Guest → host: 64 KiB packets within the device's credit; a thread drains the host socket.
double vsockFromGuest(uint64_t bytes) {
  FakeMemory mem{{kRam, kRamSize}};
  std::memset(mem.at(kData, 64 * kMiB), 1, 64 * kMiB);
  VsockRig v(mem);
  v.postRx();
  v.send(Vsock::kOpRequest, 0, 65536);
  uint32_t fwd = 0;
  v.takeRx(fwd);
  std::thread drainer([&] {
    std::vector<char> buf(kMiB);
    for (uint64_t left = bytes; left > 0;) {
      pollfd p{v.host.peer, POLLIN, 0};
      ::poll(&p, 1, -1);
      ssize_t n = ::read(v.host.peer, buf.data(), buf.size());
      if (n > 0) left -= uint64_t(n);
      if (n == 0) die("drainer: EOF");
    }
  });
  uint64_t sent = 0;
  double t0 = threadCpu();
  while (sent < bytes) {
    uint32_t len = uint32_t(std::min<uint64_t>(bytes - sent, 65536));
    // The device's credit (buf_alloc 256 KiB, fwd_cnt from its packets): wait for room.
    while (uint32_t(sent) - fwd + len > Vsock::kBufAlloc) {
      if (v.host.writable) hostWait(v, POLLOUT);
      v.postRx();
      v.takeRx(fwd);
    }
    v.send(Vsock::kOpRw, len, 65536);
    sent += len;
    v.postRx();
    v.takeRx(fwd);
  }
  while (v.host.writable) hostWait(v, POLLOUT);  // what the host socket has not taken yet
  double cpu = threadCpu() - t0;
  drainer.join();
  ::close(v.host.peer);
  return cpu / (double(sent) / kGiB) * 1000;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) die("usage: device-bench GIB");
  auto bytes = uint64_t(std::atof(argv[1]) * double(kGiB));
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::printf("blk-read %.0f\n", blk(bytes, false));
  std::printf("blk-write %.0f\n", blk(bytes, true));
  std::printf("vsock-to-guest %.0f\n", vsockToGuest(bytes));
  std::printf("vsock-from-guest %.0f\n", vsockFromGuest(bytes));
  return 0;
}
