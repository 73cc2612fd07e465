// skiff's devices for one QEMU guest, served over vhost-user: each disk, the rng and vsock get a
// vhost-user socket in the VM's runtime directory, all served by one event loop on its own thread.
// vsock's host side follows the hybrid model (Firecracker's): the host reaches a guest port by
// connecting to `<dir>/vsock` and writing "CONNECT <port>\n" (answered "OK <port>\n" once the guest
// accepted), and a guest connection to CID 2 port P reaches a host listener at `<dir>/vsock_P`.
#pragma once
#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace skiff {
namespace vhost_user {

struct ServedDisk {
  std::string path;
  bool readOnly = false;
  std::string serial;
};

struct ServedForward {
  bool udp = false;
  uint16_t hostPort = 0, guestPort = 0;
};

struct ServeConfig {
  // An existing directory only the user can enter (the VM's runtime directory, 0700).
  std::string socketDir;
  std::vector<ServedDisk> disks;
  bool rng = false;
  bool vsock = false;
  uint64_t guestCid = 3;
  // virtio-net behind libslirp (devices/virtio/slirp_backend.h), served as vhost-user-net. QEMU's
  // virtio-net-device keeps the config space itself (MAC, status, MTU), so it must be given
  // netMac too; the back-end moves only the rx/tx queues' frames (QEMU keeps the control queue).
  bool net = false;
  std::array<uint8_t, 6> netMac{};
  std::vector<ServedForward> netForwards;
};

struct ServedSocket {
  std::string kind;  // "blk", "rng", "vsock", "net"
  std::string path;  // the vhost-user socket QEMU connects to
};

class DeviceServer {
 public:
  using Log = std::function<void(const std::string& message)>;
  // Opens the disks, binds every socket and starts the loop thread. Throws virtio::DeviceError
  // (a disk that cannot be opened, a socket path too long, a --publish port that cannot be
  // listened on, net asked of a build without libslirp) or HypervisorError (the OS refused the
  // loop), with nothing left behind.
  static std::unique_ptr<DeviceServer> start(const ServeConfig& config, Log log);
  virtual ~DeviceServer() = default;

  // In config order: disks, then rng, then vsock, then net.
  virtual const std::vector<ServedSocket>& sockets() const = 0;
  // The hybrid vsock listener (`<dir>/vsock`), "" without vsock.
  virtual const std::string& vsockPath() const = 0;
  // CPU seconds the device thread has used so far (benchmarks).
  virtual double cpuSeconds() const = 0;
  // Tears every device down on the loop thread, then ends the thread; sockets are unlinked.
  // Idempotent; the destructor calls it. Takes milliseconds (it waits for the device thread).
  virtual void close() = 0;
};

}  // namespace vhost_user
}  // namespace skiff
