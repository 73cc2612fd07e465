// Compiled in only with SKIFF_SLIRP (and -lslirp): see slirp_backend.h.
#ifdef SKIFF_SLIRP
#include "devices/virtio/slirp_backend.h"

#include <arpa/inet.h>
#include <poll.h>
#include <slirp/libslirp.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <exception>
#include <future>

namespace skiff {
namespace virtio {

// A libslirp timer: libslirp asks for them (timer_new_opaque), sets their expiry in ms on the
// clock it reads through clock_get_ns, and expects the application to call back when due.
struct SlirpBackend::Timer {
  SlirpTimerId id = SLIRP_TIMER_RA;
  SlirpTimerCb cb = nullptr;  // the older timer_new style; null: slirp_handle_timer(id)
  void* cbOpaque = nullptr;
  int64_t expireMs = -1;  // -1: not armed
};

namespace {

int64_t nowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

in_addr ipv4(const char* text) {
  in_addr a{};
  inet_pton(AF_INET, text, &a);  // constants of this file: always valid
  return a;
}

short toPoll(int events) {
  return short(((events & SLIRP_POLL_IN) ? POLLIN : 0) | ((events & SLIRP_POLL_OUT) ? POLLOUT : 0) | ((events & SLIRP_POLL_PRI) ? POLLPRI : 0) |
               ((events & SLIRP_POLL_ERR) ? POLLERR : 0) | ((events & SLIRP_POLL_HUP) ? POLLHUP : 0));
}

int fromPoll(short revents) {
  return ((revents & POLLIN) ? SLIRP_POLL_IN : 0) | ((revents & POLLOUT) ? SLIRP_POLL_OUT : 0) | ((revents & POLLPRI) ? SLIRP_POLL_PRI : 0) |
         ((revents & POLLERR) ? SLIRP_POLL_ERR : 0) | ((revents & (POLLHUP | POLLNVAL)) ? SLIRP_POLL_HUP : 0);
}

std::string errnoText(const std::string& what) { return what + ": " + std::strerror(errno); }

}  // namespace

// libslirp's callbacks; `opaque` is always the SlirpBackend, and every call comes on the loop
// thread from inside a libslirp call we made.
struct SlirpBackend::Callbacks {
  static SlirpBackend& self(void* opaque) { return *static_cast<SlirpBackend*>(opaque); }

