// vsock's host side on Unix sockets (Firecracker's hybrid model), for both transports: the native
// VMM (virtio-mmio) and the vhost-user device server. In the VM's private directory:
// - host → guest: a listener at `<dir>/vsock` (0600); a host client writes "CONNECT <port>\n" and
//   gets "OK <port>\n" once the guest accepted (EOF if it refused, or no driver is up yet: try
//   again); every byte after the line is the stream's.
// - guest → host: a guest connection to CID 2 port P is connected to a listener at `<dir>/vsock_P`.
// Socket readiness is watched on the transport's event loop.
//
// Threads: the device calls in from the loop thread (queue work, hostReady, hostConnect), and on
// the native VMM also from a vCPU thread when the driver resets the device, holding the
// transport's lock. From there unwatch must not wait for the loop (the loop may be waiting for
// that lock in a handler): it posts the removal. A generation per socket keeps a late removal, or
// a handler already collected, from acting on a newer registration of a reused descriptor number.
// While a socket stays watched its interest changes by EventLoop::modify (one epoll_ctl), not by
// a remove and an add.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>

#include "devices/virtio/vsock.h"
#include "loop/event_loop.h"

namespace skiff {
namespace virtio {

class UnixVsockHost final : public VsockHost {
 public:
  static constexpr size_t kMaxHandshakes = 64;  // host connections still sending their line
  static constexpr size_t kMaxLine = 32;        // "CONNECT 4294967295\n" is 19

  // Runs fn with the device if it is running (not reset, not failed) and says whether it ran: the
  // transport's serialization (Mmio::withDevice, vhost_user::Backend::withDevice).
  using WithDevice = std::function<bool(const std::function<void()>& fn)>;

  UnixVsockHost(EventLoop& loop, std::string dir);
  ~UnixVsockHost() override;  // close()
  UnixVsockHost(const UnixVsockHost&) = delete;
  UnixVsockHost& operator=(const UnixVsockHost&) = delete;

  // Listens on path() and starts accepting. `vsock` and what `withDevice` reaches must stay until
  // close(). Throws DeviceError (a path too long, the directory refused the socket).
  void start(Vsock& vsock, WithDevice withDevice);
  // Stops listening (the socket file is removed) and drops handshakes in progress. On the loop
  // thread, or after the loop stopped. Idempotent.
  void close();
  const std::string& path() const { return path_; }

  // VsockHost
  int connect(uint32_t port) override;
  void connected(int fd, bool accepted) override;
  void watch(int fd, bool readable, bool writable) override;
  void unwatch(int fd) override;

 private:
  bool current(int fd, uint64_t gen);
  bool currentLocked(int fd, uint64_t gen) const;  // mu_ held
  void ready(int fd, uint64_t gen, uint32_t ev);
  void removeRegistration(int fd);
  void acceptAll();
  void dropHandshake(int fd);
  void handshake(int fd);
  static bool parseConnect(const std::string& line, uint32_t& port);

  EventLoop& loop_;
  const std::string dir_;
  const std::string path_;
  Vsock* vsock_ = nullptr;
  WithDevice withDevice_;
  int listener_ = -1;
  std::map<int, std::string> handshakes_;  // loop thread only
  std::mutex mu_;
  std::map<int, uint64_t> gen_;  // a watched socket's generation, from its first watch to unwatch
  uint64_t nextGen_ = 1;
  // What the loop has registered for a descriptor: the generation its handler was made for and the
  // events now asked for (which the handler reads: a modify keeps the handler).
  struct Registration {
    uint64_t gen;
    uint32_t events;
  };
  std::map<int, Registration> registered_;
  std::map<int, uint32_t> pendingOk_;  // host-initiated streams the guest has not answered yet
};

}  // namespace virtio
}  // namespace skiff
