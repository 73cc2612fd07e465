// libFuzzer target: virtio-vsock's packet handling, both directions, with real host sockets
// (socketpairs) behind it. The input is a script: guest packets with every header field from the
// input, rx buffers of input-chosen sizes, and host-side actions (write, close, connect, an event
// loop turn). Connections, the device's buffers and the sockets are all torn down per input.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>

#include "devices/virtio/mmio.h"
#include "devices/virtio/fuzz/input.h"
#include "devices/virtio/test/driver.h"
#include "devices/virtio/vsock.h"

using namespace skiff::virtio;
using namespace skiff::virtio::fuzzing;

namespace {
constexpr uint64_t kBase = 0x100000, kSize = 0x100000;
constexpr uint64_t kRings = kBase, kScratch = kBase + 0x20000, kBuffers = kBase + 0x40000;

struct Host : VsockHost {
  int connect(uint32_t port) override {
    if (port % 5 == 0) return -1;  // some ports refuse
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0) return -1;
    peers.push_back(sv[1]);
    return sv[0];
  }
  void connected(int, bool) override {}
  void watch(int fd, bool r, bool w) override { interest[fd] = {r, w}; }
  void unwatch(int fd) override { interest.erase(fd); }
  std::vector<int> peers;
  std::map<int, std::pair<bool, bool>> interest;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static testing::FakeMemory mem{{kBase, kSize}};
  Host host;
  auto vsock = std::make_unique<Vsock>(3, host);
  Mmio mmio(*vsock, mem.map, nullptr, nullptr);
  std::vector<std::unique_ptr<testing::Driver>> drivers;
  wr(mmio, 0x70, kAcknowledge | kDriver);
  wr(mmio, 0x24, 1), wr(mmio, 0x20, 1);
  wr(mmio, 0x24, 0), wr(mmio, 0x20, uint32_t(kFEventIdx | kFIndirectDesc));
  wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk);
  for (uint16_t q = 0; q < 3; ++q) {
    drivers.push_back(std::make_unique<testing::Driver>(mem, 16, kRings + 0x4000 * q, kScratch + 0x8000 * q, true));
    testing::Driver& d = *drivers.back();
    wr(mmio, 0x30, q), wr(mmio, 0x38, 16);
    wr(mmio, 0x80, uint32_t(d.desc)), wr(mmio, 0x90, uint32_t(d.avail)), wr(mmio, 0xa0, uint32_t(d.used));
    wr(mmio, 0x44, 1);
  }
  wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk | kDriverOk);

  Input in{data, size};
  uint64_t next = kBuffers;
  auto alloc = [&](uint32_t len) {
    if (next + len > kBase + kSize) next = kBuffers;
    uint64_t at = next;
    next += (len + 15) & ~15u;
    return at;
  };
  uint32_t id, len;
  for (int step = 0; step < 64 && in.n; ++step) {
    switch (in.byte() % 6) {
      case 0: {  // a guest packet: header from the input, payload length and bytes too
        Vsock::Header h;
        h.srcCid = in.byte() & 1 ? 3 : in.u32();
        h.dstCid = in.byte() & 1 ? 2 : in.u32();
        h.srcPort = in.byte();
        h.dstPort = in.byte();
        h.type = in.byte() & 1 ? 1 : in.byte();
        h.op = in.byte() % 9;
        h.flags = in.byte();
        h.bufAlloc = in.u32();
        h.fwdCnt = in.u32();
        uint32_t payload = (in.byte() | uint32_t(in.byte()) << 8) % 0x4000;
        h.len = in.byte() & 1 ? payload : in.u32();
        uint64_t hdr = alloc(sizeof h), body = alloc(payload);
        std::memcpy(mem.at(hdr, sizeof h), &h, sizeof h);
        for (uint32_t i = 0; i < payload && in.n; ++i) mem.at(body + i)[0] = in.byte();
        std::vector<testing::DriverBuffer> bufs{{hdr, sizeof h, false}};
        if (payload) bufs.push_back({body, payload, false});
        if (drivers[1]->add(bufs, in.byte() & 1) >= 0 && drivers[1]->publish()) wr(mmio, 0x50, 1);
        break;
      }
      case 1: {  // rx buffers
        unsigned count = 1 + in.byte() % 8;
        uint32_t size = 16 + (in.byte() | uint32_t(in.byte()) << 8) % 0x2000;
        for (unsigned i = 0; i < count; ++i) drivers[0]->add({{alloc(size), size, true}});
        if (drivers[0]->publish()) wr(mmio, 0x50, 0);
        break;
      }
      case 2: {  // host writes into, or closes, one of its connections
        if (host.peers.empty()) break;
        int peer = host.peers[in.byte() % host.peers.size()];
        uint8_t how = in.byte();
        if (how == 0xff) {
          shutdown(peer, SHUT_RDWR);
        } else {
          char buf[4096];
          std::memset(buf, how, sizeof buf);
          if (send(peer, buf, 1 + how * 16, MSG_NOSIGNAL) < 0) {
          }
        }
        break;
      }
      case 3: {  // the host connects to a guest port
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0) break;
        host.peers.push_back(sv[1]);
        uint32_t port = in.byte();
        if (!mmio.withDevice([&] { vsock->hostConnect(sv[0], port); })) close(sv[0]);
        break;
      }
      case 4: {  // an event-loop turn
        std::vector<pollfd> fds;
        for (auto& [fd, rw] : host.interest) fds.push_back({fd, short((rw.first ? POLLIN : 0) | (rw.second ? POLLOUT : 0)), 0});
        if (fds.empty() || poll(fds.data(), fds.size(), 0) <= 0) break;
        for (auto& p : fds) {
          if (p.revents) mmio.withDevice([&] { vsock->hostReady(p.fd, p.revents & (POLLIN | POLLHUP | POLLERR), p.revents & POLLOUT); });
        }
        break;
      }
      case 5:  // the driver takes what the device returned
        while (drivers[0]->getUsed(id, len)) {
        }
        while (drivers[1]->getUsed(id, len)) {
        }
        break;
    }
  }
  wr(mmio, 0x70, 0);  // reset: the device closes its sockets
  vsock.reset();
  for (int fd : host.peers) close(fd);
  return 0;
}
