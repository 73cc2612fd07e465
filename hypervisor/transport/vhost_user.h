// vhost-user, back-end side (QEMU docs/interop/vhost-user.rst): skiff serves one of its virtio
// device models (devices/virtio/) to a front-end, QEMU, over a Unix socket. The front-end shares
// guest memory as file descriptors (memory-backend-memfd,share=on), tells where each virtqueue
// lives, and hands over eventfds for "the driver kicked queue N" and "interrupt the guest".
//
// Three layers, each usable alone:
// - Backend: the protocol state of one device and one front-end. It takes whole messages (header,
//   payload, received fds) and answers them; every size, count, index, address and fd is checked
//   against the spec first, because the front-end is a separate process that is trusted no further
//   than the checks (tests and the fuzz target drive this layer directly).
// - Connection framing (in Server): reads messages with their SCM_RIGHTS fds from a non-blocking
//   socket without ever blocking the event loop.
// - Server: a listening socket on an EventLoop, one front-end at a time; a front-end that breaks
//   the protocol is logged once and disconnected, and the device goes back to its reset state.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "devices/virtio/device.h"
#include "loop/event_loop.h"

namespace skiff {
namespace vhost_user {

// Requests (front-end → back-end) that skiff handles; others are refused.
enum Request : uint32_t {
  kGetFeatures = 1,
  kSetFeatures = 2,
  kSetOwner = 3,
  kResetOwner = 4,
  kSetMemTable = 5,
  kSetLogBase = 6,
  kSetLogFd = 7,
  kSetVringNum = 8,
  kSetVringAddr = 9,
  kSetVringBase = 10,
  kGetVringBase = 11,
  kSetVringKick = 12,
  kSetVringCall = 13,
  kSetVringErr = 14,
  kGetProtocolFeatures = 15,
  kSetProtocolFeatures = 16,
  kGetQueueNum = 17,
  kSetVringEnable = 18,
  kGetConfig = 24,
  kSetConfig = 25,
  kResetDevice = 34,
};

// Header flags: version 1 in the low two bits, then REPLY and NEED_REPLY; the rest are reserved.
constexpr uint32_t kVersion = 1, kVersionMask = 3, kFlagReply = 1u << 2, kFlagNeedReply = 1u << 3;
// The virtio feature bit that says the back-end speaks protocol features.
constexpr uint64_t kFProtocolFeatures = 1ull << 30;
// Protocol feature bits.
constexpr uint64_t kPMq = 1ull << 0, kPReplyAck = 1ull << 3, kPConfig = 1ull << 9, kPResetDevice = 1ull << 13;
constexpr uint64_t kOfferedProtocolFeatures = kPMq | kPReplyAck | kPConfig | kPResetDevice;
// VHOST_MEMORY_BASELINE_NREGIONS: the most regions (and so fds) one SET_MEM_TABLE carries.
constexpr uint32_t kMaxRegions = 8;
constexpr uint32_t kMaxFds = kMaxRegions;
constexpr uint32_t kMaxConfigSize = 256;  // VHOST_USER_MAX_CONFIG_SIZE
constexpr uint32_t kConfigHeaderSize = 12;  // offset, size, flags
// The largest payload of any request skiff accepts (GET/SET_CONFIG with 256 bytes of config);
// a bigger header size is refused before a byte of payload is read.
constexpr uint32_t kMaxPayload = kConfigHeaderSize + kMaxConfigSize;
// SET_VRING_KICK/CALL/ERR payload: queue index in the low byte, bit 8 = no fd (polling).
constexpr uint64_t kVringIndexMask = 0xff, kVringNoFd = 1ull << 8;

struct Header {
  uint32_t request;
  uint32_t flags;
  uint32_t size;
} __attribute__((packed));
static_assert(sizeof(Header) == 12, "vhost-user header is 12 bytes");

struct MemoryRegionMsg {
  uint64_t guestAddr;
  uint64_t size;
  uint64_t userAddr;
  uint64_t mmapOffset;
} __attribute__((packed));
static_assert(sizeof(MemoryRegionMsg) == 32, "vhost-user memory region is 32 bytes");

struct VringAddrMsg {
  uint32_t index;
  uint32_t flags;
  uint64_t desc;  // the order on the wire: descriptor table, used ring, available ring, log
  uint64_t used;
  uint64_t avail;
  uint64_t log;
} __attribute__((packed));
static_assert(sizeof(VringAddrMsg) == 40, "vhost_vring_addr is 40 bytes");

// How the Backend gets its kick fds watched and more work scheduled; the Server maps this onto
// an EventLoop, tests and the fuzz target onto nothing.
class Notifier {
 public:
  virtual ~Notifier() = default;
  // Call Backend::kicked(queue) whenever `fd` is readable, until unwatchKick(fd).
  virtual void watchKick(int fd, uint16_t queue) = 0;
  virtual void unwatchKick(int fd) = 0;
  // Device::process(queue) left work: call Backend::process(queue) again soon, after other work.
  virtual void later(uint16_t queue) = 0;
};

// The protocol state of one device served to one front-end. Single-threaded: every call comes from
// the same thread (the event loop's).
class Backend final : private virtio::Guest {
 public:
  using Log = std::function<void(const std::string& message)>;

  // `device` and `notifier` must outlive the Backend. `name` prefixes log lines ("vhost-user-blk0").
  Backend(virtio::Device& device, Notifier& notifier, std::string name, Log log);
  ~Backend() override;
  Backend(const Backend&) = delete;
  Backend& operator=(const Backend&) = delete;

