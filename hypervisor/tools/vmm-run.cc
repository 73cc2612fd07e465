// Runs one machine from the command line with the plain C++ core, no Node: for debugging and for
// the sanitizer test (test/native-asan.test.ts builds this with ASan and UBSan).
//   vmm-run [--stdin] [--doorbell-test] [--emulate-doorbells] [--emulate-irqs] [--rng] [--disk=FILE[,ro]]...
//           [--vsock=DIR] [--net] [--publish=HOST:GUEST[/udp]]... KERNEL [CMDLINE] [CPUS] [INITRD]
// --stdin: stdin is the guest's console input, read on the machine's event loop.
// --doorbell-test: attach the doorbell test device (devices/doorbell_test.h).
// --emulate-doorbells, --emulate-irqs: the VMM does doorbells (interrupt lines) even where the
// backend could.
// --rng, --disk=FILE[,ro] (repeatable; serial skiff-disk-N), --vsock=DIR: skiff's virtio devices
// (vmm/virtio_devices.h); DIR is where vsock's Unix sockets go.
// --net: virtio-net behind libslirp (a build with -DSKIFF_SLIRP -lslirp), MAC
// Net::stableMac("vmm-run"); --publish=HOST:GUEST[/udp] (repeatable) implies it.
// Prints the console, then one line: "[result kind=K status=S detail=D events=E]".
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "devices/doorbell_test.h"
#include "devices/virtio/net.h"
#include "vmm/machine.h"
#include "vmm/virtio_devices.h"
#include "tools/parse_forward.h"

namespace {

const char kUsage[] = "usage: vmm-run [--stdin] [--doorbell-test] [--emulate-doorbells] [--emulate-irqs] [--rng] [--disk=FILE[,ro]]... [--vsock=DIR] [--net] [--publish=HOST:GUEST[/udp]]... KERNEL [CMDLINE] [CPUS] [INITRD]\n";

}  // namespace

int main(int argc, char** argv) {
  skiff::MachineConfig config;
  skiff::VirtioConfig virtio;
  int i = 1;
  for (; i < argc && std::strncmp(argv[i], "--", 2) == 0; i++) {
    if (std::strcmp(argv[i], "--stdin") == 0) config.consoleInput = STDIN_FILENO;
    else if (std::strcmp(argv[i], "--doorbell-test") == 0) config.devices.push_back(skiff::attachDoorbellTest);
    else if (std::strcmp(argv[i], "--emulate-doorbells") == 0) config.emulateDoorbells = true;
    else if (std::strcmp(argv[i], "--emulate-irqs") == 0) config.emulateInterruptLines = true;
    else if (std::strcmp(argv[i], "--rng") == 0) virtio.rng = true;
    else if (std::strncmp(argv[i], "--vsock=", 8) == 0) virtio.vsockDir = argv[i] + 8;
    else if (std::strcmp(argv[i], "--net") == 0) virtio.net.enabled = true;
    else if (std::strncmp(argv[i], "--publish=", 10) == 0) {
      skiff::VirtioNet::Forward f;
      if (!skiff::tools::parseForward(argv[i] + 10, f)) {
        std::fprintf(stderr, "vmm-run: %s: expected --publish=HOST:GUEST or HOST:GUEST/udp, ports 1-65535\n", argv[i]);
        return 2;
      }
      virtio.net.enabled = true;
      virtio.net.forwards.push_back(f);
    }
    else if (std::strncmp(argv[i], "--disk=", 7) == 0) {
      std::string spec = argv[i] + 7;
      bool ro = spec.size() > 3 && spec.compare(spec.size() - 3, 3, ",ro") == 0;
      if (ro) spec.resize(spec.size() - 3);
      virtio.disks.push_back({spec, ro, "skiff-disk-" + std::to_string(virtio.disks.size())});
    }
    else break;
  }
  if (i >= argc) {
    std::fprintf(stderr, "%s", kUsage);
    return 2;
  }
  if (virtio.net.enabled) virtio.net.mac = skiff::virtio::Net::stableMac("vmm-run");
  if (virtio.rng || !virtio.disks.empty() || !virtio.vsockDir.empty() || virtio.net.enabled) config.devices.push_back(skiff::attachVirtio(virtio));
  config.kernelPath = argv[i];
  config.cmdline = argc > i + 1 ? argv[i + 1] : "";
  config.cpus = argc > i + 2 ? static_cast<uint32_t>(std::atoi(argv[i + 2])) : 1;
  if (config.cpus < 1 || config.cpus > 64) config.cpus = 1;
  config.memoryBytes = 32ull << 20;
  if (argc > i + 3) config.initrdPath = argv[i + 3];
  skiff::Machine machine(config, [](const uint8_t* data, size_t size) {
    std::fwrite(data, 1, size, stdout);
    std::fflush(stdout);
  });
  skiff::MachineResult r = machine.run();
  const char* kinds[] = {"exited", "reset", "shutdown", "killed", "error"};
  std::printf("\n[result kind=%s status=%u detail=%s events=%s]\n", kinds[static_cast<int>(r.kind)], r.status, r.detail.c_str(), r.events.c_str());
  if (std::getenv("VMM_RUN_TIMES")) std::fprintf(stderr, "setup %.3f ms, run %.3f ms\n", r.setupMs, r.runMs);
  return 0;
}
