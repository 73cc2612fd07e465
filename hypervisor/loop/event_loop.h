// A small event loop for one machine's device I/O: one thread waiting on file handles, woken by
// other threads to run posted tasks. The interface is portable; each OS implements it once
// (epoll.cc on Linux; kqueue on macOS and an I/O completion port on Windows would do the same).
//
// Threading contract:
// - Handlers and tasks run on the loop thread, one at a time, in the order their events arrive.
// - add, modify, remove and post may be called from any thread, including from a handler.
// - When remove(h) returns, h's handler is not running and will never run again, so whatever it
//   captured may be freed. From the loop thread this holds at once (even for events already
//   collected in the same wait); from another thread remove waits for the loop to acknowledge.
// - stop() (and the destructor) ends the thread; tasks not yet run are dropped, and post()
//   returns false from then on. It must not be called from a handler.
// - A handler or task that throws does not end the loop: the exception's message goes to the
//   error callback given at creation (the machine ends itself with it).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace skiff {

// What the OS waits on: a file descriptor on POSIX (a Windows implementation would use HANDLE).
using IoHandle = int;

enum IoEvent : uint32_t {
  kReadable = 1u << 0,
  kWritable = 1u << 1,
  kHangup = 1u << 2,  // reported, never asked for
  kError = 1u << 3,   // reported, never asked for
  kPriority = 1u << 4,  // urgent (out-of-band) data: poll's POLLPRI
};

// A counter another thread (or the hypervisor itself) bumps to wake a waiter: an eventfd on
// Linux, which KVM can signal (ioeventfd) and wait on (irqfd) in the kernel.
class EventNotifier {
 public:
  EventNotifier();  // throws HypervisorError if the OS refuses
  ~EventNotifier();
  EventNotifier(const EventNotifier&) = delete;
  EventNotifier& operator=(const EventNotifier&) = delete;

  IoHandle handle() const { return handle_; }
  // From any thread; never blocks.
  void signal();
  // How many signals since the last drain (0: none). Never blocks.
  uint64_t drain();

 private:
  IoHandle handle_;
};

class EventLoop {
 public:
  using Handler = std::function<void(uint32_t events)>;  // IoEvent bits
  using Task = std::function<void()>;
  using ErrorCallback = std::function<void(const std::string& message)>;

  // Starts the loop's thread. Throws HypervisorError if the OS refuses.
  static std::unique_ptr<EventLoop> create(ErrorCallback onError);
  virtual ~EventLoop() = default;

  // Calls handler(events) on the loop thread whenever `h` is ready for any of `events`
  // (level-triggered: a handler that leaves data unread is called again). Throws if `h` is
  // already added or the OS refuses it.
  virtual void add(IoHandle h, uint32_t events, Handler handler) = 0;
  // Changes the events an added handle is watched for, keeping its handler: one system call
  // (epoll_ctl MOD) where remove + add make two, plus the handler's bookkeeping. Events already
  // collected under the old set may still reach the handler. Throws if `h` is not added (or was
  // closed, so the OS forgot it) or the OS refuses.
  virtual void modify(IoHandle h, uint32_t events) = 0;
  // See the contract above. Removing a handle that is not there does nothing.
  virtual void remove(IoHandle h) = 0;
  // Runs task on the loop thread soon. False (and the task is dropped) once the loop stopped.
  virtual bool post(Task task) = 0;
  virtual void stop() = 0;
  virtual bool onLoopThread() const = 0;
};

}  // namespace skiff
