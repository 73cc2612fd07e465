// The Linux event loop: epoll, with an eventfd to wake it for posted tasks and for stop().
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "backend/backend.h"
#include "loop/event_loop.h"

namespace skiff {
namespace {

[[noreturn]] void fail(const char* call) { throw HypervisorError(std::string(call) + ": " + std::strerror(errno)); }

uint32_t toEpoll(uint32_t events) {
  return ((events & kReadable) ? EPOLLIN : 0u) | ((events & kWritable) ? EPOLLOUT : 0u) | ((events & kPriority) ? EPOLLPRI : 0u);
}
uint32_t fromEpoll(uint32_t e) {
  return ((e & EPOLLIN) ? kReadable : 0u) | ((e & EPOLLOUT) ? kWritable : 0u) | ((e & (EPOLLHUP | EPOLLRDHUP)) ? kHangup : 0u) | ((e & EPOLLERR) ? kError : 0u) |
         ((e & EPOLLPRI) ? kPriority : 0u);
}

class EpollLoop final : public EventLoop {
 public:
  explicit EpollLoop(ErrorCallback onError) : onError_(std::move(onError)) {
    epoll_ = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_ < 0) fail("epoll_create1");
    // Key 0 is the wake notifier; handles get keys from 1.
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = 0;
    if (epoll_ctl(epoll_, EPOLL_CTL_ADD, wake_.handle(), &ev) < 0) {
      int saved = errno;
      close(epoll_);
      errno = saved;
      fail("epoll_ctl(wake)");
    }
    thread_ = std::thread([this] { loop(); });
  }

  ~EpollLoop() override {
    stop();
    close(epoll_);
  }

  void add(IoHandle h, uint32_t events, Handler handler) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (keys_.count(h)) throw HypervisorError("event loop: handle " + std::to_string(h) + " added twice");
    uint64_t key = nextKey_++;
    epoll_event ev{};
    ev.events = toEpoll(events);
    ev.data.u64 = key;  // not the fd: an fd closed and reused must not reach the old handler
    if (epoll_ctl(epoll_, EPOLL_CTL_ADD, h, &ev) < 0) fail("epoll_ctl(EPOLL_CTL_ADD)");
    keys_[h] = key;
    handlers_[key] = std::make_shared<Handler>(std::move(handler));
  }

