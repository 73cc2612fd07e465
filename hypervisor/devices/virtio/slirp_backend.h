// A NetBackend on libslirp (the user-mode TCP/IP stack QEMU, podman and slirp4netns use): rootless
// NAT from the guest to the host's network, with no privileges, TAP device or bridge.
//
// The guest's view (libslirp's usual addresses, set explicitly here):
//   network 10.0.2.0/24, guest 10.0.2.15 (also the first DHCP lease), gateway 10.0.2.2 (also the
//   host: a connection to 10.0.2.2:P reaches 127.0.0.1:P on the host), DNS 10.0.2.3 (forwarded to
//   the host's resolver). IPv4 only for now.
// Host forwards (`--publish HOSTPORT:GUESTPORT[/udp]`) listen on 127.0.0.1:HOSTPORT and connect to
// 10.0.2.15:GUESTPORT in the guest.
//
// Threading: everything runs on the machine's event loop thread: the constructor may run
// elsewhere (it registers with the loop before anything can fire), then send()/flush() come from
// Net::process and the fd and timer handlers from the loop. Destroy it after the loop stopped, or
// on the loop thread.
//
// Built when SKIFF_SLIRP is defined (and linked with -lslirp); hosts without libslirp leave it out.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "devices/virtio/net.h"
#include "loop/event_loop.h"

struct Slirp;

namespace skiff {
namespace virtio {

class SlirpBackend final : public NetBackend {
 public:
  static constexpr const char* kNetwork = "10.0.2.0";
  static constexpr const char* kNetmask = "255.255.255.0";
  static constexpr const char* kGuest = "10.0.2.15";
  static constexpr const char* kGateway = "10.0.2.2";
  static constexpr const char* kDns = "10.0.2.3";

  struct Forward {
    bool udp = false;
    uint16_t hostPort = 0;   // on 127.0.0.1; 1-65535 (validated by the caller)
    uint16_t guestPort = 0;  // on 10.0.2.15
  };
  // The MTU skiff's NAT uses, on both engines (the native Net announces mtu(); src/vm/qemu.ts
  // passes the same number to QEMU as host_mtu). libslirp's largest (IF_MTU_MAX/IF_MRU_MAX), so TCP moves
  // in segments of up to 64 KiB rather than 1460 bytes: fewer frames, host socket calls and
  // wake-ups per byte. With its Ethernet header a frame is 65535 bytes, within Net::kMaxFrame.
  static constexpr uint16_t kMtu = 65521;

  struct Options {
    std::vector<Forward> forwards;
    uint16_t mtu = kMtu;
    std::string hostname;  // offered by DHCP; empty: none
  };
  using Log = std::function<void(const std::string& message)>;

  // Throws DeviceError when libslirp refuses, or a forward cannot listen (the port is taken).
  SlirpBackend(EventLoop& loop, const Options& options, Log log);
  ~SlirpBackend() override;
  SlirpBackend(const SlirpBackend&) = delete;
  SlirpBackend& operator=(const SlirpBackend&) = delete;

  // NetBackend (the device thread = the loop thread).
  void send(const uint8_t* frame, size_t len) override;
  void flush() override;
  uint16_t mtu() const override { return mtu_; }
  // libslirp 4.x's slirp_input reads the ethertype once, then copies an IPv4/IPv6 frame into an
  // mbuf with one memcpy before it parses anything; an ARP frame it parses in place, at fixed
  // offsets checked against len. A frame the guest rewrites meanwhile is garbage, never a read
  // outside [frame, frame + len).
  bool takesGuestMemory() const override { return true; }

  // Guest misbehaviour libslirp reported (the first is logged).
  uint64_t guestErrors() const { return guestErrors_; }

  // What the destructor gives drainToHost: bytes the guest sent just before it stopped (slirp has
  // acknowledged them, so the guest counts them as sent) still reach the host program, unless it
  // stops reading for kDrainIdleMs or the whole drain takes kDrainMs.
  static constexpr int64_t kDrainMs = 5000, kDrainIdleMs = 500;
  // Writes what libslirp still holds for host sockets, without the loop, until nothing is left
  // (true) or it gives up (false). For shutdown: the guest is gone or stopped.
  bool drainToHost(int64_t budgetMs, int64_t idleMs);

 private:
  struct Timer;
  struct Callbacks;
  friend struct Callbacks;

  // Re-reads libslirp's poll set and next timeout, and brings the loop's registrations and the
  // timer in line with them. After every entry into libslirp.
  void update();
  // The loop said `fd` is ready for `events` (IoEvent bits): libslirp handles that socket.
  void onReady(int fd, uint32_t events);
  // One poll(2) of libslirp's sockets (fill_) for the events in `mask`, waiting up to timeoutMs,
  // then libslirp's pass over the result (a timer is due, or drainToHost). poll's count.
  int pollOnce(short mask, int timeoutMs);
  void onTimer();
  void unwatch(int fd);

  EventLoop& loop_;
  Log log_;
  uint16_t mtu_;
  Slirp* slirp_ = nullptr;
  int timerFd_ = -1;
  int64_t armedMs_ = INT64_MAX;  // the timerfd's deadline (CLOCK_MONOTONIC ms); INT64_MAX: none
  std::map<int, uint32_t> watched_;  // fd -> IoEvent bits registered with the loop
  std::vector<std::pair<int, uint32_t>> want_;  // update()'s scratch: fd -> IoEvent bits libslirp asks for
  struct PollFd {
    int fd;
    short events, revents;
  };
  std::vector<PollFd> fill_;  // the last slirp_pollfds_fill, indexed as libslirp knows them
  std::vector<std::unique_ptr<Timer>> timers_;
  uint64_t guestErrors_ = 0;
};

}  // namespace virtio
}  // namespace skiff
