// skiff's virtio devices (devices/virtio/) on the native VMM: each on a virtio-mmio slot
// (layout.h), its queue notifications as doorbells (KVM ioeventfd where the backend can), its
// interrupt as an interrupt line (KVM irqfd), its work on the machine's event loop, and a
// virtio_mmio.device= word on the kernel command line.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "vmm/device_host.h"

namespace skiff {

struct VirtioDisk {
  std::string path;
  bool readOnly = false;
  std::string serial;  // GET_ID, up to 20 bytes
};

// A virtio-net NIC behind libslirp (devices/virtio/slirp_backend.h): rootless NAT, DNS, and host
// forwards 127.0.0.1:hostPort -> guest:guestPort.
struct VirtioNet {
  bool enabled = false;
  std::array<uint8_t, 6> mac{};
  struct Forward {
    bool udp = false;
    uint16_t hostPort = 0, guestPort = 0;
  };
  std::vector<Forward> forwards;
};

// Whether this build has libslirp (SKIFF_SLIRP): without it a VirtioNet cannot be attached.
bool netAvailable();
// The one-line reason a network cannot be had from this build.
extern const char* const kNoNetMessage;

struct VirtioConfig {
  bool rng = false;
  std::vector<VirtioDisk> disks;
  // vsock with guest CID 3 in Firecracker's hybrid model, when not empty: a directory private to
  // the VM (mode 0700) where the machine listens on `<dir>/vsock` for host connections ("CONNECT
  // <port>\n", answered "OK <port>\n" once the guest accepts), and where a guest connection to
  // CID 2 port P goes to the Unix socket `<dir>/vsock_P`.
  std::string vsockDir;
  static constexpr uint64_t kGuestCid = 3;
  VirtioNet net;
};

// Devices in this order: rng, the disks, vsock, net, each on the next free slot (net last, so the
// others keep the slots they have without it). A disk that cannot be opened, or a --publish host
// port that cannot be listened on, throws (a one-line message), so the boot fails before any vCPU
// runs.
DeviceAttach attachVirtio(VirtioConfig config);

}  // namespace skiff
