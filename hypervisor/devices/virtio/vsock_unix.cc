#include "devices/virtio/vsock_unix.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace skiff {
namespace virtio {
namespace {

bool unixAddress(const std::string& path, sockaddr_un& addr) {
  std::memset(&addr, 0, sizeof addr);
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return false;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  return true;
}

}  // namespace

UnixVsockHost::UnixVsockHost(EventLoop& loop, std::string dir) : loop_(loop), dir_(std::move(dir)), path_(dir_ + "/vsock") {}

UnixVsockHost::~UnixVsockHost() { close(); }

void UnixVsockHost::start(Vsock& vsock, WithDevice withDevice) {
  vsock_ = &vsock;
  withDevice_ = std::move(withDevice);
  sockaddr_un addr;
  if (!unixAddress(path_, addr)) throw DeviceError("vsock: socket path too long: " + path_);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) throw DeviceError(std::string("vsock: socket: ") + std::strerror(errno));
  ::unlink(addr.sun_path);  // a stale socket from a VM that died with this directory
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) < 0 || ::chmod(addr.sun_path, 0600) < 0 || ::listen(fd, 64) < 0) {
    std::string why = "vsock: listening on " + path_ + ": " + std::strerror(errno);
    ::close(fd);
    throw DeviceError(why);
  }
  listener_ = fd;
  loop_.add(fd, kReadable, [this](uint32_t) { acceptAll(); });
}

void UnixVsockHost::close() {
  for (auto& h : handshakes_) {
    loop_.remove(h.first);
    ::close(h.first);
  }
  handshakes_.clear();
  if (listener_ >= 0) {
    loop_.remove(listener_);
    ::close(listener_);
    ::unlink(path_.c_str());
    listener_ = -1;
  }
}

int UnixVsockHost::connect(uint32_t port) {
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

void UnixVsockHost::connected(int fd, bool accepted) {
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

void UnixVsockHost::watch(int fd, bool readable, bool writable) {
  uint32_t events = (readable ? kReadable : 0u) | (writable ? kWritable : 0u);
  uint64_t gen;
  {
    std::lock_guard<std::mutex> lock(mu_);
    // The same socket keeps its generation until unwatch: a change of interest is then a modify
    // of the loop's registration rather than a remove and a fresh add.
    auto it = gen_.find(fd);
    gen = it != gen_.end() ? it->second : (gen_[fd] = nextGen_++);
  }
  auto apply = [this, fd, gen, events] {
    bool modify;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!currentLocked(fd, gen)) return;
      auto r = registered_.find(fd);
      modify = r != registered_.end() && r->second.gen == gen;
      if (events) registered_[fd] = {gen, events};
    }
    if (!events) {  // the device unwatches instead; kept for the interface's sake
      removeRegistration(fd);
    } else if (modify) {
      loop_.modify(fd, events);
    } else {
      loop_.remove(fd);  // a registration of an older socket with this number, if any
      loop_.add(fd, events, [this, fd, gen](uint32_t ev) { ready(fd, gen, ev); });
    }
  };
  if (loop_.onLoopThread()) {
    apply();
  } else {
    loop_.post(apply);
  }
}

void UnixVsockHost::unwatch(int fd) {
  uint64_t gen = 0;
  bool had = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = gen_.find(fd);
    if (it != gen_.end()) {
      gen = it->second;
      had = true;
      gen_.erase(it);
    }
  }
  if (loop_.onLoopThread()) {
    removeRegistration(fd);
    return;
  }
  // Not waiting (see the header). The descriptor is closed right after this: epoll forgets it
  // then, and the loop's own record goes when the task runs, but only if it is still this
  // socket's: by then the number may belong to a newer socket, watched again (its generation
  // differs) or a host connection the listener accepted (not in registered_ at all).
  auto task = [this, fd, gen, had] {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto r = registered_.find(fd);
      if (!had || gen_.count(fd) || r == registered_.end() || r->second.gen != gen) return;
    }
    removeRegistration(fd);
  };
  if (!loop_.post(task)) removeRegistration(fd);  // the loop has stopped: remove no longer waits
}

void UnixVsockHost::removeRegistration(int fd) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    registered_.erase(fd);
  }
  loop_.remove(fd);
}

bool UnixVsockHost::currentLocked(int fd, uint64_t gen) const {
  auto it = gen_.find(fd);
  return it != gen_.end() && it->second == gen;
}

bool UnixVsockHost::current(int fd, uint64_t gen) {
  std::lock_guard<std::mutex> lock(mu_);
  return currentLocked(fd, gen);
}

void UnixVsockHost::ready(int fd, uint64_t gen, uint32_t ev) {
  uint32_t want;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto r = registered_.find(fd);
    if (!currentLocked(fd, gen) || r == registered_.end() || r->second.gen != gen) return;
    want = r->second.events;
  }
  bool broken = (ev & (kHangup | kError)) != 0;
  bool readable = (want & kReadable) && ((ev & kReadable) || broken);
  bool writable = (want & kWritable) && ((ev & kWritable) || broken);
  bool ran = withDevice_([&] { vsock_->hostReady(fd, readable, writable); });
  // The device is not running (failed, or being reset): its sockets would stay ready and spin the
  // level-triggered loop. It closes them on reset, which unwatches them for good.
  if (!ran && current(fd, gen)) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      gen_.erase(fd);
    }
    removeRegistration(fd);
  }
}

void UnixVsockHost::acceptAll() {
  for (;;) {
    int fd = ::accept4(listener_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return;  // EAGAIN, or the peer went away before we took it
    if (handshakes_.size() >= kMaxHandshakes) {
      ::close(fd);
      continue;
    }
    handshakes_[fd];
    // A number accept4 just handed out can only have a stale registration: a device socket closed
    // on another thread whose posted removal has not run yet. It goes first.
    bool stale;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stale = registered_.erase(fd) > 0;
    }
    if (stale) loop_.remove(fd);
    loop_.add(fd, kReadable, [this, fd](uint32_t) { handshake(fd); });
  }
}

void UnixVsockHost::dropHandshake(int fd) {
  loop_.remove(fd);
  handshakes_.erase(fd);
  ::close(fd);
}

// "CONNECT <port>\n", read a byte at a time so nothing after the line is taken from the stream:
// that is the guest's data.
void UnixVsockHost::handshake(int fd) {
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
    // The device owns fd once hostConnect is called (it closes it itself on refusal).
    bool taken = false;
    bool ran = withDevice_([&] { taken = vsock_->hostConnect(fd, port); });
    if (!taken) {
      std::lock_guard<std::mutex> lock(mu_);
      pendingOk_.erase(fd);
    }
    if (!ran) ::close(fd);  // no driver yet: the host sees EOF and may try again
    return;
  }
}

bool UnixVsockHost::parseConnect(const std::string& line, uint32_t& port) {
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

}  // namespace virtio
}  // namespace skiff
