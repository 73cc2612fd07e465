// One native microVM: memory, a kernel loaded for PVH, devices on the I/O bus, vCPUs.
// Plain C++: binding.cc adapts it to Node, and a C++ program could drive it alone.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "devices/serial.h"
#include "loop/event_loop.h"
#include "vmm/device_host.h"
#include "vmm/memory.h"
#include "vmm/mmio_bus.h"

namespace skiff {

struct MachineConfig {
  std::string kernelPath;
  std::string initrdPath;  // empty: none
  std::string cmdline;
  uint32_t cpus = 1;
  uint64_t memoryBytes = 256ull << 20;
  // Devices attached at boot, in order (device_host.h).
  std::vector<DeviceAttach> devices;
  // Do the doorbell (interrupt-line) work in the VMM even where the backend could: tests and
  // benchmarks of the fallback.
  bool emulateDoorbells = false;
  bool emulateInterruptLines = false;
  // Host console input read on the event loop (a pipe or terminal; vmm-run's stdin); -1: none.
  // Node feeds the console through consoleInput() instead.
  IoHandle consoleInput = -1;
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
  // How the devices' doorbells and interrupt lines were carried out, e.g.
  // "doorbells backend=1 emulated=0; interrupt lines backend=1 emulated=0" (empty: none asked for),
  // then why the backend's were not used, if it refused.
  std::string events;
};

class Machine final : public ExitHandler, private DeviceHost {
 public:
  using ConsoleOutput = std::function<void(const uint8_t* data, size_t size)>;
  Machine(MachineConfig config, ConsoleOutput console);
  ~Machine() override;

  // Boots and runs to the end on the calling thread, then stops the event loop and frees the
  // devices (a disk's lock is released when it returns). Never throws: failures are Kind::Error.
  MachineResult run();
  // Frees the VM, its devices and guest memory, after stopping the event loop. Call it after
  // run() returned, on a thread that may wait: destroying a VM takes 2-24 ms on KVM on PVM, so the
  // binding hands the result to JS first. The destructor does it too if it has not been done.
  void shutdown() { teardown(); }
  // From any thread; neither blocks (input is handed to the event loop).
  void kill();
  void consoleInput(const uint8_t* data, size_t size);
  // Host memory backing guest RAM right now (pages the guest or the loader touched); 0 before
  // boot and after the end. From any thread; for benchmarks.
  uint64_t guestResidentBytes();

  // ExitHandler (vCPU thread)
  void portIo(uint16_t port, uint8_t* data, uint32_t size, bool write) override;
  void mmio(uint64_t addr, uint8_t* data, uint32_t size, bool write) override;
  bool stopRequested() override { return stopping_.load(std::memory_order_acquire); }

 private:
  MachineResult boot();
  void teardown();
  void requestStop(MachineResult::Kind kind, uint32_t status, const std::string& detail, uint64_t rip = 0);
  void onVcpuStop(uint32_t id, const VcpuStop& stop);
  VcpuStop runVcpu(Vcpu& vcpu);
  void watchConsoleInput(IoHandle h);
  std::string eventsSummary() const;

  // DeviceHost, during boot (device_host.h).
  const GuestMemory& memory() override { return *memory_; }
  EventLoop& loop() override { return *loop_; }
  void addMmio(uint64_t base, uint64_t size, std::shared_ptr<MmioDevice> device) override;
  Doorbell& addDoorbell(uint64_t addr, uint32_t size, std::optional<uint64_t> match, std::function<void(uint64_t)> onRing) override;
  InterruptLine& interruptLine(uint32_t line) override;
  void appendCmdline(const std::string& words) override;
  VirtioSlot freeVirtioSlot() override;

  class MachineDoorbell;
  class MachineInterruptLine;

  MachineConfig config_;
  ConsoleOutput console_;
  std::string cmdline_;
  // Device I/O that is not a vCPU's own exit runs here: console input, doorbells, emulated
  // interrupt lines. Created with the machine, stopped before anything it touches is freed.
  std::unique_ptr<EventLoop> loop_;
  std::unique_ptr<Hypervisor> hypervisor_;
  std::unique_ptr<Vm> vm_;
  std::unique_ptr<GuestMemory> memory_;
  std::mutex memoryMu_;  // guestResidentBytes() against teardown
  MmioBus bus_;
  std::vector<std::unique_ptr<MachineDoorbell>> doorbells_;
  std::vector<std::unique_ptr<MachineInterruptLine>> lines_;
  std::string eventFallback_;  // why the backend's doorbells or lines were not used
  std::mutex teardownMu_;
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
