#include "vmm/virtio_devices.h"


#include <cstdio>
#include <cstring>
#include <future>

#include "backend/backend.h"
#include "devices/virtio/blk.h"
#include "devices/virtio/mmio.h"
#include "devices/virtio/net.h"
#include "devices/virtio/rng.h"
#include "devices/virtio/vsock.h"
#include "devices/virtio/vsock_unix.h"
#ifdef SKIFF_SLIRP
#include "devices/virtio/slirp_backend.h"
#endif

namespace skiff {

#ifdef SKIFF_SLIRP
bool netAvailable() { return true; }
#else
bool netAvailable() { return false; }
#endif
const char* const kNoNetMessage = "this skiff's native addon was built without libslirp, so it has no networking: install libslirp-dev and rebuild it (npm run build:addon), or use --network none";

namespace {

using virtio::Mmio;

// One device on one virtio-mmio slot. Members are destroyed in reverse order: the transport, then
// the device (vsock unwatches and closes its sockets; net disconnects from its backend), then what
// the device used (the memory map, the vsock bridge, net's backend). The machine frees this after
// stopping the event loop, which is also when SlirpBackend may go.
class VirtioSlotDevice final : public MmioDevice {
 public:
  VirtioSlotDevice(DeviceHost& host, const VirtioSlot& slot, InterruptLine& irq, std::unique_ptr<virtio::UnixVsockHost> bridge, std::shared_ptr<void> backing,
                   std::unique_ptr<virtio::Device> device)
      : loop_(host.loop()), backing_(std::move(backing)), bridge_(std::move(bridge)), device_(std::move(device)) {
    for (const auto& r : host.memory().regions()) {
      if (!map_.add({r.gpa, r.size, r.host})) throw HypervisorError("virtio: guest memory region at " + std::to_string(r.gpa) + " refused");
    }
    char where[64];
    std::snprintf(where, sizeof where, "skiff: virtio-mmio at 0x%llx: ", static_cast<unsigned long long>(slot.base));
    std::string prefix = where;
    mmio_ = std::make_unique<Mmio>(
        *device_, map_, [&irq](bool level) { if (level) irq.trigger(); },
        [prefix](const std::string& message) { std::fprintf(stderr, "%s%s\n", prefix.c_str(), message.c_str()); },
        // Only a notification the doorbells did not take (another width, say) comes here.
        [this](uint16_t queue) { loop_.post([this, queue] { drain(queue); }); });
  }

  void mmioRead(uint64_t offset, uint8_t* data, uint32_t size) override { mmio_->read(offset, data, size); }
  void mmioWrite(uint64_t offset, const uint8_t* data, uint32_t size) override { mmio_->write(offset, data, size); }

  // The event loop. Work is bounded per call; what is left waits behind the loop's other work.
  void drain(uint16_t queue) {
    if (mmio_->processQueue(queue)) loop_.post([this, queue] { drain(queue); });
  }

  Mmio& mmio() { return *mmio_; }
  virtio::Device& device() { return *device_; }

 private:
  EventLoop& loop_;
  std::shared_ptr<void> backing_;  // what the device uses besides the bridge: net's backend
  std::unique_ptr<virtio::UnixVsockHost> bridge_;
  virtio::MemoryMap map_;
  std::unique_ptr<virtio::Device> device_;
  std::unique_ptr<Mmio> mmio_;
};

VirtioSlotDevice& attachOne(DeviceHost& host, std::unique_ptr<virtio::Device> device, std::unique_ptr<virtio::UnixVsockHost> bridge, std::shared_ptr<void> backing = nullptr) {
  VirtioSlot slot = host.freeVirtioSlot();
  InterruptLine& irq = host.interruptLine(slot.irq);
  uint16_t queues = device->queueCount();
  auto dev = std::make_shared<VirtioSlotDevice>(host, slot, irq, std::move(bridge), std::move(backing), std::move(device));
  host.addMmio(slot.base, slot.size, dev);
  VirtioSlotDevice* d = dev.get();  // the bus holds it until the machine ends, after the loop
  for (uint16_t q = 0; q < queues; q++) host.addDoorbell(slot.base + Mmio::kQueueNotifyOffset, 4, q, [d, q](uint64_t) { d->drain(q); });
  host.appendCmdline(slot.cmdline());
  return *d;
}

}  // namespace

DeviceAttach attachVirtio(VirtioConfig config) {
  return [config = std::move(config)](DeviceHost& host) {
    // Disks first: one that cannot be opened (missing, locked by another VM) fails the boot
    // before anything else is set up.
    std::vector<std::unique_ptr<virtio::Device>> disks;
    for (const auto& d : config.disks) {
      try {
        disks.push_back(virtio::Block::open(d.path, {d.readOnly, d.serial}));
      } catch (const virtio::DeviceError& e) {
        throw virtio::DeviceError(std::string("disk: ") + e.what());
      }
    }
    // The NAT backend next, still before any vCPU runs: a --publish host port that is taken fails
    // the boot here, with the port in the message.
    std::shared_ptr<virtio::NetBackend> netBackend;
    if (config.net.enabled) {
#ifdef SKIFF_SLIRP
      virtio::SlirpBackend::Options options;
      for (const auto& f : config.net.forwards) options.forwards.push_back({f.udp, f.hostPort, f.guestPort});
      netBackend = std::make_shared<virtio::SlirpBackend>(host.loop(), options, [](const std::string& m) { std::fprintf(stderr, "skiff: %s\n", m.c_str()); });
#else
      throw virtio::DeviceError(std::string("net: ") + kNoNetMessage);
#endif
    }
    try {
      if (config.rng) attachOne(host, std::make_unique<virtio::Rng>(), nullptr);
      for (auto& d : disks) attachOne(host, std::move(d), nullptr);
      if (!config.vsockDir.empty()) {
        auto bridge = std::make_unique<virtio::UnixVsockHost>(host.loop(), config.vsockDir);
        virtio::UnixVsockHost* b = bridge.get();
        auto vsock = std::make_unique<virtio::Vsock>(VirtioConfig::kGuestCid, *b);
        virtio::Vsock* v = vsock.get();
        VirtioSlotDevice& d = attachOne(host, std::move(vsock), std::move(bridge));
        Mmio& mmio = d.mmio();
        b->start(*v, [&mmio](const std::function<void()>& fn) { return mmio.withDevice(fn); });
      }
      if (netBackend) {
        auto net = std::make_unique<virtio::Net>(*netBackend, config.net.mac, nullptr);
        virtio::Net* n = net.get();
        VirtioSlotDevice& d = attachOne(host, std::move(net), nullptr, netBackend);
        // Frames for the guest arrive on the loop (slirp's sockets); the rx queue is drained after
        // the handler that brought them, like any other queue work.
        VirtioSlotDevice* dp = &d;
        EventLoop& loop = host.loop();
        n->setWake([dp, &loop] { loop.post([dp] { dp->drain(virtio::Net::kRxQueue); }); });
      }
    } catch (...) {
      // SlirpBackend's handlers run on the loop, which is still running: it must go there.
      if (netBackend) {
        std::promise<void> gone;
        if (host.loop().post([&] {
              netBackend.reset();
              gone.set_value();
            })) {
          gone.get_future().wait();
        }
      }
      throw;
    }
  };
}

}  // namespace skiff
