// One native microVM: memory, a kernel loaded for PVH, devices on the I/O bus, vCPUs.
// Plain C++: binding.cc adapts it to Node, and a C++ program could drive it alone.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "devices/serial.h"

namespace skiff {

struct MachineConfig {
  std::string kernelPath;
  std::string initrdPath;  // empty: none
  std::string cmdline;
  uint32_t cpus = 1;
  uint64_t memoryBytes = 256ull << 20;
};

struct MachineResult {
  // exited: the exit device got `status`; reset: i8042 reset; shutdown: triple fault;
  // killed: kill() was called; error: the VMM or the backend failed (detail says how).
  enum class Kind { Exited, Reset, Shutdown, Killed, Error } kind = Kind::Error;
  uint32_t status = 0;
  std::string detail;
  uint64_t rip = 0;
  // Host-side figures, for benchmarks.
  double setupMs = 0;  // config → first KVM_RUN
  double runMs = 0;    // first KVM_RUN → end
};

class Machine final : public ExitHandler {
 public:
  using ConsoleOutput = std::function<void(const uint8_t* data, size_t size)>;
  Machine(MachineConfig config, ConsoleOutput console);
  ~Machine() override;

  // Boots and runs to the end on the calling thread. Never throws: failures are Kind::Error.
  MachineResult run();
  // From any thread.
  void kill();
  void consoleInput(const uint8_t* data, size_t size);

  // ExitHandler (vCPU thread)
  void portIo(uint16_t port, uint8_t* data, uint32_t size, bool write) override;
  void mmio(uint64_t addr, uint8_t* data, uint32_t size, bool write) override;
  bool stopRequested() override { return stopping_.load(std::memory_order_acquire); }

 private:
  MachineResult boot();
  void requestStop(MachineResult::Kind kind, uint32_t status, const std::string& detail, uint64_t rip = 0);
  void onVcpuStop(uint32_t id, const VcpuStop& stop);
  VcpuStop runVcpu(Vcpu& vcpu);

  MachineConfig config_;
  ConsoleOutput console_;
  std::unique_ptr<Hypervisor> hypervisor_;
  std::unique_ptr<Vm> vm_;
  // The UART raises its line from the vCPU thread and from consoleInput's thread: it reads the
  // VM through this, which is null until the VM exists.
  std::atomic<Vm*> irqVm_{nullptr};
  std::unique_ptr<Serial> serial_;
  std::mutex vcpusMu_;
  std::vector<std::unique_ptr<Vcpu>> vcpus_;
  std::atomic<bool> stopping_{false};
  std::mutex resultMu_;
  bool haveResult_ = false;
  MachineResult result_;
};

}  // namespace skiff