  static ssize_t sendPacket(const void* buf, size_t len, void* opaque) {
    // A frame the device cannot take is dropped and counted there (Net::stats().rxDropped); TCP
    // retransmits, as libslirp's contract expects.
    self(opaque).deliver(static_cast<const uint8_t*>(buf), len);
    return static_cast<ssize_t>(len);
  }
  static void guestError(const char* msg, void* opaque) {
    SlirpBackend& s = self(opaque);
    if (s.guestErrors_++ == 0 && s.log_) s.log_(std::string("net: slirp: guest error (later ones only counted): ") + msg);
  }
  static int64_t clockGetNs(void*) { return nowNs(); }
  static void* timerNew(SlirpTimerCb cb, void* cbOpaque, void* opaque) {
    auto t = std::make_unique<Timer>();
    t->cb = cb;
    t->cbOpaque = cbOpaque;
    self(opaque).timers_.push_back(std::move(t));
    return self(opaque).timers_.back().get();
  }
  static void* timerNewOpaque(SlirpTimerId id, void* cbOpaque, void* opaque) {
    auto t = std::make_unique<Timer>();
    t->id = id;
    t->cbOpaque = cbOpaque;
    self(opaque).timers_.push_back(std::move(t));
    return self(opaque).timers_.back().get();
  }
  static void timerFree(void* timer, void* opaque) {
    auto& timers = self(opaque).timers_;
    timers.erase(std::remove_if(timers.begin(), timers.end(), [&](const std::unique_ptr<Timer>& t) { return t.get() == timer; }), timers.end());
  }
  static void timerMod(void* timer, int64_t expireMs, void*) {
    static_cast<Timer*>(timer)->expireMs = expireMs;  // the timerfd is re-armed by update()
  }
  static void registerPollFd(int, void*) {}  // update() learns the poll set from slirp_pollfds_fill
  static void unregisterPollFd(int fd, void* opaque) {
    // Called just before libslirp closes `fd`: its number may come back for another socket, which
    // must get a fresh registration.
    self(opaque).unwatch(fd);
  }
  static void notify(void*) {}  // guestfwd only: not used
  static int addPoll(int fd, int events, void* opaque) {
    auto& fill = self(opaque).fill_;
    fill.push_back({fd, toPoll(events), 0});
    return static_cast<int>(fill.size() - 1);
  }
  static int getRevents(int idx, void* opaque) {
    auto& fill = self(opaque).fill_;
    return idx >= 0 && size_t(idx) < fill.size() ? fromPoll(fill[idx].revents) : 0;
  }
  static const SlirpCb& table();
};

const SlirpCb& SlirpBackend::Callbacks::table() {
  static const SlirpCb cb = [] {
    SlirpCb c{};
    c.send_packet = sendPacket;
    c.guest_error = guestError;
    c.clock_get_ns = clockGetNs;
    c.timer_new = timerNew;
    c.timer_free = timerFree;
    c.timer_mod = timerMod;
    c.register_poll_fd = registerPollFd;
    c.unregister_poll_fd = unregisterPollFd;
    c.notify = notify;
    c.timer_new_opaque = timerNewOpaque;
    return c;
  }();
  return cb;
}

SlirpBackend::SlirpBackend(EventLoop& loop, const Options& options, Log log) : loop_(loop), log_(std::move(log)), mtu_(options.mtu) {
  // Built on the loop thread, so that no handler it registers can run while it is half made.
  auto build = [&] {
    SlirpConfig cfg{};
    cfg.version = 4;
    cfg.restricted = 0;
    cfg.in_enabled = true;
    cfg.vnetwork = ipv4(kNetwork);
    cfg.vnetmask = ipv4(kNetmask);
    cfg.vhost = ipv4(kGateway);
    cfg.in6_enabled = false;
    cfg.vhostname = options.hostname.empty() ? nullptr : options.hostname.c_str();
    cfg.vdhcp_start = ipv4(kGuest);
    cfg.vnameserver = ipv4(kDns);
    cfg.if_mtu = options.mtu;
    cfg.if_mru = options.mtu;
    cfg.disable_host_loopback = false;  // 10.0.2.2 is the host's loopback: the point of it
    cfg.enable_emu = false;             // libslirp's own advice: not safe
    slirp_ = slirp_new(&cfg, &Callbacks::table(), this);
    if (slirp_ == nullptr) throw DeviceError("net: libslirp refused its configuration (slirp_new)");
    timerFd_ = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (timerFd_ < 0) throw DeviceError(errnoText("net: timerfd_create"));
    for (const Forward& f : options.forwards) {
      errno = 0;
      if (slirp_add_hostfwd(slirp_, f.udp ? 1 : 0, ipv4("127.0.0.1"), f.hostPort, ipv4(kGuest), f.guestPort) < 0) {
        std::string port = std::to_string(f.hostPort) + ":" + std::to_string(f.guestPort) + (f.udp ? "/udp" : "");
        throw DeviceError("net: --publish " + port + ": cannot listen on 127.0.0.1:" + std::to_string(f.hostPort) +
                          (errno ? std::string(" (") + std::strerror(errno) + ")" : std::string()));
      }
    }
    loop_.add(timerFd_, kReadable, [this](uint32_t) { onTimer(); });
    update();
  };
  auto undo = [&] {
    if (timerFd_ >= 0) {
      loop_.remove(timerFd_);
      ::close(timerFd_);
      timerFd_ = -1;
    }
    for (auto& w : watched_) loop_.remove(w.first);
    watched_.clear();
    if (slirp_ != nullptr) slirp_cleanup(slirp_);
    slirp_ = nullptr;
  };
  try {
    if (loop_.onLoopThread()) {
      build();
    } else {
      std::promise<void> done;
      bool posted = loop_.post([&] {
        try {
          build();
          done.set_value();
        } catch (...) {
          done.set_exception(std::current_exception());
        }
      });
      if (posted) {
        done.get_future().get();
      } else {
        build();  // the loop has stopped: nothing runs concurrently
      }
    }
  } catch (...) {
    undo();
    throw;
  }
}

SlirpBackend::~SlirpBackend() {
  if (timerFd_ >= 0) {
    loop_.remove(timerFd_);
    ::close(timerFd_);
  }
  drainToHost(kDrainMs, kDrainIdleMs);
  slirp_cleanup(slirp_);  // closes its sockets, unwatching each (unregister_poll_fd)
  for (auto& w : watched_) loop_.remove(w.first);
}

bool SlirpBackend::drainToHost(int64_t budgetMs, int64_t idleMs) {
  // libslirp asks for POLLOUT on a host socket while its send buffer holds bytes it has already
  // acknowledged to the guest (or while a connect is in progress). Without the guest nothing new
  // arrives; keep writing until those buffers are empty, the budget is spent, or no socket took
  // a byte for idleMs (a reader that stopped reading, a connect that hangs).
  int64_t now = nowNs() / 1000000;
  int64_t end = now + budgetMs, idleEnd = now + idleMs;
  for (;;) {
    fill_.clear();
    uint32_t timeoutMs = UINT32_MAX;
    slirp_pollfds_fill(slirp_, &timeoutMs, Callbacks::addPoll, this);
    if (std::none_of(fill_.begin(), fill_.end(), [](const PollFd& p) { return (p.events & POLLOUT) != 0; })) return true;
    now = nowNs() / 1000000;
    if (now >= end || now >= idleEnd) return false;
    int64_t wait = std::min({end, idleEnd, now + 50}) - now;  // 50: slirp's TCP timers keep running
    // Only output is polled: reading more from the host now would fill buffers nobody empties.
    if (pollOnce(POLLOUT, int(wait)) > 0) idleEnd = nowNs() / 1000000 + idleMs;
  }
}

void SlirpBackend::send(const uint8_t* frame, size_t len) {
  if (len > size_t(INT_MAX)) return;  // Net caps frames far below this
  slirp_input(slirp_, frame, static_cast<int>(len));
}

void SlirpBackend::flush() { update(); }

void SlirpBackend::unwatch(int fd) {
  if (watched_.erase(fd)) loop_.remove(fd);
}

void SlirpBackend::onReady(int fd, uint32_t events) {
  // Only `fd`'s readiness, straight from the loop: a socket that is ready too has its own event
  // (level-triggered) in this wait or the next, so libslirp misses nothing, and a poll(2) over the
  // whole set per event is saved.
  short revents = short(((events & kReadable) ? POLLIN : 0) | ((events & kWritable) ? POLLOUT : 0) | ((events & kPriority) ? POLLPRI : 0) |
                        ((events & kHangup) ? POLLHUP : 0) | ((events & kError) ? POLLERR : 0));
  for (PollFd& p : fill_) p.revents = p.fd == fd ? short(revents & (p.events | POLLHUP | POLLERR)) : 0;
  slirp_pollfds_poll(slirp_, 0, Callbacks::getRevents, this);
  update();
}

int SlirpBackend::pollOnce(short mask, int timeoutMs) {
  // One poll(2) over the whole set (a handful of sockets) gives libslirp every readiness at once,
  // as its fill/poll contract expects.
  std::vector<pollfd> fds(fill_.size());
  for (size_t i = 0; i < fill_.size(); ++i) fds[i] = {fill_[i].fd, short(fill_[i].events & mask), 0};
  int n = fds.empty() ? 0 : ::poll(fds.data(), fds.size(), timeoutMs);
  for (size_t i = 0; i < fill_.size(); ++i) fill_[i].revents = n > 0 ? fds[i].revents : 0;
  // n < 0 (EINTR, say): libslirp skips the sockets this round but still runs its TCP timers.
  slirp_pollfds_poll(slirp_, n < 0 ? 1 : 0, Callbacks::getRevents, this);
  return n;
}

void SlirpBackend::onTimer() {
  uint64_t expirations;
  while (::read(timerFd_, &expirations, sizeof expirations) > 0) {
  }
  // Due libslirp timers, one at a time: a callback may free or re-arm any of them.
  for (;;) {
    int64_t now = nowNs() / 1000000;
    Timer* due = nullptr;
    for (auto& t : timers_) {
      if (t->expireMs >= 0 && t->expireMs <= now) {
        due = t.get();
        break;
      }
    }
    if (due == nullptr) break;
    due->expireMs = -1;
    if (due->cb != nullptr) {
      due->cb(due->cbOpaque);
    } else {
      slirp_handle_timer(slirp_, due->id, due->cbOpaque);
    }
  }
  pollOnce(~short(0), 0);  // TCP's fast and slow timers run inside slirp_pollfds_poll
  update();
}

void SlirpBackend::update() {
  fill_.clear();
  uint32_t timeoutMs = UINT32_MAX;
  slirp_pollfds_fill(slirp_, &timeoutMs, Callbacks::addPoll, this);

  // What libslirp wants now, per descriptor (a handful; a descriptor may appear more than once).
  want_.clear();
  for (const PollFd& p : fill_) {
    uint32_t ev = ((p.events & POLLIN) ? kReadable : 0u) | ((p.events & POLLOUT) ? kWritable : 0u) | ((p.events & POLLPRI) ? kPriority : 0u);
    if (ev == 0) continue;
    auto same = std::find_if(want_.begin(), want_.end(), [&](const std::pair<int, uint32_t>& w) { return w.first == p.fd; });
    if (same != want_.end()) {
      same->second |= ev;
    } else {
      want_.emplace_back(p.fd, ev);
    }
  }
  for (auto it = watched_.begin(); it != watched_.end();) {
    bool wanted = std::any_of(want_.begin(), want_.end(), [&](const std::pair<int, uint32_t>& w) { return w.first == it->first; });
    if (!wanted) {
      loop_.remove(it->first);
      it = watched_.erase(it);
    } else {
      ++it;
    }
  }
  // A changed interest is one epoll_ctl(MOD): a socket's POLLOUT comes and goes with every burst
  // the host is slow to take, and remove + add cost two calls and the loop's bookkeeping.
  for (const auto& [fd, ev] : want_) {
    auto w = watched_.find(fd);
    if (w != watched_.end()) {
      if (w->second == ev) continue;
      try {
        loop_.modify(fd, ev);
        w->second = ev;
        continue;
      } catch (const std::exception&) {
        // The OS no longer knows the descriptor: libslirp closed a socket without unregistering
        // it, and the number came back. A fresh registration below.
        loop_.remove(fd);
        watched_.erase(w);
      }
    }
    loop_.add(fd, ev, [this, fd = fd](uint32_t events) { onReady(fd, events); });
    watched_[fd] = ev;
  }

  // One timerfd for the earliest of libslirp's timers and its poll timeout (TCP timers: 2 ms
  // while an ACK is delayed, else at most 1 s).
  int64_t now = nowNs() / 1000000;
  int64_t deadline = timeoutMs == UINT32_MAX ? INT64_MAX : now + timeoutMs;
  for (const auto& t : timers_) {
    if (t->expireMs >= 0) deadline = std::min(deadline, t->expireMs);
  }
  // Re-armed only when the deadline comes sooner, or the armed one has passed: slirp's timeout is
  // relative, so the deadline creeps later on every wake-up, and a timer that fires a little early
  // costs one spare pass (onTimer re-arms it) where a timerfd_settime per wake-up costs a syscall
  // per few frames.
  deadline = std::max<int64_t>(deadline, 1);  // 0 would disarm it
  if (deadline < armedMs_ || armedMs_ <= now) {
    itimerspec spec{};
    if (deadline != INT64_MAX) {
      spec.it_value.tv_sec = deadline / 1000;
      spec.it_value.tv_nsec = (deadline % 1000) * 1000000;
    }
    timerfd_settime(timerFd_, TFD_TIMER_ABSTIME, &spec, nullptr);
    armedMs_ = deadline;
  }
}

}  // namespace virtio
}  // namespace skiff
#endif  // SKIFF_SLIRP
