// virtio-net (virtio 1.2 §5.1): one receive and one transmit queue, no control queue, no offloads.
// The device moves Ethernet frames between guest memory and a NetBackend (slirp_backend.h in a
// machine; a socketpair or a test's own in a test). It offers:
// - MAC: a stable, locally administered address (Net::stableMac), so the guest's address, and the
//   host forwards that target it, survive reboots.
// - STATUS, link always up; MTU, the backend's (so the guest never sends what the backend drops).
// - MRG_RXBUF: with it Linux posts small, page-fragment rx buffers and the device spreads a frame
//   over as many as it needs; without it every rx buffer must hold a whole frame. Offered because
//   it is Linux's cheapest rx mode and what a larger MTU or receive offloads will need later; the
//   device also works without it (the driver chooses).
//
// Queues: 0 receive (device → driver), 1 transmit (driver → device).
// Threading: process(), activate() and reset() come through the transport (serialized with it).
// receive() may be called from any thread at any time: it only appends to a bounded inbox and asks
// for process(0) through the `wake` callback; the frames go into guest buffers on the device
// thread. The backend's send() is called on the device thread, from process().
#pragma once
#include <array>
#include <atomic>
#include <sys/uio.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "devices/virtio/device.h"

namespace skiff {
namespace virtio {

// Where a backend hands frames for the guest (Net implements it).
class NetReceiver {
 public:
  virtual ~NetReceiver() = default;
  // One Ethernet frame, copied before return. False when it was dropped (counted by the receiver).
  virtual bool receive(const uint8_t* frame, size_t len) = 0;
};

// The host side of a NIC.
class NetBackend {
 public:
  virtual ~NetBackend() = default;
  // One Ethernet frame from the guest, without the virtio header, valid only during the call. The
  // backend may deliver frames for the guest (a reply) from inside this call.
  virtual void send(const uint8_t* frame, size_t len) = 0;
  // The end of a batch of send() calls (one process() call): a backend that re-arms host state
  // after guest input (slirp's poll set) does it once here rather than per frame.
  virtual void flush() {}
  // The largest IP packet (MTU) the backend carries; the device announces it to the guest.
  virtual uint16_t mtu() const { return 1500; }
  // True when send() may be handed the frame where it lies in guest memory, which another vCPU
  // can rewrite during the call: the backend never relies on reading a byte twice (it copies what
  // it parses first, or parses at fixed offsets within len). Net then skips its own copy of a
  // frame that lies in one host span. False: send() always gets a private copy.
  virtual bool takesGuestMemory() const { return false; }

  // Where frames for the guest go; Net connects itself on construction and disconnects when
  // destroyed. Null: frames are dropped.
  void connect(NetReceiver* receiver) { receiver_.store(receiver); }

 protected:
  bool deliver(const uint8_t* frame, size_t len) {
    NetReceiver* r = receiver_.load();
    return r != nullptr && r->receive(frame, len);
  }

 private:
  std::atomic<NetReceiver*> receiver_{nullptr};
};

class Net final : public Device, public NetReceiver {
 public:
  static constexpr uint16_t kQueueSize = 256;
  static constexpr uint16_t kRxQueue = 0, kTxQueue = 1;

  // Device feature bits (§5.1.3).
  static constexpr uint64_t kFMtu = 1ull << 3, kFMac = 1ull << 5, kFMrgRxbuf = 1ull << 15, kFStatus = 1ull << 16;
  static constexpr uint16_t kStatusLinkUp = 1;

  // struct virtio_net_hdr as VERSION_1 defines it: always 12 bytes, num_buffers included.
  struct Header {
    uint8_t flags;
    uint8_t gsoType;
    uint16_t hdrLen, gsoSize, csumStart, csumOffset, numBuffers;
  } __attribute__((packed));
  static_assert(sizeof(Header) == 12, "virtio_net_hdr (VERSION_1) is 12 bytes");
  static constexpr uint8_t kHdrNeedsCsum = 1;
  static constexpr uint8_t kGsoNone = 0;

  // Frames outside [kMinFrame, kMaxFrame] are dropped (counted), in both directions: an Ethernet
  // header at least, and at most what a 64 KiB IP packet plus Ethernet and VLAN headers make.
  static constexpr uint32_t kMinFrame = 14;
  static constexpr uint32_t kMaxFrame = 14 + 4 + 65535;
  // Frames held for the guest while it has no rx buffers; more are dropped (counted). TCP through
  // the backend retransmits, as it would over a congested link.
  static constexpr size_t kMaxPendingFrames = 512;
  static constexpr size_t kMaxPendingBytes = 2u << 20;

