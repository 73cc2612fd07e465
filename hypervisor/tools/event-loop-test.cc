// The event loop's contract (loop/event_loop.h), checked without a VM: test/native-asan.test.ts
// builds and runs this with ASan+UBSan. Prints "event loop: N checks ok" or the failed check.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "loop/event_loop.h"

using namespace skiff;
using namespace std::chrono_literals;

static int checks = 0;
#define CHECK(cond)                                                          \
  do {                                                                       \
    checks++;                                                                \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "event loop: check failed at line %d: %s\n", __LINE__, #cond); \
      std::exit(1);                                                          \
    }                                                                        \
  } while (0)

// Polls `cond` for up to 5 s.
template <typename F>
bool eventually(F cond) {
  for (int i = 0; i < 5000; i++) {
    if (cond()) return true;
    std::this_thread::sleep_for(1ms);
  }
  return cond();
}

int main() {
  std::mutex errMu;
  std::vector<std::string> errors;
  auto loop = EventLoop::create([&](const std::string& m) {
    std::lock_guard<std::mutex> lock(errMu);
    errors.push_back(m);
  });

  // Tasks run in order, on the loop thread.
  {
    std::vector<int> order;
    std::atomic<bool> onLoop{true};
    for (int i = 0; i < 100; i++) loop->post([&, i] {
      order.push_back(i);
      if (!loop->onLoopThread()) onLoop = false;
    });
    std::atomic<bool> done{false};
    loop->post([&] { done = true; });
    CHECK(eventually([&] { return done.load(); }));
    CHECK(onLoop.load());
    CHECK(order.size() == 100);
    for (int i = 0; i < 100; i++) CHECK(order[i] == i);
    CHECK(!loop->onLoopThread());
  }

  // Signals from other threads all arrive (coalesced counts add up).
  {
    EventNotifier n;
    std::atomic<uint64_t> seen{0};
    loop->add(n.handle(), kReadable, [&](uint32_t ev) {
      if (ev & kReadable) seen += n.drain();
    });
    bool twice = false;
    try {
      loop->add(n.handle(), kReadable, [](uint32_t) {});
    } catch (const std::exception&) {
      twice = true;
    }
    CHECK(twice);
    std::vector<std::thread> ts;
    for (int t = 0; t < 4; t++) ts.emplace_back([&] {
      for (int i = 0; i < 1000; i++) n.signal();
    });
    for (auto& t : ts) t.join();
    CHECK(eventually([&] { return seen.load() == 4000; }));
    loop->remove(n.handle());
    n.signal();
    std::this_thread::sleep_for(20ms);
    CHECK(seen.load() == 4000);
  }

  // remove() from another thread waits for a running handler; none runs after it returns.
  {
    auto n = std::make_unique<EventNotifier>();
    std::atomic<bool> inHandler{false}, entered{false};
    std::atomic<int> calls{0};
    EventNotifier* raw = n.get();
    loop->add(n->handle(), kReadable, [&, raw](uint32_t) {
      inHandler = true;
      entered = true;
      calls++;
      std::this_thread::sleep_for(50ms);
      raw->drain();
      inHandler = false;
    });
    n->signal();
    CHECK(eventually([&] { return entered.load(); }));
    loop->remove(n->handle());
    CHECK(!inHandler.load());
    int after = calls.load();
    n->signal();
    std::this_thread::sleep_for(20ms);
    CHECK(calls.load() == after);
    n.reset();  // the handler's captures may go now
  }

  // A handle closed and its number reused reaches only the new handler.
  {
    auto a = std::make_unique<EventNotifier>();
    int number = a->handle();
    std::atomic<int> oldCalls{0}, newCalls{0};
    loop->add(a->handle(), kReadable, [&](uint32_t) { oldCalls++; });
    loop->remove(a->handle());
    a.reset();
    EventNotifier b;
    CHECK(b.handle() == number);  // the lowest free fd: the same number
    loop->add(b.handle(), kReadable, [&](uint32_t) {
      newCalls++;
      b.drain();
    });
    b.signal();
    CHECK(eventually([&] { return newCalls.load() == 1; }));
    CHECK(oldCalls.load() == 0);
    loop->remove(b.handle());
  }

  // A task that throws: reported, and the loop goes on.
  {
    loop->post([] { throw std::runtime_error("boom"); });
    std::atomic<bool> after{false};
    loop->post([&] { after = true; });
    CHECK(eventually([&] { return after.load(); }));
    std::lock_guard<std::mutex> lock(errMu);
    CHECK(errors.size() == 1 && errors[0] == "boom");
  }

  // remove() from a handler, of itself, even with more events in the same wait.
  {
    EventNotifier n;
    std::atomic<int> calls{0};
    std::atomic<bool> removed{false};
    loop->add(n.handle(), kReadable, [&](uint32_t) {
      calls++;
      loop->remove(n.handle());  // not drained: level-triggered, it would fire again
      removed = true;
    });
    n.signal();
    CHECK(eventually([&] { return removed.load(); }));
    std::this_thread::sleep_for(20ms);
    CHECK(calls.load() == 1);
  }

  // stop(): queued tasks are dropped (their captures freed), later posts refused, remove still works.
  {
    auto token = std::make_shared<int>(1);
    std::atomic<bool> gate{false};
    loop->post([&] {
      while (!gate) std::this_thread::sleep_for(1ms);
    });
    loop->post([token] {});
    CHECK(token.use_count() == 2);
    EventNotifier n;
    loop->add(n.handle(), kReadable, [](uint32_t) {});
    std::thread stopper([&] { loop->stop(); });
    std::this_thread::sleep_for(20ms);
    gate = true;
    stopper.join();
    CHECK(token.use_count() == 1);
    CHECK(!loop->post([] {}));
    loop->remove(n.handle());  // returns at once: no loop thread any more
    loop->stop();               // twice is fine
  }
  loop.reset();
  std::printf("event loop: %d checks ok\n", checks);
  return 0;
}
