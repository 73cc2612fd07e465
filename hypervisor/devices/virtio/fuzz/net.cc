// libFuzzer target: virtio-net's transmit parser and receive path over fake guest memory. The input
// is a features byte (bit 3: the backend takes tx frames where they lie in guest memory, Net's
// zero-copy path), then a script: tx chains with every header field, shape and length from the
// input, rx buffers of input-chosen sizes and directions, frames from the backend of any length
// (some sent back from inside send(), as libslirp answers ARP), raw hostile descriptors, rx
// processing, the driver taking used buffers (checked: the device never reports more than a chain
// holds), and resets with new features. The backend is in-memory: the parser is what is fuzzed.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "devices/virtio/mmio.h"
#include "devices/virtio/fuzz/input.h"
#include "devices/virtio/net.h"
#include "devices/virtio/test/driver.h"

using namespace skiff::virtio;
using namespace skiff::virtio::fuzzing;

namespace {
constexpr uint64_t kBase = 0x100000, kSize = 0x200000;
constexpr uint64_t kRings = kBase, kScratch = kBase + 0x20000, kBuffers = kBase + 0x40000;
constexpr uint16_t kQueue = 16;

struct Backend : NetBackend {
  void send(const uint8_t* frame, size_t len) override {
    ++sent;
    if (guestMemory) {
      // The frame lies in guest memory (Net's zero-copy path): every byte of it is read, so ASan
      // sees a span that runs past the fake memory; like libslirp, a reply is built from a copy.
      uint8_t sum = 0;
      for (size_t i = 0; i < len; ++i) sum = uint8_t(sum + frame[i]);
      copy.assign(frame, frame + len);
      if (len > 0 && (copy[0] & 1)) deliver(copy.data(), copy.size() - (sum & 1 ? 0 : copy.size() / 2));
      return;
    }
    if (len > 0 && (frame[0] & 1)) deliver(frame, len);  // a reply from inside send()
  }
  bool takesGuestMemory() const override { return guestMemory; }
  uint64_t sent = 0;
  bool guestMemory = false;  // from the features byte; queried per frame, so it may change at a reset
  std::vector<uint8_t> copy;
};

struct Harness {
  Harness(const testing::FakeMemory& mem, Backend& backend) : mem(mem), backend(backend), net(backend, Net::stableMac("fuzz"), nullptr), mmio(net, mem.map, nullptr, nullptr) {}

