#include "transport/device_server.h"

#include <pthread.h>

#include <ctime>
#include <future>

#include "devices/virtio/blk.h"
#include "devices/virtio/net.h"
#include "devices/virtio/rng.h"
#include "devices/virtio/vsock.h"
#include "devices/virtio/vsock_unix.h"
#ifdef SKIFF_SLIRP
#include "devices/virtio/slirp_backend.h"
#endif
#include "loop/event_loop.h"
#include "transport/vhost_user.h"

namespace skiff {
namespace vhost_user {
namespace {

class Impl final : public DeviceServer {
 public:
  Impl(const ServeConfig& config, Log log) : log_(std::move(log)) {
    if (config.guestCid < 3 || config.guestCid > 0xffffffffull) throw virtio::DeviceError("vsock guest CID must be from 3 to 2^32-1");
    // Devices first: a disk that cannot be opened fails before any thread or socket exists.
    for (const auto& d : config.disks) disks_.push_back(virtio::Block::open(d.path, {d.readOnly, d.serial}));
    if (config.rng) rng_ = std::make_unique<virtio::Rng>();
#ifndef SKIFF_SLIRP
    if (config.net) throw virtio::DeviceError("net: this skiff was built without libslirp, so it has no networking (install libslirp-dev, rebuild the addon)");
#endif
    loop_ = EventLoop::create([this](const std::string& message) {
      if (log_) log_("device loop: " + message);
    });
    try {
      // Everything is built on the loop thread, so that it only ever runs there.
      run([&] {
        pthread_getcpuclockid(pthread_self(), &cpuClock_);
        for (size_t i = 0; i < disks_.size(); ++i) {
          add("blk", config.socketDir + "/blk" + std::to_string(i) + ".sock", *disks_[i], "vhost-user-blk" + std::to_string(i));
        }
        if (rng_) add("rng", config.socketDir + "/rng.sock", *rng_, "vhost-user-rng");
        if (config.vsock) {
          vsockHost_ = std::make_unique<virtio::UnixVsockHost>(*loop_, config.socketDir);
          vsock_ = std::make_unique<virtio::Vsock>(config.guestCid, *vsockHost_);
          Backend& backend = add("vsock", config.socketDir + "/vsock.sock", *vsock_, "vhost-user-vsock").backend();
          vsockHost_->start(*vsock_, [&backend](const std::function<void()>& fn) { return backend.withDevice(fn); });
          vsockPath_ = vsockHost_->path();
        }
#ifdef SKIFF_SLIRP
        if (config.net) {
          // Listening on the --publish ports here fails the start (QEMU is not running yet).
          virtio::SlirpBackend::Options options;
          for (const auto& f : config.netForwards) options.forwards.push_back({f.udp, f.hostPort, f.guestPort});
          netBackend_ = std::make_unique<virtio::SlirpBackend>(*loop_, options, log_);
          // Frames for the guest come from slirp's handlers on this loop: the rx queue is drained
          // in a task after them. netServer_ is read on the loop only, where close() clears it.
          net_ = std::make_unique<virtio::Net>(*netBackend_, config.netMac, [this] {
            loop_->post([this] {
              if (netServer_) netServer_->backend().process(virtio::Net::kRxQueue);
            });
          });
          netServer_ = &add("net", config.socketDir + "/net.sock", *net_, "vhost-user-net");
        }
#endif
      });
    } catch (...) {
      close();
      throw;
    }
  }
  ~Impl() override { close(); }

  const std::vector<ServedSocket>& sockets() const override { return sockets_; }
  const std::string& vsockPath() const override { return vsockPath_; }
  double cpuSeconds() const override {
    timespec ts{};
    if (clock_gettime(cpuClock_, &ts) != 0) return 0;
    return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
  }

  void close() override {
    if (!loop_) return;
    // Servers close their front-end connections (the devices reset), then vsock's host sockets go.
    run([&] {
      netServer_ = nullptr;
      servers_.clear();
      if (vsockHost_) vsockHost_->close();
      vsock_.reset();
      // The device before its backend; the backend on the loop thread, where its handlers run.
      net_.reset();
      netBackend_.reset();
    });
    loop_->stop();
    loop_.reset();
    vsockHost_.reset();
    disks_.clear();
    rng_.reset();
  }

 private:
  Server& add(const char* kind, const std::string& path, virtio::Device& device, const std::string& name) {
    servers_.push_back(std::make_unique<Server>(*loop_, path, device, name, log_));
    sockets_.push_back({kind, path});
    return *servers_.back();
  }

  // Runs fn on the loop thread and waits for it; rethrows what it threw.
  void run(const std::function<void()>& fn) {
    std::promise<void> done;
    auto result = done.get_future();
    bool posted = loop_->post([&] {
      try {
        fn();
        done.set_value();
      } catch (...) {
        done.set_exception(std::current_exception());
      }
    });
    if (!posted) return;
    result.get();
  }

  Log log_;
  std::unique_ptr<EventLoop> loop_;
  std::vector<std::unique_ptr<virtio::Block>> disks_;
  std::unique_ptr<virtio::Rng> rng_;
  std::unique_ptr<virtio::UnixVsockHost> vsockHost_;
  std::unique_ptr<virtio::Vsock> vsock_;
  std::unique_ptr<virtio::NetBackend> netBackend_;
  std::unique_ptr<virtio::Net> net_;
  Server* netServer_ = nullptr;  // loop thread only
  std::vector<std::unique_ptr<Server>> servers_;
  std::vector<ServedSocket> sockets_;
  std::string vsockPath_;
  clockid_t cpuClock_ = CLOCK_THREAD_CPUTIME_ID;
};

}  // namespace

std::unique_ptr<DeviceServer> DeviceServer::start(const ServeConfig& config, Log log) { return std::make_unique<Impl>(config, std::move(log)); }

}  // namespace vhost_user
}  // namespace skiff
