// virtio-vsock (virtio 1.2 §5.10), stream sockets, with the host side in the VMM (Firecracker's
// hybrid model): a guest connection to host port P becomes a host stream socket the machine opens
// (VsockHost::connect, a Unix socket in practice), and a host stream handed over with
// hostConnect() becomes a connection to a guest port. Data moves between those sockets and guest
// memory under the protocol's credit flow control; the guest is held to it, never trusted.
//
// Queues: 0 rx (device → driver), 1 tx (driver → device), 2 event (unused: no transport resets).
// Threading: process() comes through the transport; hostReady() and hostConnect() must be called
// through the transport's serialization too (Mmio::withDevice), on the same device thread.
#pragma once
#include <sys/uio.h>

#include <array>
#include <cstdint>
#include <deque>
#include <map>
#include <string>

#include "devices/virtio/device.h"

namespace skiff {
namespace virtio {

// What vsock needs from the machine's event loop and host endpoints.
class VsockHost {
 public:
  virtual ~VsockHost() = default;
  // The guest connects to host port `port`: a connected, non-blocking stream socket (the device
  // owns and closes it), or -1 to refuse (the guest sees the connection reset).
  virtual int connect(uint32_t port) = 0;
  // A host connection from hostConnect() was accepted (true) or refused (false) by the guest; on
  // false the device closes `fd` right after this call.
  virtual void connected(int fd, bool accepted) = 0;
  // Readiness interest for a socket the device owns; the loop then calls Vsock::hostReady(fd)
  // (level-triggered: again while the condition holds and the interest stands).
  virtual void watch(int fd, bool readable, bool writable) = 0;
  // No more interest; called before the device closes `fd`.
  virtual void unwatch(int fd) = 0;
};

class Vsock final : public Device {
 public:
  static constexpr uint16_t kQueueSize = 128;
  static constexpr uint64_t kHostCid = 2;
  // Receive buffer announced per connection (buf_alloc): guest data the device holds at most while
  // the host socket is slow.
  static constexpr uint32_t kBufAlloc = 256 * 1024;
  static constexpr uint32_t kMaxPayload = 64 * 1024;  // Linux's largest packet
  static constexpr size_t kMaxConnections = 1024;
  static constexpr size_t kMaxControl = 256;  // replies queued for rx before tx is held back
  static constexpr uint32_t kHostPortBase = 1u << 30;  // host-side ports of host-initiated streams

  // Operations and header fields (§5.10.6).
  static constexpr uint16_t kOpRequest = 1, kOpResponse = 2, kOpRst = 3, kOpShutdown = 4, kOpRw = 5, kOpCreditUpdate = 6, kOpCreditRequest = 7;
  static constexpr uint16_t kTypeStream = 1;
  static constexpr uint32_t kShutdownRecv = 1, kShutdownSend = 2;
  struct Header {
    uint64_t srcCid, dstCid;
    uint32_t srcPort, dstPort, len;
    uint16_t type, op;
    uint32_t flags, bufAlloc, fwdCnt;
  } __attribute__((packed));
  static_assert(sizeof(Header) == 44, "virtio_vsock_hdr is 44 bytes");

  // guestCid >= 3 (0-2 are reserved); the machine validates it. `host` must outlive the device
  // (the destructor closes the sockets it still owns and tells `host`).
  Vsock(uint64_t guestCid, VsockHost& host);
  ~Vsock() override;

  DeviceType type() const override { return kVsock; }
  uint64_t features() const override { return kFVersion1 | kFEventIdx | kFIndirectDesc; }
  uint16_t queueCount() const override { return 3; }
  uint16_t queueMaxSize(uint16_t) const override { return kQueueSize; }
  uint32_t configSize() const override { return 8; }
  void readConfig(uint32_t offset, uint8_t* data, uint32_t size) const override;
  void writeConfig(uint32_t, const uint8_t*, uint32_t) override {}
  void activate(const MemoryMap& memory, std::vector<Queue>& queues, uint64_t features, Guest& guest) override;
  bool process(uint16_t queue) override;
  void reset() override;

