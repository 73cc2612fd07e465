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
