#include "transport/device_server.h"

#include <pthread.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <future>
#include <map>

#include "devices/virtio/blk.h"
#include "devices/virtio/rng.h"
#include "devices/virtio/vsock.h"
#include "loop/event_loop.h"
#include "transport/vhost_user.h"

namespace skiff {
namespace vhost_user {
namespace {

// vsock's host side: Unix sockets in the VM directory, watched on the device loop.
class UnixVsockHost final : public virtio::VsockHost {
 public:
  static constexpr size_t kMaxPending = 64;  // host connections still sending their CONNECT line
  static constexpr size_t kMaxLine = 32;     // "CONNECT 4294967295\n" is 19 bytes

  UnixVsockHost(EventLoop& loop, std::string dir) : loop_(loop), dir_(std::move(dir)), path_(dir_ + "/vsock") {}
  ~UnixVsockHost() override { close(); }

  // Called once both exist; the listener starts accepting.
  void attach(virtio::Vsock& vsock, Backend& backend) {
    vsock_ = &vsock;
    backend_ = &backend;
    listen_ = listenUnix(path_);
    loop_.add(listen_, kReadable, [this](uint32_t) { onAccept(); });
  }
  void close() {
    for (auto& p : pending_) {
      loop_.remove(p.first);
      ::close(p.first);
    }
    pending_.clear();
    if (listen_ >= 0) {
      loop_.remove(listen_);
      ::close(listen_);
      unlink(path_.c_str());
      listen_ = -1;
    }
  }
  const std::string& path() const { return path_; }

  int connect(uint32_t port) override {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::string p = dir_ + "/vsock_" + std::to_string(port);
    if (p.size() >= sizeof addr.sun_path) return -1;
    std::memcpy(addr.sun_path, p.data(), p.size());
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    // A Unix stream connect completes at once or fails (EAGAIN: the listener's backlog is full).
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      ::close(fd);
      return -1;
    }
    return fd;
  }

  void connected(int fd, bool accepted) override {
    auto it = ports_.find(fd);
    if (it == ports_.end()) return;
    uint32_t port = it->second;
    ports_.erase(it);
    if (!accepted) return;
    // The socket's send buffer is empty: the guest has had no chance to send anything yet.
    std::string ok = "OK " + std::to_string(port) + "\n";
    if (send(fd, ok.data(), ok.size(), MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
      // The host side is gone; the device sees the error on its next read and resets the stream.
    }
  }

  void watch(int fd, bool readable, bool writable) override {
    loop_.remove(fd);
    uint32_t events = (readable ? uint32_t(kReadable) : 0u) | (writable ? uint32_t(kWritable) : 0u);
    loop_.add(fd, events, [this, fd](uint32_t ev) {
      bool r = ev & (kReadable | kHangup | kError), w = ev & (kWritable | kHangup | kError);
      // A stopped or failed device has no use for the socket yet: stop watching, or the
      // level-triggered loop would call back forever. The device unwatches it again on reset.
      if (!backend_->withDevice([&] { vsock_->hostReady(fd, r, w); })) loop_.remove(fd);
    });
  }

  void unwatch(int fd) override {
    loop_.remove(fd);
    ports_.erase(fd);
  }

 private:
  void onAccept() {
    int fd = accept4(listen_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;
    if (pending_.size() >= kMaxPending) {
      ::close(fd);
      return;
    }
    pending_[fd] = true;
    loop_.add(fd, kReadable, [this, fd](uint32_t) { onLine(fd); });
  }

  void reject(int fd) {
    loop_.remove(fd);
    pending_.erase(fd);
    ::close(fd);
  }

  // Reads the "CONNECT <port>\n" line and not a byte more: what follows is the stream's data.
  void onLine(int fd) {
    char buf[kMaxLine + 1];
    ssize_t n = recv(fd, buf, kMaxLine, MSG_PEEK | MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) {
      reject(fd);
      return;
    }
    buf[n] = '\0';
    char* nl = static_cast<char*>(std::memchr(buf, '\n', static_cast<size_t>(n)));
    if (nl == nullptr) {
      if (static_cast<size_t>(n) >= kMaxLine) reject(fd);
      return;
    }
    size_t lineLen = static_cast<size_t>(nl - buf) + 1;
    if (recv(fd, buf, lineLen, MSG_DONTWAIT) != static_cast<ssize_t>(lineLen)) {
      reject(fd);
      return;
    }
    buf[lineLen - 1] = '\0';
    if (lineLen >= 2 && buf[lineLen - 2] == '\r') buf[lineLen - 2] = '\0';
    unsigned long long port = 0;
    const char* digits = buf + 8;
    bool good = std::strncmp(buf, "CONNECT ", 8) == 0 && *digits != '\0';
    for (const char* c = digits; good && *c; ++c) {
      if (*c < '0' || *c > '9' || port > 0xffffffffull / 10) good = false;
      else port = port * 10 + static_cast<unsigned>(*c - '0');
    }
    if (!good || port > 0xffffffffull) {
      reject(fd);
      return;
    }
    loop_.remove(fd);
    pending_.erase(fd);
    bool taken = false;
    // The device owns fd once hostConnect is called (it closes it itself on refusal).
    if (!backend_->withDevice([&] {
          ports_[fd] = static_cast<uint32_t>(port);
          taken = vsock_->hostConnect(fd, static_cast<uint32_t>(port));
        })) {
      ::close(fd);  // the guest has not brought its vsock device up
      return;
    }
    if (!taken) ports_.erase(fd);
  }

  EventLoop& loop_;
  const std::string dir_;
  const std::string path_;
  int listen_ = -1;
  virtio::Vsock* vsock_ = nullptr;
  Backend* backend_ = nullptr;
  std::map<int, bool> pending_;
  std::map<int, uint32_t> ports_;  // host-initiated streams awaiting the guest's answer
};

class Impl final : public DeviceServer {
 public:
  Impl(const ServeConfig& config, Log log) : log_(std::move(log)) {
    if (config.guestCid < 3 || config.guestCid > 0xffffffffull) throw virtio::DeviceError("vsock guest CID must be from 3 to 2^32-1");
    // Devices first: a disk that cannot be opened fails before any thread or socket exists.
    for (const auto& d : config.disks) disks_.push_back(virtio::Block::open(d.path, {d.readOnly, d.serial}));
    if (config.rng) rng_ = std::make_unique<virtio::Rng>();
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
          vsockHost_ = std::make_unique<UnixVsockHost>(*loop_, config.socketDir);
          vsock_ = std::make_unique<virtio::Vsock>(config.guestCid, *vsockHost_);
          Server& s = add("vsock", config.socketDir + "/vsock.sock", *vsock_, "vhost-user-vsock");
          vsockHost_->attach(*vsock_, s.backend());
          vsockPath_ = vsockHost_->path();
        }
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
      servers_.clear();
      if (vsockHost_) vsockHost_->close();
      vsock_.reset();
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
  std::unique_ptr<UnixVsockHost> vsockHost_;
  std::unique_ptr<virtio::Vsock> vsock_;
  std::vector<std::unique_ptr<Server>> servers_;
  std::vector<ServedSocket> sockets_;
  std::string vsockPath_;
  clockid_t cpuClock_ = CLOCK_THREAD_CPUTIME_ID;
};

}  // namespace

std::unique_ptr<DeviceServer> DeviceServer::start(const ServeConfig& config, Log log) { return std::make_unique<Impl>(config, std::move(log)); }

}  // namespace vhost_user
}  // namespace skiff
