// libFuzzer target: a hostile vhost-user front-end. The input is a script of raw messages (any
// request number, flags, payload and a mix of fds: the shared RAM memfd, eventfds, pipes, an
// unsealed memfd), kicks, writes into guest memory, and a "setup" step that does the handshake and
// ring setup with fuzzed sizes and addresses so the device paths are reached too; the device is rng,
// blk (over a memfd) or vsock. Checked beyond ASan/UBSan: every fd the back-end received is closed
// or kept, never leaked (the lowest free fd number is the same after the run), and no mapping
// survives disconnect().
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "devices/virtio/blk.h"
#include "devices/virtio/rng.h"
#include "devices/virtio/vsock.h"
#include "transport/vhost_user.h"

using namespace skiff;
using namespace skiff::vhost_user;

namespace {

constexpr uint64_t kGpa = 0x40000, kRamSize = 256 * 1024, kUser = 0x7f5500000000ull;

struct Input {
  const uint8_t* p;
  size_t left;
  uint8_t u8() {
    if (left == 0) return 0;
    --left;
    return *p++;
  }
  uint16_t u16() { return static_cast<uint16_t>(u8() | (u8() << 8)); }
  uint32_t u32() { return u16() | (static_cast<uint32_t>(u16()) << 16); }
  uint64_t u64() { return u32() | (static_cast<uint64_t>(u32()) << 32); }
};

struct NullNotifier : Notifier {
  void watchKick(int, uint16_t) override {}
  void unwatchKick(int) override {}
  void later(uint16_t) override {}
};

struct NullVsockHost : virtio::VsockHost {
  int connect(uint32_t) override { return -1; }
  void connected(int, bool) override {}
  void watch(int, bool, bool) override {}
  void unwatch(int) override {}
};

int ramFd() {
  static int fd = [] {
    int f = memfd_create("fuzz-ram", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (f < 0 || ftruncate(f, kRamSize) != 0 || fcntl(f, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0) std::abort();
    return f;
  }();
  return fd;
}
uint8_t* ram() {
  static uint8_t* p = static_cast<uint8_t*>(mmap(nullptr, kRamSize, PROT_READ | PROT_WRITE, MAP_SHARED, ramFd(), 0));
  return p;
}

int makeFd(uint8_t kind) {
  switch (kind % 5) {
    case 0: return fcntl(ramFd(), F_DUPFD_CLOEXEC, 0);
    case 1: return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    case 2: {
      int p[2];
      if (pipe2(p, O_CLOEXEC) != 0) return -1;
      close(p[1]);
      return p[0];
    }
    case 3: {
      int f = memfd_create("unsealed", MFD_CLOEXEC);
      if (f >= 0 && ftruncate(f, 4096) != 0) std::abort();
      return f;
    }
    default: return open("/dev/null", O_RDONLY | O_CLOEXEC);
  }
}

void message(Backend& b, uint32_t request, uint32_t flags, const std::vector<uint8_t>& payload, std::vector<int> fds) {
  Header h{request, flags, static_cast<uint32_t>(payload.size())};
  std::string reply, error;
  b.handle(h, payload.data(), fds, reply, error);
}

void u64msg(Backend& b, uint32_t request, uint64_t v, std::vector<int> fds = {}) {
  std::vector<uint8_t> p(8);
  std::memcpy(p.data(), &v, 8);
  message(b, request, kVersion, p, std::move(fds));
}

void state(Backend& b, uint32_t request, uint32_t index, uint32_t num) { u64msg(b, request, index | (static_cast<uint64_t>(num) << 32)); }

// Handshake and one ring, like QEMU's vhost_dev_start, with fuzzed ring size and offsets.
void setup(Backend& b, virtio::Device& d, Input& in) {
  u64msg(b, kSetProtocolFeatures, kPReplyAck | kPMq | (d.configSize() ? kPConfig : 0));
  u64msg(b, kSetFeatures, (d.features() | kFProtocolFeatures) & ~(in.u8() & 1 ? virtio::kFEventIdx : 0));
  std::vector<uint8_t> table(8 + 32);
  uint32_t n = 1;
  MemoryRegionMsg r{kGpa, kRamSize, kUser, 0};
  std::memcpy(table.data(), &n, 4);
  std::memcpy(table.data() + 8, &r, 32);
  message(b, kSetMemTable, kVersion, table, {makeFd(0)});
  uint16_t queues = d.queueCount();
  for (uint16_t q = 0; q < queues && q < 2; ++q) {
    state(b, kSetVringNum, q, 1u << (in.u8() % 9));
    VringAddrMsg a{q, 0, kUser + (in.u16() & ~15u), kUser + (in.u16() & ~3u), kUser + (in.u16() & ~1u), 0};
    std::vector<uint8_t> p(sizeof a);
    std::memcpy(p.data(), &a, sizeof a);
    message(b, kSetVringAddr, kVersion, p, {});
    state(b, kSetVringBase, q, in.u16());
    u64msg(b, kSetVringKick, q, {makeFd(1)});
    u64msg(b, kSetVringCall, q, {makeFd(1)});
    state(b, kSetVringEnable, q, 1);
  }
}

int lowestFreeFd() {
  int fd = dup(0);
  close(fd);
  return fd;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Input in{data, size};
  std::memset(ram(), 0, kRamSize);
  int fdMark = lowestFreeFd();
  {
    NullNotifier notifier;
    NullVsockHost vhost;
    std::unique_ptr<virtio::Device> device;
    switch (in.u8() % 3) {
      case 0: device = std::make_unique<virtio::Rng>(); break;
      case 1: {
        int f = memfd_create("fuzz-disk", MFD_CLOEXEC);
        if (f < 0 || ftruncate(f, 64 * 1024) != 0) std::abort();
        device = std::make_unique<virtio::Block>(f, virtio::BlockOptions{false, "fuzz"});
        break;
      }
      default: device = std::make_unique<virtio::Vsock>(3, vhost); break;
    }
    Backend b(*device, notifier, "fuzz", nullptr);
    for (int step = 0; step < 64 && in.left > 0; ++step) {
      uint8_t op = in.u8();
      switch (op % 6) {
        case 0:
        case 1: {  // a raw message
          uint32_t request = in.u8() % 41;
          uint8_t f = in.u8();
          uint32_t flags = f & 0x80 ? in.u32() : kVersion | (f & 1 ? kFlagNeedReply : 0);
          uint16_t len = in.u16() % (kMaxPayload + 16);
          std::vector<uint8_t> payload(len);
          for (auto& byte : payload) byte = in.u8();
          uint8_t fdSpec = in.u8();
          std::vector<int> fds;
          for (int i = 0; i < (fdSpec & 3); ++i) fds.push_back(makeFd(static_cast<uint8_t>(fdSpec >> (2 + 2 * i))));
          message(b, request, flags, payload, std::move(fds));
          break;
        }
        case 2: b.kicked(in.u8() % 4); break;
        case 3: {  // the guest writes its rings and buffers
          uint32_t off = in.u16() * 4u % kRamSize;
          uint8_t len = in.u8();
          for (uint8_t i = 0; i < len && off + i < kRamSize; ++i) ram()[off + i] = in.u8();
          break;
        }
        case 4: setup(b, *device, in); break;
        default: {  // a typed message with plausible values
          uint32_t request = in.u8() % 41;
          uint64_t v = in.u8() & 1 ? in.u64() : in.u8();
          std::vector<int> fds;
          if (in.u8() & 1) fds.push_back(makeFd(in.u8()));
          u64msg(b, request, v, std::move(fds));
          break;
        }
      }
    }
    b.disconnect();
    if (!b.memory().regions().empty()) std::abort();
  }
  if (lowestFreeFd() != fdMark) {
    std::fprintf(stderr, "fd leak: lowest free fd %d, was %d\n", lowestFreeFd(), fdMark);
    std::abort();
  }
  return 0;
}