  void modify(IoHandle h, uint32_t events) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = keys_.find(h);
    if (it == keys_.end()) throw HypervisorError("event loop: modify of handle " + std::to_string(h) + ", which is not added");
    epoll_event ev{};
    ev.events = toEpoll(events);
    ev.data.u64 = it->second;
    if (epoll_ctl(epoll_, EPOLL_CTL_MOD, h, &ev) < 0) fail("epoll_ctl(EPOLL_CTL_MOD)");
  }

  void remove(IoHandle h) override {
    if (!onLoopThread()) {
      // Through the loop thread, so that when this returns the handler is not running.
      std::unique_lock<std::mutex> lock(mu_);
      if (!exited_) {
        uint64_t ticket = 0;
        if (!stopping_) {
          ticket = ++removeTickets_;
          tasks_.push_back([this, h, ticket] {
            removeNow(h);
            std::lock_guard<std::mutex> done(mu_);
            removeDone_ = ticket;  // tasks run in order: tickets complete in order
            removed_.notify_all();
          });
          wake_.signal();
        }
        // A stopping loop drops queued tasks and runs no more handlers once it has exited.
        removed_.wait(lock, [&] { return exited_ || (ticket != 0 && removeDone_ >= ticket); });
      }
    }
    removeNow(h);  // idempotent
  }

  bool post(Task task) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return false;
      tasks_.push_back(std::move(task));
    }
    // From the loop thread (a handler asking the device to run, say) the loop looks at its tasks
    // before it waits again: no eventfd write, and no wake-up just to read it back.
    if (!onLoopThread()) wake_.signal();
    return true;
  }

  void stop() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    wake_.signal();
    if (onLoopThread()) return;  // not allowed from a handler; the destructor joins
    std::lock_guard<std::mutex> lock(joinMu_);
    if (thread_.joinable()) thread_.join();
  }

  bool onLoopThread() const override { return std::this_thread::get_id() == loopId_.load(); }

 private:
  void removeNow(IoHandle h) {
    std::shared_ptr<Handler> gone;  // freed after the lock: its captures may post as they go
    std::lock_guard<std::mutex> lock(mu_);
    auto it = keys_.find(h);
    if (it == keys_.end()) return;
    auto handler = handlers_.find(it->second);
    gone = std::move(handler->second);
    handlers_.erase(handler);
    keys_.erase(it);
    // The handle may already be closed (then the kernel dropped it from the set itself).
    epoll_ctl(epoll_, EPOLL_CTL_DEL, h, nullptr);
  }

  void guarded(const std::function<void()>& f) {
    try {
      f();
    } catch (const std::exception& e) {
      if (onError_) onError_(e.what());
    } catch (...) {
      if (onError_) onError_("event loop: unknown exception");
    }
  }

  void loop() {
    loopId_.store(std::this_thread::get_id());
    epoll_event events[32];
    for (;;) {
      bool pending;
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_) break;
        pending = !tasks_.empty();
      }
      if (pending) {
        runTasks();
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_) break;
        pending = !tasks_.empty();
      }
      // Tasks that posted more: look at the handles without waiting, then run those.
      int n = epoll_wait(epoll_, events, 32, pending ? 0 : -1);
      if (n < 0) {
        if (errno == EINTR) continue;
        guarded([] { fail("epoll_wait"); });
        break;
      }
      for (int i = 0; i < n; i++) {
        uint64_t key = events[i].data.u64;
        if (key == 0) {
          wake_.drain();
          runTasks();
          continue;
        }
        std::shared_ptr<Handler> handler;
        {
          std::lock_guard<std::mutex> lock(mu_);
          if (stopping_) break;
          auto it = handlers_.find(key);
          if (it == handlers_.end()) continue;  // removed earlier in this batch
          handler = it->second;
        }
        uint32_t e = fromEpoll(events[i].events);
        guarded([&] { (*handler)(e); });
      }
    }
    std::deque<Task> dropped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      exited_ = true;
      dropped.swap(tasks_);
    }
    removed_.notify_all();
    dropped.clear();  // outside the lock: a task's captures may post as they go
  }

  void runTasks() {
    std::deque<Task> batch;
    {
      std::lock_guard<std::mutex> lock(mu_);
      batch.swap(tasks_);
    }
    for (auto& t : batch) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_) return;
      }
      guarded(t);
    }
  }

  ErrorCallback onError_;
  int epoll_ = -1;
  EventNotifier wake_;
  std::mutex mu_;
  bool stopping_ = false;
  bool exited_ = false;
  std::deque<Task> tasks_;
  std::condition_variable removed_;
  uint64_t removeTickets_ = 0;
  uint64_t removeDone_ = 0;
  uint64_t nextKey_ = 1;
  std::unordered_map<IoHandle, uint64_t> keys_;
  std::unordered_map<uint64_t, std::shared_ptr<Handler>> handlers_;
  std::atomic<std::thread::id> loopId_{};
  std::mutex joinMu_;
  std::thread thread_;
};

}  // namespace

EventNotifier::EventNotifier() : handle_(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {
  if (handle_ < 0) fail("eventfd");
}

EventNotifier::~EventNotifier() { close(handle_); }

void EventNotifier::signal() {
  uint64_t one = 1;
  // Only fails with EAGAIN when the counter is at its maximum: the waiter is woken anyway.
  ssize_t r = write(handle_, &one, sizeof one);
  (void)r;
}

uint64_t EventNotifier::drain() {
  uint64_t count = 0;
  if (read(handle_, &count, sizeof count) != static_cast<ssize_t>(sizeof count)) return 0;  // EAGAIN: none
  return count;
}

std::unique_ptr<EventLoop> EventLoop::create(ErrorCallback onError) { return std::make_unique<EpollLoop>(std::move(onError)); }

}  // namespace skiff
