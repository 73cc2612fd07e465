// The vhost-user back-end without QEMU: a fake front-end drives Backend directly (every refusal:
// wrong sizes, flags, fd counts, fds of the wrong kind, memory tables that overlap, wrap or lie
// about their file, ring addresses outside the table) and through a real Server over a Unix socket
// (framing, SCM_RIGHTS, oversized headers, too many fds, split messages, reconnects). The happy path
// runs a whole rng and blk request through guest memory shared as a sealed memfd, with ring
// addresses given as front-end user addresses that differ from the guest-physical ones.
// Built and run under ASan/UBSan by test/vhost-user.test.ts:  vhost-user-test SCRATCH_DIR
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "devices/virtio/blk.h"
#include "devices/virtio/net.h"
#include "devices/virtio/rng.h"
#include "devices/virtio/test/driver.h"
#include "loop/event_loop.h"
#include "transport/vhost_user.h"
#include "devices/virtio/test/harness.h"

using namespace skiff;
using namespace skiff::vhost_user;
using skiff::virtio::testing::Driver;
using skiff::virtio::testing::FakeMemory;
using skiff::virtio::testing::checksFailed;
using skiff::virtio::testing::tests;

namespace {

std::string scratchDir = "/tmp";

constexpr uint64_t kGpa = 0x100000;            // guest RAM at 1 MiB
constexpr uint64_t kSize = 2 << 20;            // 2 MiB
constexpr uint64_t kUser = 0x7f1200000000ull;  // where the "front-end" says it mapped it
constexpr uint64_t kRings = kGpa;
constexpr uint64_t kScratch = kGpa + 0x80000;
constexpr uint64_t kData = kGpa + 0x100000;

// Guest RAM as QEMU shares it: a memfd sealed against shrinking, mapped here for the test driver.
struct SharedRam {
  explicit SharedRam(uint64_t size = kSize, bool seal = true) : size(size) {
    fd = memfd_create("guest-ram", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0 || ftruncate(fd, static_cast<off_t>(size)) != 0) std::abort();
    if (seal && fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0) std::abort();
    host = static_cast<uint8_t*>(mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
    if (host == MAP_FAILED) std::abort();
    if (!mem.map.add({kGpa, size, host})) std::abort();
  }
  ~SharedRam() {
    munmap(host, size);
    close(fd);
  }
  int dupFd() const { return fcntl(fd, F_DUPFD_CLOEXEC, 0); }
  uint64_t size;
  int fd;
  uint8_t* host;
  FakeMemory mem{};
};

struct NullNotifier : Notifier {
  std::vector<int> watched;
  int laters = 0;
  void watchKick(int fd, uint16_t) override { watched.push_back(fd); }
  void unwatchKick(int fd) override {
    for (size_t i = 0; i < watched.size(); ++i) {
      if (watched[i] == fd) watched.erase(watched.begin() + static_cast<long>(i));
    }
  }
  void later(uint16_t) override { ++laters; }
};

struct Result {
  bool ok;
  std::string reply, error;
};

Result send(Backend& b, uint32_t request, const void* payload, uint32_t size, std::vector<int> fds = {}, uint32_t flags = kVersion) {
  Header h{request, flags, size};
  Result r;
  r.ok = b.handle(h, static_cast<const uint8_t*>(payload), fds, r.reply, r.error);
  return r;
}
Result sendU64(Backend& b, uint32_t request, uint64_t v, std::vector<int> fds = {}, uint32_t flags = kVersion) { return send(b, request, &v, 8, fds, flags); }
Result sendState(Backend& b, uint32_t request, uint32_t index, uint32_t num) {
  uint32_t s[2] = {index, num};
  return send(b, request, s, 8);
}
uint64_t replyU64(const std::string& reply) {
  uint64_t v = ~0ull;
  if (reply.size() == 20) std::memcpy(&v, reply.data() + 12, 8);
  return v;
}

std::vector<uint8_t> memTable(std::initializer_list<MemoryRegionMsg> regions) {
  std::vector<uint8_t> p(8 + 32 * regions.size(), 0);
  uint32_t n = static_cast<uint32_t>(regions.size());
  std::memcpy(p.data(), &n, 4);
  size_t i = 0;
  for (const auto& r : regions) std::memcpy(p.data() + 8 + 32 * i++, &r, 32);
  return p;
}

// An fd whose closing the test can observe: the read end of a pipe (writes then fail with EPIPE).
struct Pipe {
  int r = -1, w = -1;
  Pipe() {
    int p[2];
    if (pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) std::abort();
    r = p[0];
    w = p[1];
  }
  ~Pipe() { close(w); }
  bool readEndClosed() const { return write(w, "x", 1) < 0 && errno == EPIPE; }
};

// The features a Linux driver would accept from `device`.
uint64_t acked(virtio::Device& d) { return d.features() | kFProtocolFeatures; }

// Features, protocol features and the memory table, as QEMU sends them before the rings.
void handshake(Backend& b, virtio::Device& d, SharedRam& ram) {
  CHECK(sendU64(b, kSetProtocolFeatures, kPReplyAck | kPMq).ok);
  CHECK(send(b, kSetOwner, nullptr, 0).ok);
  CHECK(sendU64(b, kSetFeatures, acked(d)).ok);
  auto t = memTable({{kGpa, ram.size, kUser, 0}});
  Result r = send(b, kSetMemTable, t.data(), static_cast<uint32_t>(t.size()), {ram.dupFd()});
  CHECK(r.ok);
}

// SET_VRING_NUM/ADDR/BASE then KICK and CALL for queue `q` with the driver's rings, as user addresses.
void setupRing(Backend& b, uint16_t q, const Driver& drv, uint16_t size, int kick, int call, bool enable = true) {
  CHECK(sendState(b, kSetVringNum, q, size).ok);
  VringAddrMsg a{q, 0, drv.desc - kGpa + kUser, drv.used - kGpa + kUser, drv.avail - kGpa + kUser, 0};
  CHECK(send(b, kSetVringAddr, &a, sizeof a).ok);
  CHECK(sendState(b, kSetVringBase, q, 0).ok);
  CHECK(sendU64(b, kSetVringKick, q, {dup(kick)}).ok);
  CHECK(sendU64(b, kSetVringCall, q, {dup(call)}).ok);
  if (enable) CHECK(sendState(b, kSetVringEnable, q, 1).ok);
}

uint64_t drainEventfd(int fd) {
  uint64_t v = 0;
  if (read(fd, &v, 8) != 8) return 0;
  return v;
}

// ---- Backend: the happy path ----

TEST(rng_request_through_shared_memory_with_user_address_translation) {
  SharedRam ram;
  virtio::Rng rng;
  NullNotifier n;
  Backend b(rng, n, "rng", nullptr);
  Result f = send(b, kGetFeatures, nullptr, 0);
  CHECK(f.ok && (replyU64(f.reply) & kFProtocolFeatures) && (replyU64(f.reply) & virtio::kFVersion1));
  Header rh;
  std::memcpy(&rh, f.reply.data(), sizeof rh);
  CHECK(rh.request == kGetFeatures && rh.flags == (kVersion | kFlagReply) && rh.size == 8);
  Result pf = send(b, kGetProtocolFeatures, nullptr, 0);
  CHECK(pf.ok && (replyU64(pf.reply) & kPReplyAck) && !(replyU64(pf.reply) & kPConfig));  // rng has no config space
  Result qn = send(b, kGetQueueNum, nullptr, 0);
  CHECK(qn.ok && replyU64(qn.reply) == 1);
  handshake(b, rng, ram);
  Driver drv(ram.mem, 1024, kRings, kScratch, true);  // QEMU's virtio-mmio lets the guest pick 1024
  int kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  setupRing(b, 0, drv, 1024, kick, call, false);
  CHECK(!b.active());  // protocol features negotiated: the ring waits for SET_VRING_ENABLE
  CHECK(sendState(b, kSetVringEnable, 0, 1).ok);
  CHECK(b.active());
  std::memset(ram.host + (kData - kGpa), 0, 64);
  drv.add({{kData, 64, true}});
  drv.publish();
  uint64_t one = 1;
  CHECK(write(kick, &one, 8) == 8);
  b.kicked(0);
  uint32_t id, len;
  CHECK(drv.getUsed(id, len) && len == 64);
  bool nonzero = false;
  for (int i = 0; i < 64; ++i) nonzero = nonzero || ram.host[kData - kGpa + i] != 0;
  CHECK(nonzero);
  CHECK(drainEventfd(call) >= 1);
  CHECK(drainEventfd(kick) == 0);  // the back-end drained the kick
  // GET_VRING_BASE stops the ring and says where it got to.
  uint32_t s[2] = {0, 0};
  Result gb = send(b, kGetVringBase, s, 8);
  uint32_t state[2] = {9, 9};
  if (gb.reply.size() == 20) std::memcpy(state, gb.reply.data() + 12, 8);
  CHECK(gb.ok && state[0] == 0 && state[1] == 1);
  CHECK(!b.active() && n.watched.empty());
  close(kick);
  close(call);
}

// QEMU keeps virtio-net's config space (MAC, status, MTU) itself and warns on every boot when a
// net back-end offers CONFIG; blk (above) still gets it.
TEST(net_leaves_its_config_space_to_qemu) {
  struct Sink final : virtio::NetBackend {
    void send(const uint8_t*, size_t) override {}
  } sink;
  virtio::Net net(sink, virtio::Net::stableMac("vhost-user-test"), nullptr);
  NullNotifier n;
  Backend b(net, n, "net", nullptr);
  Result pf = send(b, kGetProtocolFeatures, nullptr, 0);
  CHECK(pf.ok && (replyU64(pf.reply) & kPReplyAck) && !(replyU64(pf.reply) & kPConfig));
}

TEST(blk_config_and_write_request) {
  SharedRam ram;
  std::string path = scratchDir + "/vhost-user-test-disk.img";
  int dfd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  CHECK(dfd >= 0 && ftruncate(dfd, 1 << 20) == 0);
  close(dfd);
  auto blk = virtio::Block::open(path, {false, "serial-x"});
  NullNotifier n;
  Backend b(*blk, n, "blk", nullptr);
  Result pf = send(b, kGetProtocolFeatures, nullptr, 0);
  CHECK(replyU64(pf.reply) & kPConfig);
  // GET_CONFIG past the device's 60 bytes (QEMU 7.2's struct is longer): zeros, never an overread.
  uint8_t cfg[12 + 72] = {};
  uint32_t hdr[3] = {0, 72, 0};
  std::memcpy(cfg, hdr, 12);
  Result c = send(b, kGetConfig, cfg, sizeof cfg);
  CHECK(c.ok && c.reply.size() == 12 + sizeof cfg);
  uint64_t capacity = 0;
  if (c.reply.size() >= 32) std::memcpy(&capacity, c.reply.data() + 24, 8);
  CHECK(capacity == 2048);
  bool tailZero = true;
  for (size_t i = 12 + 12 + 60; i < c.reply.size(); ++i) tailZero = tailZero && c.reply[i] == 0;
  CHECK(tailZero);
  handshake(b, *blk, ram);
  Driver drv(ram.mem, 256, kRings, kScratch, true);
  int kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  setupRing(b, 0, drv, 256, kick, call);
  // OUT at sector 1: header, 512 data bytes, status.
  uint64_t req = kData, data = kData + 0x1000, status = kData + 0x2000;
  uint32_t type = 1, reserved = 0;
  uint64_t sector = 1;
  std::memcpy(ram.host + (req - kGpa), &type, 4);
  std::memcpy(ram.host + (req - kGpa) + 4, &reserved, 4);
  std::memcpy(ram.host + (req - kGpa) + 8, &sector, 8);
  std::memset(ram.host + (data - kGpa), 0xab, 512);
  ram.host[status - kGpa] = 0xff;
  drv.add({{req, 16, false}, {data, 512, false}, {status, 1, true}});
  drv.publish();
  b.kicked(0);
  CHECK(ram.host[status - kGpa] == 0);
  uint8_t back[512] = {};
  int rfd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  CHECK(pread(rfd, back, 512, 512) == 512 && back[0] == 0xab && back[511] == 0xab);
  close(rfd);
  close(kick);
  close(call);
  b.disconnect();
  unlink(path.c_str());
}

// ---- Backend: refusals ----

TEST(header_flags_and_sizes_are_checked) {
  virtio::Rng rng;
  NullNotifier n;
  Backend b(rng, n, "rng", nullptr);
  CHECK(!send(b, kGetFeatures, nullptr, 0, {}, 0).ok);                          // version 0
  CHECK(!send(b, kGetFeatures, nullptr, 0, {}, 2).ok);                          // version 2
  CHECK(!send(b, kGetFeatures, nullptr, 0, {}, kVersion | kFlagReply).ok);      // a reply sent as a request
  CHECK(!send(b, kGetFeatures, nullptr, 0, {}, kVersion | (1u << 9)).ok);       // reserved bit
  uint8_t big[kMaxPayload + 8] = {};
  CHECK(!send(b, kSetConfig, big, sizeof big).ok);  // longer than any request
  uint32_t four = 1;
  CHECK(!send(b, kSetFeatures, &four, 4).ok);
  CHECK(!send(b, kGetFeatures, big, 8).ok);
  CHECK(!send(b, kSetOwner, big, 8).ok);
  CHECK(!sendU64(b, kSetFeatures, 1ull << 63).ok);  // not offered
  Result legacy = sendU64(b, kSetFeatures, virtio::kFEventIdx);  // no VERSION_1
  CHECK(!legacy.ok && legacy.error.find("force-legacy=false") != std::string::npos);
  CHECK(!send(b, kSetLogBase, big, 16).ok);  // not offered
  CHECK(!send(b, 999, nullptr, 0).ok);
  CHECK(!sendU64(b, kSetProtocolFeatures, 1ull << 5).ok);  // BACKEND_REQ was not offered
  CHECK(!sendState(b, kSetVringEnable, 0, 1).ok);           // before protocol features
}

TEST(need_reply_gets_an_ack_with_reply_ack) {
  virtio::Rng rng;
  NullNotifier n;
  Backend b(rng, n, "rng", nullptr);
  Result before = send(b, kSetOwner, nullptr, 0, {}, kVersion | kFlagNeedReply);
  CHECK(before.ok && before.reply.empty());  // REPLY_ACK not negotiated yet
  CHECK(sendU64(b, kSetProtocolFeatures, kPReplyAck).ok);
  Result ok = send(b, kSetOwner, nullptr, 0, {}, kVersion | kFlagNeedReply);
  CHECK(ok.ok && replyU64(ok.reply) == 0);
  Result bad = sendState(b, kSetVringNum, 0, 3);
  CHECK(!bad.ok && bad.reply.empty());
  uint32_t s[2] = {0, 3};
  Result badAck = send(b, kSetVringNum, s, 8, {}, kVersion | kFlagNeedReply);
  CHECK(!badAck.ok && replyU64(badAck.reply) == 1);
}

TEST(fds_are_counted_and_always_closed) {
  virtio::Rng rng;
  NullNotifier n;
  Backend b(rng, n, "rng", nullptr);
  Pipe p;
  CHECK(!send(b, kGetFeatures, nullptr, 0, {p.r}).ok);  // GET_FEATURES carries no fd
  CHECK(p.readEndClosed());
  Pipe p2;
  CHECK(!sendU64(b, kSetVringCall, 0, {p2.r}).ok);  // a pipe is not an eventfd
  CHECK(p2.readEndClosed());
  Pipe p3;
  CHECK(!sendU64(b, kSetVringKick, 0 | kVringNoFd, {p3.r}).ok);  // no-fd flag with an fd
  CHECK(p3.readEndClosed());
  CHECK(!sendU64(b, kSetVringKick, 0 | kVringNoFd).ok);  // polling: not supported
  int e = eventfd(0, EFD_CLOEXEC);
  CHECK(!sendU64(b, kSetVringKick, 1, {e}).ok);           // queue 1 does not exist (rng has 1)
  int e2 = eventfd(0, EFD_CLOEXEC);
  CHECK(!sendU64(b, kSetVringKick, 0 | (1ull << 9), {e2}).ok);  // reserved bits
  int e3 = eventfd(0, EFD_CLOEXEC), e4 = eventfd(0, EFD_CLOEXEC);
  CHECK(!sendU64(b, kSetVringCall, 0, {e3, e4}).ok);  // two fds
  CHECK(sendU64(b, kSetVringCall, 0 | kVringNoFd).ok);  // no call fd: allowed
}

TEST(memory_tables_are_checked) {
  virtio::Rng rng;
  NullNotifier n;
  Backend b(rng, n, "rng", nullptr);
  SharedRam ram;
  auto table = [&](std::initializer_list<MemoryRegionMsg> r, std::vector<int> fds) {
    auto t = memTable(r);
    return send(b, kSetMemTable, t.data(), static_cast<uint32_t>(t.size()), fds);
  };
  uint32_t zero[2] = {0, 0};
  CHECK(!send(b, kSetMemTable, zero, 8).ok);  // no regions
  uint8_t nine[8 + 9 * 32] = {};
  nine[0] = 9;
  CHECK(!send(b, kSetMemTable, nine, sizeof nine).ok);  // more than 8
  auto t1 = memTable({{kGpa, kSize, kUser, 0}});
  CHECK(!send(b, kSetMemTable, t1.data(), static_cast<uint32_t>(t1.size() - 1), {ram.dupFd()}).ok);  // size disagrees with count
  CHECK(!table({{kGpa, kSize, kUser, 0}}, {}).ok);                                                    // no fd
  CHECK(!table({{kGpa, kSize, kUser, 0}}, {ram.dupFd(), ram.dupFd()}).ok);                            // two fds
  CHECK(!table({{kGpa, 0, kUser, 0}}, {ram.dupFd()}).ok);                                             // empty
  CHECK(!table({{UINT64_MAX - 4095, 8192, kUser, 0}}, {ram.dupFd()}).ok);                             // gpa wraps
  CHECK(!table({{kGpa, kSize, UINT64_MAX - 100, 0}}, {ram.dupFd()}).ok);                              // user address wraps
  CHECK(!table({{kGpa, kSize, kUser, UINT64_MAX - 10}}, {ram.dupFd()}).ok);                           // offset wraps
  Result tooBig = table({{kGpa, kSize + 4096, kUser, 0}}, {ram.dupFd()});                             // past the file's end
  CHECK(!tooBig.ok && tooBig.error.find("holds") != std::string::npos);
  CHECK(!table({{kGpa, kSize, kUser, 4096}}, {ram.dupFd()}).ok);  // offset + size past the end
  SharedRam unsealed(kSize, false);
  Result us = table({{kGpa, kSize, kUser, 0}}, {unsealed.dupFd()});
  CHECK(!us.ok && us.error.find("sealed") != std::string::npos);
  Pipe p;
  CHECK(!table({{kGpa, kSize, kUser, 0}}, {p.r}).ok);  // not a file
  CHECK(p.readEndClosed());
  // Two regions over the same guest range, or the same front-end range: refused, nothing kept.
  CHECK(!table({{kGpa, 0x100000, kUser, 0}, {kGpa + 0x80000, 0x100000, kUser + 0x200000, 0x100000}}, {ram.dupFd(), ram.dupFd()}).ok);
  CHECK(!table({{kGpa, 0x100000, kUser, 0}, {kGpa + 0x100000, 0x100000, kUser + 0x80000, 0x100000}}, {ram.dupFd(), ram.dupFd()}).ok);
  CHECK(!table({{kGpa + 4, 0x1000, kUser, 0}}, {ram.dupFd()}).ok);  // host and guest disagree modulo 8
  CHECK(b.memory().regions().empty());
  // Two adjacent regions from one file at different offsets: accepted, bytes line up.
  CHECK(table({{kGpa, 0x100000, kUser, 0}, {kGpa + 0x100000, 0x100000, kUser + 0x100000, 0x100000}}, {ram.dupFd(), ram.dupFd()}).ok);
  CHECK(b.memory().regions().size() == 2);
  ram.host[0x100010] = 0x5a;
  uint8_t v = 0;
  CHECK(b.memory().read(kGpa + 0x100010, &v, 1) && v == 0x5a);
  // An unaligned offset is mapped from the page below it.
  CHECK(table({{kGpa + 0x10, 0x1000, kUser, 0x10}}, {ram.dupFd()}).ok);
  ram.host[0x10] = 0x77;
  CHECK(b.memory().read(kGpa + 0x10, &v, 1) && v == 0x77);
}

TEST(vring_addresses_outside_the_table_are_refused) {
  SharedRam ram;
  virtio::Rng rng;
  NullNotifier n;
  Backend b(rng, n, "rng", nullptr);
  handshake(b, rng, ram);
  CHECK(!sendState(b, kSetVringNum, 0, 0).ok);
  CHECK(!sendState(b, kSetVringNum, 0, 100).ok);
  CHECK(!sendState(b, kSetVringNum, 0, 65536).ok);
  CHECK(!sendState(b, kSetVringNum, 1, 64).ok);
  CHECK(!sendState(b, kSetVringBase, 0, 65536).ok);
  CHECK(sendState(b, kSetVringNum, 0, 64).ok);
  // The guest-physical address given where a user address belongs: outside the table.
  VringAddrMsg a{0, 0, kGpa, kGpa + 0x2000, kGpa + 0x1000, 0};
  CHECK(send(b, kSetVringAddr, &a, sizeof a).ok);
  VringAddrMsg badFlags = a;
  badFlags.flags = 2;
  CHECK(!send(b, kSetVringAddr, &badFlags, sizeof badFlags).ok);
  CHECK(sendState(b, kSetVringEnable, 0, 1).ok);
  int kick = eventfd(0, EFD_CLOEXEC);
  Result r = sendU64(b, kSetVringKick, 0, {kick});
  CHECK(!r.ok && r.error.find("outside the memory table") != std::string::npos);
  CHECK(!b.active());
  b.disconnect();
  CHECK(n.watched.empty());
  // Inside the table but the used ring runs past its end.
  handshake(b, rng, ram);
  CHECK(sendState(b, kSetVringNum, 0, 64).ok);
  VringAddrMsg edge{0, 0, kUser, kUser + kSize - 8, kUser + 0x1000, 0};
  CHECK(send(b, kSetVringAddr, &edge, sizeof edge).ok);
  CHECK(sendState(b, kSetVringEnable, 0, 1).ok);
  Result r2 = sendU64(b, kSetVringKick, 0, {eventfd(0, EFD_CLOEXEC)});
  CHECK(!r2.ok && !b.active());
  // A running ring cannot be moved.
  b.disconnect();
  handshake(b, rng, ram);
  Driver drv(ram.mem, 64, kRings, kScratch, true);
  int k = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), c = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  setupRing(b, 0, drv, 64, k, c);
  CHECK(b.active());
  CHECK(!sendState(b, kSetVringNum, 0, 32).ok);
  CHECK(!send(b, kSetVringAddr, &edge, sizeof edge).ok);
  close(k);
  close(c);
}

TEST(config_bounds) {
  virtio::Rng rng;
  NullNotifier n;
  Backend b(rng, n, "rng", nullptr);
  uint8_t buf[12 + 256] = {};
  auto cfg = [&](uint32_t offset, uint32_t size, uint32_t flags, uint32_t payload, uint32_t request) {
    uint32_t h[3] = {offset, size, flags};
    std::memcpy(buf, h, 12);
    return send(b, request, buf, payload);
  };
  CHECK(!cfg(0, 8, 0, 8, kGetConfig).ok);           // shorter than its header
  CHECK(!cfg(0, 8, 0, 12 + 4, kGetConfig).ok);      // size disagrees with the payload
  CHECK(!cfg(250, 8, 0, 12 + 8, kGetConfig).ok);    // past 256
  CHECK(!cfg(0, 257, 0, 12 + 256, kGetConfig).ok);  // more than 256
  CHECK(!cfg(UINT32_MAX, 8, 0, 12 + 8, kGetConfig).ok);
  Result r = cfg(0, 8, 0, 12 + 8, kGetConfig);  // rng has no config: zeros
  CHECK(r.ok && r.reply.size() == 12 + 20);
  CHECK(!cfg(0, 8, 7, 12 + 8, kSetConfig).ok);  // unknown flags
  CHECK(cfg(0, 8, 0, 12 + 8, kSetConfig).ok);   // ignored: nothing writable
}

TEST(mem_table_replaced_under_a_running_device) {
  SharedRam ram;
  virtio::Rng rng;
  NullNotifier n;
  Backend b(rng, n, "rng", nullptr);
  handshake(b, rng, ram);
  Driver drv(ram.mem, 64, kRings, kScratch, true);
  int kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  setupRing(b, 0, drv, 64, kick, call);
  drv.add({{kData, 16, true}});
  drv.publish();
  b.kicked(0);
  uint32_t id, len;
  CHECK(drv.getUsed(id, len) && len == 16);
  // The same RAM again, under a new user address: the device stops, then restarts on the next kick
  // from where it was (base 1), with the rings re-translated.
  auto t = memTable({{kGpa, kSize, kUser, 0}});
  CHECK(send(b, kSetMemTable, t.data(), static_cast<uint32_t>(t.size()), {ram.dupFd()}).ok);
  drv.add({{kData, 16, true}});
  drv.publish();
  b.kicked(0);
  CHECK(drv.getUsed(id, len) && len == 16);
  close(kick);
  close(call);
}

TEST(a_hostile_chain_fails_the_device_and_signals_err) {
  SharedRam ram;
  virtio::Rng rng;
  NullNotifier n;
  std::vector<std::string> logs;
  Backend b(rng, n, "rng", [&](const std::string& m) { logs.push_back(m); });
  handshake(b, rng, ram);
  Driver drv(ram.mem, 64, kRings, kScratch, true);
  int kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), err = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  setupRing(b, 0, drv, 64, kick, call);
  CHECK(sendU64(b, kSetVringErr, 0, {dup(err)}).ok);
  drv.add({{kGpa + kSize - 8, 64, true}});  // runs past guest memory
  drv.publish();
  b.kicked(0);
  CHECK(b.failed());
  CHECK(drainEventfd(err) == 1);
  CHECK(logs.size() == 1);
  b.kicked(0);  // nothing more happens, nothing more is logged
  CHECK(logs.size() == 1);
  // The driver resets the device: GET_VRING_BASE, then the ring again: working.
  uint32_t s[2] = {0, 0};
  CHECK(send(b, kGetVringBase, s, 8).ok);
  CHECK(!b.failed());
  close(kick);
  close(call);
  close(err);
}

