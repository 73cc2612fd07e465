// What hardware virtualization this host offers, asked of the OS directly (no Node types here).
#pragma once
#include <string>

namespace skiff {

struct HostProbe {
  std::string backend;   // "kvm", or "" when none is available
  int apiVersion = -1;   // KVM_GET_API_VERSION, -1 when not asked
  std::string error;     // why none is available, with the call and errno that failed
};

HostProbe probeHost();

}  // namespace skiff