  // Counters, readable from any thread.
  struct Stats {
    uint64_t txFrames, txBytes, txDropped;  // guest → backend; dropped: outside the frame limits
    uint64_t rxFrames, rxBytes, rxDropped;  // backend → guest; dropped: inbox full, or reset
  };

  // Asks the transport to call process(kRxQueue) on the device thread soon (the native VMM posts
  // Mmio::processQueue to its loop; vhost-user its Backend::process). Called from receive(), never
  // from inside process(); it may be null (a test calling process itself).
  using Wake = std::function<void()>;

  // `backend` must outlive the device; the device connects itself to it.
  Net(NetBackend& backend, const std::array<uint8_t, 6>& mac, Wake wake);
  ~Net() override;

  // A locally administered unicast MAC that depends only on `seed` (the machine's name, say):
  // 02:xx:xx:xx:xx:xx with the rest from a hash of it.
  static std::array<uint8_t, 6> stableMac(const std::string& seed);

  DeviceType type() const override { return kNet; }
  uint64_t features() const override { return kFVersion1 | kFEventIdx | kFIndirectDesc | kFMac | kFStatus | kFMtu | kFMrgRxbuf; }
  uint16_t queueCount() const override { return 2; }
  uint16_t queueMaxSize(uint16_t) const override { return kQueueSize; }
  uint32_t configSize() const override { return sizeof config_; }
  void readConfig(uint32_t offset, uint8_t* data, uint32_t size) const override;
  void writeConfig(uint32_t, const uint8_t*, uint32_t) override {}  // the MAC is read-only in 1.x
  void activate(const MemoryMap& memory, std::vector<Queue>& queues, uint64_t features, Guest& guest) override;
  bool process(uint16_t queue) override;
  void reset() override;

  // NetReceiver: a frame from the backend for the guest. Any thread.
  bool receive(const uint8_t* frame, size_t len) override;

  // Replaces the wake callback (the transport often exists only after the device: its wake can be
  // set once it does). Any thread.
  void setWake(Wake wake);

  Stats stats() const;
  size_t pendingFrames() const;

 private:
  // virtio_net_config up to mtu (§5.1.4): mac, status, max_virtqueue_pairs, mtu.
  struct Config {
    uint8_t mac[6];
    uint16_t status;
    uint16_t maxVirtqueuePairs;
    uint16_t mtu;
  } __attribute__((packed));

  bool handleTx(const Chain& chain, std::string& why);
  // Frames from the inbox into rx buffers; true when the per-call budget ran out.
  bool flushRx();
  // Pops rx chains into held_ until they hold `need` bytes; false when the guest has not posted
  // enough yet (or the device failed: failed_).
  bool gather(uint64_t need);
  void failDevice(const std::string& why);
  void callWake();

  NetBackend& backend_;
  Wake wake_;  // guarded by inboxMu_; called (a copy) without it
  Config config_{};
  const MemoryMap* memory_ = nullptr;
  std::vector<Queue>* queues_ = nullptr;
  Guest* guest_ = nullptr;
  bool mergeable_ = false;
  bool failed_ = false;
  std::vector<uint8_t> txCopy_;  // a frame copied out of guest memory for send()
  std::vector<iovec> txSpan_;    // where a frame lies in guest memory, for a backend that takes it there

  // rx chains popped for a frame that needs more of them (MRG_RXBUF), kept for the next call;
  // dropped if the queue was reset and set up again meanwhile (generation).
  std::vector<Chain> held_;
  uint64_t heldBytes_ = 0;
  uint32_t heldGeneration_ = 0;

  // The inbox: frames from the backend not yet in guest buffers. Only the device thread pops.
  mutable std::mutex inboxMu_;
  std::deque<std::vector<uint8_t>> inbox_;
  size_t inboxBytes_ = 0;
  // Buffers of frames already in guest memory, kept for the next ones: no malloc and free per
  // frame (a few per cent of the device thread in a download, perf). At most kSpareBuffers of them
  // (≤ 1 MiB with 64 KiB frames).
  static constexpr size_t kSpareBuffers = 16;
  std::vector<std::vector<uint8_t>> spare_;
  bool inProcess_ = false;      // process() is running; it flushes the inbox before it returns
  bool arrived_ = false;        // a frame arrived (from another thread) after its last flush
  bool wakeRequested_ = false;  // wake_ was called and process(kRxQueue) has not run since

  std::atomic<uint64_t> txFrames_{0}, txBytes_{0}, txDropped_{0}, rxFrames_{0}, rxBytes_{0}, rxDropped_{0};
};

}  // namespace virtio
}  // namespace skiff