// ---- Server: framing over a real socket ----

struct Client {
  int fd = -1;
  explicit Client(const std::string& path) {
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::memcpy(a.sun_path, path.data(), path.size());
    if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) std::abort();
  }
  ~Client() { close(fd); }
  bool sendRaw(const void* data, size_t size, const std::vector<int>& fds = {}) {
    iovec iov{const_cast<void*>(data), size};
    msghdr m{};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 16)];
    if (!fds.empty()) {
      m.msg_control = control;
      m.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
      cmsghdr* c = CMSG_FIRSTHDR(&m);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    return sendmsg(fd, &m, MSG_NOSIGNAL) == static_cast<ssize_t>(size);
  }
  bool request(uint32_t req, const void* payload, uint32_t size, const std::vector<int>& fds = {}) {
    std::string msg(sizeof(Header) + size, '\0');
    Header h{req, kVersion, size};
    std::memcpy(&msg[0], &h, sizeof h);
    if (size) std::memcpy(&msg[sizeof h], payload, size);
    return sendRaw(msg.data(), msg.size(), fds);
  }
  // Reads one reply (2 s at most); "" on EOF or timeout.
  std::string reply() {
    std::string out;
    size_t want = sizeof(Header);
    while (out.size() < want) {
      pollfd p{fd, POLLIN, 0};
      if (poll(&p, 1, 2000) != 1) return "";
      char buf[512];
      ssize_t n = read(fd, buf, want - out.size());
      if (n <= 0) return "";
      out.append(buf, static_cast<size_t>(n));
      if (out.size() == sizeof(Header)) {
        Header h;
        std::memcpy(&h, out.data(), sizeof h);
        want += h.size;
      }
    }
    return out;
  }
  // True when the server closed the connection (within 2 s).
  bool closedByPeer() {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 2000) != 1) return false;
    char c;
    // ECONNRESET when the server closed with our bytes still unread (a message it refused).
    return read(fd, &c, 1) <= 0;
  }
};