  // One whole message. The Backend takes the fds (it keeps or closes every one, whatever happens).
  // Appends the reply, if there is one, to `reply` (header and payload, ready to send). Returns
  // false when the front-end broke the protocol: `error` says how, and the caller must drop the
  // connection and call disconnect(); a reply asked for with NEED_REPLY (a failure) may still have
  // been appended and is worth sending first.
  bool handle(const Header& header, const uint8_t* payload, std::vector<int>& fds, std::string& reply, std::string& error);
  // The front-end went away: the device is reset, guest memory unmapped, every fd closed; the
  // Backend is as new, ready for the next front-end.
  void disconnect();

  // The kick fd of `queue` is readable: drain it and process the queue.
  void kicked(uint16_t queue);
  // Process `queue` if the device is running (Notifier::later's callback).
  void process(uint16_t queue);
  // Runs `fn` if the device is running and has not failed (vsock's host-socket readiness);
  // false if it is not.
  bool withDevice(const std::function<void()>& fn);

  bool active() const { return active_; }
  bool failed() const { return failed_; }
  const virtio::MemoryMap& memory() const { return memory_; }
  const std::string& name() const { return name_; }

 private:
  struct Mapping {
    void* base = nullptr;
    size_t length = 0;
    uint64_t userAddr = 0, guestAddr = 0, size = 0;
  };
  struct Ring {
    uint16_t num = 0;
    uint16_t base = 0;  // next available index, from SET_VRING_BASE or saved when the device stops
    uint64_t descUser = 0, usedUser = 0, availUser = 0;  // front-end user addresses
    bool addrSet = false;
    int kick = -1, call = -1, err = -1;
    bool started = false;  // a kick fd was received since the last stop
    bool enabled = false;
  };

  // virtio::Guest
  void usedBuffers(uint16_t queue) override;
  void configChanged() override {}  // no back-end → front-end channel (BACKEND_REQ not offered)
  void fail(const std::string& why) override;

  bool dispatch(const Header& h, const uint8_t* p, std::vector<int>& fds, std::string& reply, std::string& error);
  bool setMemTable(const uint8_t* p, uint32_t size, std::vector<int>& fds, std::string& error);
  bool setVringFd(uint32_t request, uint64_t value, std::vector<int>& fds, std::string& error);
  uint64_t offeredProtocolFeatures() const;
  bool translate(uint64_t userAddr, uint64_t& gpa) const;
  // Starts queue processing where possible: activates the device (and each started, enabled ring)
  // once features and memory are known. False with `error` when a ring's addresses are refused.
  bool reconcile(std::string& error);
  bool startQueue(uint16_t index, std::string& error);
  // Stops the device (rings keep their place in `base`), so memory or rings can change under it.
  void stopDevice();
  void stopRing(uint16_t index);
  // Everything back to the state before the first message but the negotiated protocol features.
  void resetState();
  void unmapAll();
  void closeFd(int& fd);
  bool ringUsable(uint16_t index) const;

  virtio::Device& device_;
  Notifier& notifier_;
  const std::string name_;
  Log log_;

  uint64_t features_ = 0;  // acked by SET_FEATURES
  bool featuresSet_ = false;
  uint64_t protocolFeatures_ = 0;
  // VHOST_USER_F_PROTOCOL_FEATURES is in use: rings then start disabled until SET_VRING_ENABLE.
  bool protocolNegotiated_ = false;
  std::vector<Mapping> mappings_;
  virtio::MemoryMap memory_;
  std::vector<Ring> rings_;
  std::vector<virtio::Queue> queues_;
  bool active_ = false;
  bool failed_ = false;
  uint64_t failures_ = 0;
};

// A listening socket at `path` serving one device on `loop`. Construct and destroy it on the
// loop thread (or before the loop runs anything of it / after the loop stopped).
class Server final : private Notifier {
 public:
  using Log = Backend::Log;
  // Binds `path` (mode 0600; an existing socket file there is replaced). Throws DeviceError.
  Server(EventLoop& loop, const std::string& path, virtio::Device& device, std::string name, Log log);
  ~Server() override;
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  const std::string& path() const { return path_; }
  Backend& backend() { return backend_; }
  // Connections accepted and dropped for breaking the protocol, for tests.
  uint64_t connections() const { return connections_; }
  uint64_t protocolErrors() const { return protocolErrors_; }

 private:
  void watchKick(int fd, uint16_t queue) override;
  void unwatchKick(int fd) override;
  void later(uint16_t queue) override;

  void onAccept();
  void onReadable();
  // Reads what is there; true when a whole message is ready in header_/payload_/fds_.
  bool readMessage(bool& closed, std::string& error);
  void drop(const std::string& why);

  EventLoop& loop_;
  const std::string path_;
  Log log_;
  Backend backend_;
  int listen_ = -1;
  int conn_ = -1;
  Header header_{};
  size_t headerGot_ = 0;
  std::vector<uint8_t> payload_;
  size_t payloadGot_ = 0;
  std::vector<int> fds_;
  std::vector<uint16_t> laterQueued_;  // queues with a process() task posted
  std::shared_ptr<bool> alive_;        // posted tasks check it: the Server may be gone
  uint64_t connections_ = 0, protocolErrors_ = 0;
};

// Binds a Unix stream socket at `path`, mode 0600, listening; throws virtio::DeviceError.
int listenUnix(const std::string& path);

}  // namespace vhost_user
}  // namespace skiff