  // The event loop: `fd` (a socket this device owns) is readable and/or writable, as watched.
  void hostReady(int fd, bool readable, bool writable);
  // The host opens a stream to guest port `guestPort`; the device owns `fd` from here on (it is
  // closed if the guest refuses, or at once, returning false, when the device cannot take it).
  bool hostConnect(int fd, uint32_t guestPort);

  size_t connectionCount() const { return conns_.size(); }

 private:
  struct Conn {
    int fd = -1;
    uint32_t hostPort = 0, guestPort = 0;
    bool established = false;  // false: host-initiated, REQUEST sent, awaiting RESPONSE
    bool mayRead = false;      // the host socket may have data: try it when credit and buffers allow
    bool hostEof = false;      // host closed its side; SHUTDOWN sent
    bool guestShutRecv = false, guestShutSend = false;
    bool closing = false;      // guest shut both ways: flush pending to the host, then RST and close
    bool watchRead = false, watchWrite = false;
    std::string pending;       // guest data the host socket has not taken yet (<= kBufAlloc)
    uint32_t fwdCnt = 0;       // guest bytes handed to the host socket
    uint32_t fwdCntSent = 0;   // fwd_cnt in the last packet the guest got from us
    bool creditUpdateQueued = false;  // a CREDIT_UPDATE of creditUpdate() waits in control_
    uint32_t rxCnt = 0;        // guest bytes received (flow control check)
    uint32_t txCnt = 0;        // bytes sent to the guest
    uint32_t peerBufAlloc = 0, peerFwdCnt = 0;
  };
  struct Control {
    uint32_t hostPort, guestPort;
    uint16_t op;
    uint32_t flags;
  };
  static uint64_t key(uint32_t hostPort, uint32_t guestPort) { return (uint64_t(hostPort) << 32) | guestPort; }

  bool processTx();
  void fillRx();
  bool handleTx(const Chain& chain, std::string& why);
  void onRw(Conn& c, Cursor& in, uint32_t len);
  void flushPending(Conn& c);
  void creditUpdate(Conn& c);
  uint32_t credit(const Conn& c) const;
  void queueControl(uint32_t hostPort, uint32_t guestPort, uint16_t op, uint32_t flags = 0);
  Header header(uint32_t hostPort, uint32_t guestPort, uint16_t op, uint32_t flags, uint32_t len);
  void updateWatch(Conn& c);
  void close(uint64_t k, bool reset);
  bool sendable(const Conn& c) const;

  const uint64_t guestCid_;
  VsockHost& host_;
  const MemoryMap* memory_ = nullptr;
  std::vector<Queue>* queues_ = nullptr;
  Guest* guest_ = nullptr;
  std::map<uint64_t, Conn> conns_;
  std::map<int, uint64_t> byFd_;
  std::deque<Control> control_;
  uint32_t nextHostPort_ = kHostPortBase;
  // Rx buffers popped but not yet filled, in ring order: one host-socket read fills several of
  // them (one readv instead of one per 4 KiB buffer), and buffers popped for data that turned out
  // not to be there yet (EAGAIN) are kept for the next packets instead of being returned empty.
  static constexpr size_t kRxBatch = 64;
  Chain& held(size_t i) { return rxHeld_[(rxHeldFirst_ + i) % kRxBatch]; }
  enum class Hold { kHeld, kNone, kFailed };
  Hold holdRx(bool arm);
  void deliver(const Header& h);
  std::array<Chain, kRxBatch> rxHeld_;
  size_t rxHeldFirst_ = 0, rxHeldCount_ = 0;
  uint32_t rxHeldGeneration_ = 0;
  std::vector<iovec> iov_;  // reused by fillRx and onRw (no allocation per packet)
};

}  // namespace virtio
}  // namespace skiff
