// "0x1f": how addresses and sizes appear in skiff's native error messages.
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>

namespace skiff {

inline std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace skiff
