// The smallest test harness the device and transport test programs share: CHECK counts failures
// instead of aborting (one run reports every broken check), TEST registers a function by name.
#pragma once
#include <cstdio>
#include <functional>
#include <utility>
#include <vector>

namespace skiff::virtio::testing {

inline int checksFailed = 0;

inline std::vector<std::pair<const char*, std::function<void()>>>& tests() {
  static std::vector<std::pair<const char*, std::function<void()>>> all;
  return all;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { tests().emplace_back(name, std::move(fn)); }
};

// Runs every registered test in order, one "ok NAME" / "FAIL NAME" line each, then the totals line
// the ava tests look for; the program's exit status.
inline int runAll() {
  int passed = 0, failed = 0;
  for (auto& [name, fn] : tests()) {
    int before = checksFailed;
    fn();
    bool ok = checksFailed == before;
    std::printf("%s %s\n", ok ? "ok" : "FAIL", name);
    (ok ? passed : failed)++;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace skiff::virtio::testing

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++::skiff::virtio::testing::checksFailed;                                       \
    }                                                                                 \
  } while (0)

#define TEST(name)                                                    \
  void name();                                                        \
  ::skiff::virtio::testing::Register register_##name(#name, name);    \
  void name()
