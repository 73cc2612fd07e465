// Runs one machine from the command line with the plain C++ core, no Node: for debugging and for
// the sanitizer test (test/native-asan.test.ts builds this with ASan and UBSan).
//   vmm-run KERNEL [CMDLINE] [CPUS] [INITRD]
// Prints the console, then one line: "[result kind=K status=S detail=D]".
#include <cstdio>
#include <cstdlib>
#include <string>

#include "vmm/machine.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: vmm-run KERNEL [CMDLINE] [CPUS] [INITRD]\n");
    return 2;
  }
  skiff::MachineConfig config;
  config.kernelPath = argv[1];
  config.cmdline = argc > 2 ? argv[2] : "";
  config.cpus = argc > 3 ? static_cast<uint32_t>(std::atoi(argv[3])) : 1;
  if (config.cpus < 1 || config.cpus > 64) config.cpus = 1;
  config.memoryBytes = 32ull << 20;
  if (argc > 4) config.initrdPath = argv[4];
  skiff::Machine machine(config, [](const uint8_t* data, size_t size) { std::fwrite(data, 1, size, stdout); });
  skiff::MachineResult r = machine.run();
  const char* kinds[] = {"exited", "reset", "shutdown", "killed", "error"};
  std::printf("\n[result kind=%s status=%u detail=%s]\n", kinds[static_cast<int>(r.kind)], r.status, r.detail.c_str());
  return 0;
}
