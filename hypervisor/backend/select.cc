// The one place a backend is chosen.
#include "backend/backend.h"
#if defined(__linux__)
#include "backend/kvm/kvm.h"
#endif

namespace skiff {

std::unique_ptr<Hypervisor> openHypervisor() {
#if defined(__linux__)
  return openKvm();  // throws with the failing call (open /dev/kvm, API version) when unusable
#else
  throw HypervisorError("no hypervisor backend for this OS in this build");
#endif
}

}  // namespace skiff
