// The hypervisor backend interface: what skiff needs from KVM, Hypervisor.framework or WHP, and
// nothing more. Device and machine code use only these types; no backend type leaks out.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "loop/event_loop.h"

namespace skiff {

// A failed host call, with the call and errno (or backend status) so a user can act on it.
class HypervisorError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Where the vCPU starts. Flat32 is the PVH entry state (protected mode, paging off); Long64 is the
// Linux 64-bit boot protocol state (long mode, identity-mapped page tables at cr3).
struct BootCpuState {
  enum class Mode { Flat32, Long64 } mode = Mode::Flat32;
  uint64_t rip = 0;
  uint64_t rsp = 0;
  uint64_t rsi = 0;
  uint64_t rbx = 0;
  uint64_t cr3 = 0;       // Long64 only
  uint64_t gdtBase = 0;   // a GDT the VMM wrote into guest memory (layout.h)
  uint16_t gdtLimit = 0;
};

// Port and MMIO accesses are handed to this while the vCPU runs; for reads the handler fills data.
class ExitHandler {
 public:
  virtual ~ExitHandler() = default;
  virtual void portIo(uint16_t port, uint8_t* data, uint32_t size, bool write) = 0;
  virtual void mmio(uint64_t addr, uint8_t* data, uint32_t size, bool write) = 0;
  // Checked after every access: true ends run() with Stop::Requested.
  virtual bool stopRequested() = 0;
};

// Why Vcpu::run returned. Everything that is not port or MMIO I/O ends the run.
struct VcpuStop {
  enum class Reason { Requested, Halt, Shutdown, InternalError, FailEntry, Unsupported } reason;
  uint64_t rip = 0;
  std::string detail;
};

class Vcpu {
 public:
  virtual ~Vcpu() = default;
  virtual void setBootState(const BootCpuState& state) = 0;
  // Runs until a stop; I/O goes to handler. Blocking: call it on the vCPU's own thread.
  virtual VcpuStop run(ExitHandler& handler) = 0;
  // From any thread: makes a run() in progress return Requested soon.
  virtual void kick() = 0;
};

class Vm {
 public:
  virtual ~Vm() = default;
  // host must stay mapped for the Vm's lifetime; gpa and size page-aligned.
  virtual void mapMemory(uint32_t slot, uint64_t gpa, void* host, uint64_t size) = 0;
  virtual std::unique_ptr<Vcpu> createVcpu(uint32_t id) = 0;
  // Drives interrupt line `line` of the VM's interrupt controller.
  virtual void setIrqLine(uint32_t line, bool level) = 0;

  // The two fast paths of a paravirtual device, done inside the hypervisor where it can:
  // I/O event: when the guest writes `size` bytes (1, 2, 4 or 8) at MMIO address `addr` (and,
  // with `match`, the value written equals it), signal `notifier` and resume the guest at once,
  // with no exit to the VMM. IRQ event: whenever `notifier` is signalled, pulse interrupt `line`.
  // A backend that cannot throws HypervisorError (the default); the machine then does the same
  // work itself, in its exit handler and on its event loop (vmm/machine.cc). Remove before the
  // notifier is destroyed.
  virtual void addIoEvent(uint64_t addr, uint32_t size, std::optional<uint64_t> match, const EventNotifier& notifier) {
    (void)addr, (void)size, (void)match, (void)notifier;
    throw HypervisorError("I/O events are not offered by this backend");
  }
  virtual void removeIoEvent(uint64_t addr, uint32_t size, std::optional<uint64_t> match, const EventNotifier& notifier) {
    (void)addr, (void)size, (void)match, (void)notifier;
  }
  virtual void addIrqEvent(uint32_t line, const EventNotifier& notifier) {
    (void)line, (void)notifier;
    throw HypervisorError("IRQ events are not offered by this backend");
  }
  virtual void removeIrqEvent(uint32_t line, const EventNotifier& notifier) { (void)line, (void)notifier; }
};

class Hypervisor {
 public:
  virtual ~Hypervisor() = default;
  virtual const char* name() const = 0;
  // The backend's own interface version (KVM: KVM_GET_API_VERSION), for `skiff` diagnostics.
  virtual int apiVersion() const = 0;
  virtual std::unique_ptr<Vm> createVm(uint32_t vcpus) = 0;
};

// The one place a backend is chosen: compiled-in availability, then a runtime probe. Throws
// HypervisorError saying why none is available on this host.
std::unique_ptr<Hypervisor> openHypervisor();

}  // namespace skiff