// Runs `fn` on the loop thread and waits.
void onLoop(EventLoop& loop, const std::function<void()>& fn) {
  std::promise<void> done;
  loop.post([&] {
    fn();
    done.set_value();
  });
  done.get_future().wait();
}

TEST(server_framing_errors_drop_the_front_end_and_it_may_reconnect) {
  auto loop = EventLoop::create([](const std::string& m) { std::fprintf(stderr, "loop error: %s\n", m.c_str()); });
  virtio::Rng rng;
  std::string path = scratchDir + "/vhost-user-test.sock";
  std::unique_ptr<Server> server;
  std::vector<std::string> logs;
  std::mutex logMu;
  onLoop(*loop, [&] { server = std::make_unique<Server>(*loop, path, rng, "rng", [&](const std::string& m) {
                      std::lock_guard<std::mutex> l(logMu);
                      logs.push_back(m);
                    }); });
  {
    Client c(path);
    CHECK(c.request(kGetFeatures, nullptr, 0));
    std::string r = c.reply();
    CHECK(r.size() == 20 && (replyU64(r) & kFProtocolFeatures));
    // A header split over two writes, the payload in a third.
    Header h{kGetQueueNum, kVersion, 0};
    CHECK(c.sendRaw(&h, 5));
    usleep(20000);
    CHECK(c.sendRaw(reinterpret_cast<char*>(&h) + 5, 7));
    CHECK(replyU64(c.reply()) == 1);
    // A second front-end while this one is connected: refused.
    Client second(path);
    CHECK(second.closedByPeer());
    // A header announcing a 1 MiB payload: dropped before anything is read.
    Header huge{kSetConfig, kVersion, 1 << 20};
    CHECK(c.sendRaw(&huge, sizeof huge));
    CHECK(c.closedByPeer());
  }
  {
    // The next front-end is served; nine fds in one message is one too many.
    Client c(path);
    CHECK(c.request(kGetFeatures, nullptr, 0));
    CHECK(c.reply().size() == 20);
    std::vector<int> fds;
    for (int i = 0; i < 9; ++i) fds.push_back(eventfd(0, EFD_CLOEXEC));
    uint64_t v = 0;
    CHECK(c.request(kSetVringCall, &v, 8, fds));
    for (int fd : fds) close(fd);
    CHECK(c.closedByPeer());
  }
  {
    // A semantic error (a vring for a queue that does not exist): dropped too, with one log line.
    Client c(path);
    uint32_t s[2] = {5, 64};
    CHECK(c.request(kSetVringNum, s, 8));
    CHECK(c.closedByPeer());
  }
  {
    Client c(path);
    CHECK(c.request(kGetFeatures, nullptr, 0));
    CHECK(c.reply().size() == 20);
  }
  onLoop(*loop, [&] {
    CHECK(server->protocolErrors() == 3);
    CHECK(server->connections() == 4);
    server.reset();
  });
  loop->stop();
  std::lock_guard<std::mutex> l(logMu);
  CHECK(logs.size() == 4);  // three drops and one refused second front-end
  CHECK(access(path.c_str(), F_OK) != 0);  // the socket is gone
}

TEST(listen_path_errors_are_one_line) {
  bool threw = false;
  try {
    listenUnix(std::string(200, 'x'));
  } catch (const virtio::DeviceError& e) {
    threw = std::string(e.what()).find("limit is 107") != std::string::npos;
  }
  CHECK(threw);
  threw = false;
  try {
    listenUnix("/nonexistent-dir/x.sock");
  } catch (const virtio::DeviceError& e) {
    threw = std::string(e.what()).find("cannot listen") != std::string::npos;
  }
  CHECK(threw);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) scratchDir = argv[1];
  signal(SIGPIPE, SIG_IGN);  // Pipe::readEndClosed writes to a pipe whose reader may be gone
  return skiff::virtio::testing::runAll();
}
