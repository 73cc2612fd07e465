// The tools' `--publish HOST:GUEST[/udp]` argument (the CLI parses its own in src/vm/config.ts).
// Header-only, for any forward struct with `udp`, `hostPort` and `guestPort`.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <string>

namespace skiff {
namespace tools {

// "HOST:GUEST" or "HOST:GUEST/udp", ports 1-65535; false if it is not that.
template <typename Forward>
bool parseForward(std::string s, Forward& out) {
  out.udp = s.size() > 4 && s.compare(s.size() - 4, 4, "/udp") == 0;
  if (out.udp) s.resize(s.size() - 4);
  size_t colon = s.find(':');
  if (colon == std::string::npos) return false;
  auto port = [](const std::string& p, uint16_t& v) {
    if (p.empty() || p.size() > 5 || p.find_first_not_of("0123456789") != std::string::npos) return false;
    unsigned long n = std::strtoul(p.c_str(), nullptr, 10);
    if (n < 1 || n > 65535) return false;
    v = static_cast<uint16_t>(n);
    return true;
  };
  return port(s.substr(0, colon), out.hostPort) && port(s.substr(colon + 1), out.guestPort);
}

}  // namespace tools
}  // namespace skiff
