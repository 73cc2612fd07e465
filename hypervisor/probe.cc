#include "probe.h"

#include <cerrno>
#include <cstring>
#if defined(__linux__)
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <unistd.h>
#endif

namespace skiff {

HostProbe probeHost() {
  HostProbe probe;
#if defined(__linux__)
  int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    probe.error = std::string("open(/dev/kvm): ") + std::strerror(errno);
    return probe;
  }
  // KVM_GET_API_VERSION takes no argument and returns the version; safe on any KVM fd.
  int version = ioctl(fd, KVM_GET_API_VERSION, 0);
  int err = errno;
  close(fd);
  if (version < 0) {
    probe.error = std::string("ioctl(KVM_GET_API_VERSION): ") + std::strerror(err);
    return probe;
  }
  probe.backend = "kvm";
  probe.apiVersion = version;
#else
  probe.error = "no hypervisor backend for this OS in this build";
#endif
  return probe;
}

}  // namespace skiff
