#include "vmm/virtio_devices.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>

#include "backend/backend.h"
#include "devices/virtio/blk.h"
#include "devices/virtio/mmio.h"
#include "devices/virtio/rng.h"
#include "devices/virtio/vsock.h"

namespace skiff {
namespace {

using virtio::Mmio;

std::string errnoText(const std::string& call) { return call + ": " + std::strerror(errno); }

bool unixAddress(const std::string& path, sockaddr_un& addr) {
  std::memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return false;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return true;
}

// The host side of vsock (virtio::VsockHost) on Unix sockets in the VM's directory, with the
// readiness of the device's sockets watched on the machine's event loop.
//
// Threads: the device calls in from the loop thread (queue work, hostReady, hostConnect), and from
// a vCPU thread when the driver resets it, holding the transport's lock. From there unwatch must
// not wait for the loop (the loop may be waiting for that lock in a handler): it posts the removal.
// A generation per socket keeps a late removal, or a handler already collected, from acting on a
// newer registration of a reused descriptor number.
class VsockBridge final : public virtio::VsockHost {
 public:
  static constexpr size_t kMaxHandshakes = 64;
  static constexpr size_t kMaxLine = 32;  // "CONNECT 4294967295\n" is 19

  VsockBridge(EventLoop& loop, std::string dir) : loop_(loop), dir_(std::move(dir)) {}

  ~VsockBridge() override {
    // The machine stopped the loop before freeing devices; removals no longer wait.
    if (listener_ >= 0) {
      loop_.remove(listener_);
      ::close(listener_);
      ::unlink(listenPath().c_str());
    }
    for (auto& h : handshakes_) {
      loop_.remove(h.first);
      ::close(h.first);
    }
  }

  std::string listenPath() const { return dir_ + "/vsock"; }

  // Listens on <dir>/vsock. The device (and its transport) must outlive nothing here but the
  // bridge itself is destroyed after the device: the loop is stopped by then.
  void start(Mmio& mmio, virtio::Vsock& vsock) {
    mmio_ = &mmio;
    vsock_ = &vsock;
    sockaddr_un addr;
    if (!unixAddress(listenPath(), addr)) throw HypervisorError("vsock: socket path too long: " + listenPath());
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) throw HypervisorError(errnoText("vsock: socket"));
    ::unlink(addr.sun_path);  // a stale socket from a VM that died with this directory
    if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0 || ::chmod(addr.sun_path, 0600) < 0 || ::listen(fd, 64) < 0) {
      std::string why = errnoText("vsock: listening on " + listenPath());
      ::close(fd);
      throw HypervisorError(why);
    }
    listener_ = fd;
    loop_.add(fd, kReadable, [this](uint32_t) { acceptAll(); });
  }

