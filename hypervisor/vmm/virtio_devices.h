// skiff's virtio devices (devices/virtio/) on the native VMM: each on a virtio-mmio slot
// (layout.h), its queue notifications as doorbells (KVM ioeventfd where the backend can), its
// interrupt as an interrupt line (KVM irqfd), its work on the machine's event loop, and a
// virtio_mmio.device= word on the kernel command line.
#pragma once
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

struct VirtioConfig {
  bool rng = false;
  std::vector<VirtioDisk> disks;
  // vsock with guest CID 3 in Firecracker's hybrid model, when not empty: a directory private to
  // the VM (mode 0700) where the machine listens on `<dir>/vsock` for host connections ("CONNECT
  // <port>\n", answered "OK <port>\n" once the guest accepts), and where a guest connection to
  // CID 2 port P goes to the Unix socket `<dir>/vsock_P`.
  std::string vsockDir;
  static constexpr uint64_t kGuestCid = 3;
};

// Devices in this order: rng, the disks, vsock, each on the next free slot. A disk that cannot be
// opened throws (a one-line message naming the file), so the boot fails before any vCPU runs.
DeviceAttach attachVirtio(VirtioConfig config);

}  // namespace skiff
