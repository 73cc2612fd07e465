#include "probe.h"

#include "backend/backend.h"

namespace skiff {

// Whatever backend.h's openHypervisor() would pick, opened and closed again: the same checks a
// machine's boot makes first (KVM: open /dev/kvm, API version), with the same messages.
HostProbe probeHost() {
  HostProbe probe;
  try {
    std::unique_ptr<Hypervisor> h = openHypervisor();
    probe.backend = h->name();
    probe.apiVersion = h->apiVersion();
  } catch (const std::exception& e) {
    probe.error = e.what();
  }
  return probe;
}

}  // namespace skiff