  int connect(uint32_t port) override {
    sockaddr_un addr;
    if (!unixAddress(dir_ + "/vsock_" + std::to_string(port), addr)) return -1;
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    // A Unix stream connect completes at once or fails (EAGAIN: the listener's backlog is full);
    // either way the guest gets its answer now.
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0) {
      ::close(fd);
      return -1;
    }
    return fd;
  }

  void connected(int fd, bool accepted) override {
    uint32_t port;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = pendingOk_.find(fd);
      if (it == pendingOk_.end()) return;
      port = it->second;
      pendingOk_.erase(it);
    }
    if (!accepted) return;  // the device closes fd: the host sees EOF instead of "OK"
    // The first bytes on a fresh socket: the buffer has room; a peer that went away gets EPIPE
    // here and a reset from the device's next read.
    std::string ok = "OK " + std::to_string(port) + "\n";
    (void)!::send(fd, ok.data(), ok.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  }

  void watch(int fd, bool readable, bool writable) override {
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lock(mu_);
      gen = nextGen_++;
      gen_[fd] = gen;
    }
    auto apply = [this, fd, gen, readable, writable] {
      if (!current(fd, gen)) return;
      loop_.remove(fd);
      uint32_t events = (readable ? kReadable : 0u) | (writable ? kWritable : 0u);
      if (events) loop_.add(fd, events, [this, fd, gen, readable, writable](uint32_t ev) { ready(fd, gen, readable, writable, ev); });
    };
    if (loop_.onLoopThread()) apply();
    else loop_.post(apply);
  }

  void unwatch(int fd) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      gen_.erase(fd);
    }
    if (loop_.onLoopThread()) {
      loop_.remove(fd);
      return;
    }
    // Not waiting (see above). The descriptor is closed right after this: epoll forgets it then,
    // and the loop's own record goes when the task runs, unless the number was watched again.
    auto task = [this, fd] {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (gen_.count(fd)) return;
      }
      loop_.remove(fd);
    };
    if (!loop_.post(task)) loop_.remove(fd);  // the loop has stopped: remove no longer waits
  }

 private:
  bool current(int fd, uint64_t gen) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = gen_.find(fd);
    return it != gen_.end() && it->second == gen;
  }

  void ready(int fd, uint64_t gen, bool wantRead, bool wantWrite, uint32_t ev) {
    if (!current(fd, gen)) return;
    bool broken = (ev & (kHangup | kError)) != 0;
    bool readable = wantRead && ((ev & kReadable) || broken);
    bool writable = wantWrite && ((ev & kWritable) || broken);
    bool ran = mmio_->withDevice([&] { vsock_->hostReady(fd, readable, writable); });
    // The device is not running (failed, or being reset): its sockets would stay ready and spin
    // the loop. It closes them on reset, which unwatches them for good.
    if (!ran && current(fd, gen)) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        gen_.erase(fd);
      }
      loop_.remove(fd);
    }
  }

  void acceptAll() {
    for (;;) {
      int fd = ::accept4(listener_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;  // EAGAIN, or the peer went away before we took it
      if (handshakes_.size() >= kMaxHandshakes) {
        ::close(fd);
        continue;
      }
      handshakes_[fd];
      loop_.add(fd, kReadable, [this, fd](uint32_t) { handshake(fd); });
    }
  }

  void dropHandshake(int fd) {
    loop_.remove(fd);
    handshakes_.erase(fd);
    ::close(fd);
  }

  // "CONNECT <port>\n", read a byte at a time so nothing after the line is taken from the stream:
  // that is the guest's data.
  void handshake(int fd) {
    std::string& line = handshakes_[fd];
    for (;;) {
      char c;
      ssize_t n = ::recv(fd, &c, 1, 0);
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
      if (n <= 0) return dropHandshake(fd);
      if (c != '\n') {
        line.push_back(c);
        if (line.size() >= kMaxLine) return dropHandshake(fd);
        continue;
      }
      uint32_t port = 0;
      if (!parseConnect(line, port)) return dropHandshake(fd);
      loop_.remove(fd);
      handshakes_.erase(fd);
      {
        std::lock_guard<std::mutex> lock(mu_);
        pendingOk_[fd] = port;
      }
      bool taken = false;
      bool ran = mmio_->withDevice([&] { taken = vsock_->hostConnect(fd, port); });
      if (!taken) {
        std::lock_guard<std::mutex> lock(mu_);
        pendingOk_.erase(fd);
      }
      if (!ran) ::close(fd);  // no driver yet: the host sees EOF and may try again
      return;
    }
  }

  static bool parseConnect(const std::string& line, uint32_t& port) {
    static const std::string kWord = "CONNECT ";
    if (line.compare(0, kWord.size(), kWord) != 0 || line.size() == kWord.size()) return false;
    uint64_t v = 0;
    for (size_t i = kWord.size(); i < line.size(); i++) {
      char c = line[i];
      if (c == '\r' && i + 1 == line.size()) break;
      if (c < '0' || c > '9') return false;
      v = v * 10 + static_cast<uint64_t>(c - '0');
      if (v > UINT32_MAX) return false;
    }
    port = static_cast<uint32_t>(v);
    return true;
  }

  EventLoop& loop_;
  const std::string dir_;
  Mmio* mmio_ = nullptr;
  virtio::Vsock* vsock_ = nullptr;
  int listener_ = -1;
  std::map<int, std::string> handshakes_;  // loop thread only
  std::mutex mu_;
  std::map<int, uint64_t> gen_;
  uint64_t nextGen_ = 1;
  std::map<int, uint32_t> pendingOk_;  // host-initiated streams the guest has not answered yet
};

// One device on one virtio-mmio slot. Members are destroyed in reverse order: the transport, then
// the device (vsock unwatches and closes its sockets), then what the device used (the memory
// map, the vsock bridge). The machine frees this after stopping the event loop.
class VirtioSlotDevice final : public MmioDevice {
 public:
  VirtioSlotDevice(DeviceHost& host, const VirtioSlot& slot, InterruptLine& irq, std::unique_ptr<VsockBridge> bridge, std::unique_ptr<virtio::Device> device)
      : loop_(host.loop()), bridge_(std::move(bridge)), device_(std::move(device)) {
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
  VsockBridge* bridge() { return bridge_.get(); }

 private:
  EventLoop& loop_;
  std::unique_ptr<VsockBridge> bridge_;
  virtio::MemoryMap map_;
  std::unique_ptr<virtio::Device> device_;
  std::unique_ptr<Mmio> mmio_;
};

VirtioSlotDevice& attachOne(DeviceHost& host, std::unique_ptr<virtio::Device> device, std::unique_ptr<VsockBridge> bridge) {
  VirtioSlot slot = host.freeVirtioSlot();
  InterruptLine& irq = host.interruptLine(slot.irq);
  uint16_t queues = device->queueCount();
  auto dev = std::make_shared<VirtioSlotDevice>(host, slot, irq, std::move(bridge), std::move(device));
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
    if (config.rng) attachOne(host, std::make_unique<virtio::Rng>(), nullptr);
    for (auto& d : disks) attachOne(host, std::move(d), nullptr);
    if (!config.vsockDir.empty()) {
      auto bridge = std::make_unique<VsockBridge>(host.loop(), config.vsockDir);
      VsockBridge* b = bridge.get();
      auto vsock = std::make_unique<virtio::Vsock>(VirtioConfig::kGuestCid, *b);
      virtio::Vsock* v = vsock.get();
      VirtioSlotDevice& d = attachOne(host, std::move(vsock), std::move(bridge));
      b->start(d.mmio(), *v);
    }
  };
}

}  // namespace skiff