  void bringUp(uint8_t mode) {
    wr(mmio, 0x70, 0);
    backend.guestMemory = (mode & 8) != 0;
    drivers.clear();
    sizes.clear();
    raw = false;
    uint64_t features = kFVersion1 | Net::kFMac | Net::kFStatus | Net::kFMtu;
    if (mode & 1) features |= Net::kFMrgRxbuf;
    if (mode & 2) features |= kFEventIdx;
    if (mode & 4) features |= kFIndirectDesc;
    wr(mmio, 0x70, kAcknowledge | kDriver);
    wr(mmio, 0x24, 0), wr(mmio, 0x20, uint32_t(features));
    wr(mmio, 0x24, 1), wr(mmio, 0x20, uint32_t(features >> 32));
    wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk);
    for (uint16_t q = 0; q < 2; ++q) {
      drivers.push_back(std::make_unique<testing::Driver>(mem, kQueue, kRings + 0x4000 * q, kScratch + 0x8000 * q, (features & kFEventIdx) != 0));
      testing::Driver& d = *drivers.back();
      wr(mmio, 0x30, q), wr(mmio, 0x38, kQueue);
      wr(mmio, 0x80, uint32_t(d.desc)), wr(mmio, 0x90, uint32_t(d.avail)), wr(mmio, 0xa0, uint32_t(d.used));
      wr(mmio, 0x44, 1);
    }
    wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk | kDriverOk);
  }

  const testing::FakeMemory& mem;
  Backend& backend;
  Net net;
  Mmio mmio;
  std::vector<std::unique_ptr<testing::Driver>> drivers;
  std::map<uint32_t, uint64_t> sizes;  // rx head -> writable bytes the driver gave
  bool raw = false;                    // raw descriptors (maybe over the rings): no oracle from here
};
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static testing::FakeMemory mem{{kBase, kSize}};
  static std::vector<uint8_t> frame(Net::kMaxFrame + 1024);
  Backend backend;
  Harness h(mem, backend);
  Input in{data, size};
  h.bringUp(in.byte());

  uint64_t next = kBuffers;
  auto alloc = [&](uint64_t len) {
    if (next + len > kBase + kSize) next = kBuffers;
    uint64_t at = next;
    next += (len + 15) & ~15ull;
    return at;
  };
  uint32_t id, len;
  for (int step = 0; step < 64 && in.n; ++step) {
    switch (in.byte() % 7) {
      case 0: {  // a tx chain: header fields, frame length and shape from the input
        Net::Header hdr{};
        hdr.flags = in.byte() & 3 ? 0 : in.byte();
        hdr.gsoType = in.byte() & 3 ? 0 : in.byte();
        uint8_t shape = in.byte();
        uint32_t frameLen = in.u16() | (shape & 0x80 ? 0x10000u : 0u);
        uint32_t hdrLen = shape & 0x40 ? in.byte() % 13 : 12;  // sometimes short
        uint64_t at = alloc(hdrLen + frameLen);
        std::memcpy(mem.at(at, hdrLen), &hdr, hdrLen);
        uint8_t fill = in.byte();
        std::memset(mem.at(at + hdrLen, frameLen), fill, frameLen);
        std::vector<testing::DriverBuffer> bufs;
        if (shape & 1) {  // header apart from the frame
          bufs.push_back({at, hdrLen, false});
          if (frameLen) bufs.push_back({at + hdrLen, frameLen, false});
        } else {
          bufs.push_back({at, hdrLen + frameLen, false});
        }
        if (shape & 4) bufs.push_back({alloc(64), 64, true});  // a writable buffer on tx
        if (shape & 8) std::swap(bufs.front(), bufs.back());    // and the order broken
        if (h.drivers[1]->add(bufs, shape & 2) >= 0 && h.drivers[1]->publish()) wr(h.mmio, 0x50, 1);
        break;
      }
      case 1: {  // rx buffers
        unsigned count = 1 + in.byte() % 8;
        uint8_t shape = in.byte();
        uint32_t bufLen = in.u16() % 0x2400;
        for (unsigned i = 0; i < count; ++i) {
          std::vector<testing::DriverBuffer> bufs{{alloc(bufLen), bufLen, !(shape & 1)}};
          if (shape & 2) bufs.push_back({alloc(bufLen), bufLen, true});
          int head = h.drivers[0]->add(bufs, shape & 4);
          if (head >= 0) h.sizes[uint32_t(head)] = uint64_t(bufLen) * bufs.size();
        }
        if (h.drivers[0]->publish()) wr(h.mmio, 0x50, 0);
        break;
      }
      case 2: {  // the backend delivers a frame
        uint8_t shape = in.byte();
        uint32_t frameLen = in.u16() | (shape & 0x80 ? 0x10000u : 0u);
        std::memset(frame.data(), shape, std::min<size_t>(frameLen, frame.size()));
        h.net.receive(frame.data(), std::min<size_t>(frameLen, frame.size()));
        break;
      }
      case 3:  // the transport runs the rx queue (what Net's wake asks for)
        h.mmio.processQueue(Net::kRxQueue);
        break;
      case 4:  // the driver takes what the device returned; it never reports more than it was given
        while (h.drivers[0]->getUsed(id, len)) {
          auto it = h.sizes.find(id);
          if (!h.raw && it != h.sizes.end() && len > it->second) std::abort();
        }
        while (h.drivers[1]->getUsed(id, len)) {
          if (!h.raw && len != 0) std::abort();
        }
        break;
      case 5: {  // a raw descriptor, any fields, made available on either queue
        uint16_t q = in.byte() & 1;
        uint16_t slot = in.byte() % kQueue;
        uint64_t addr = kBase + (uint64_t(in.u16()) << 4);
        if (in.byte() == 0xff) addr = uint64_t(in.u16()) << 48;
        uint32_t dlen = in.u16();
        uint16_t flags = in.byte() & 7, nxt = in.byte();
        h.drivers[q]->setDesc(h.drivers[q]->desc, slot, addr, dlen, flags, nxt);
        h.raw = true;  // it may point into a ring, so the driver's view is no longer to be trusted
        h.drivers[q]->pushAvail(slot);
        if (h.drivers[q]->publish()) wr(h.mmio, 0x50, q);
        break;
      }
      case 6:  // reset and bring up again, maybe with other features
        h.bringUp(in.byte());
        break;
    }
  }
  (void)rd(h.mmio, 0x70);
  wr(h.mmio, 0x70, 0);
  return 0;
}
