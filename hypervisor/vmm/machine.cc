#include "vmm/machine.h"

#include <chrono>
#include <cstring>
#include <fstream>
#include <iterator>
#include <thread>

#include "vmm/boot.h"
#include "vmm/layout.h"
#include "vmm/memory.h"

namespace skiff {
namespace {

using Clock = std::chrono::steady_clock;
double msSince(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

std::vector<uint8_t> readFile(const std::string& what, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw BootError("cannot read " + what + " " + path + ": " + std::strerror(errno));
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

bool isElf(const std::vector<uint8_t>& f) { return f.size() >= 4 && std::memcmp(f.data(), "\x7f" "ELF", 4) == 0; }

std::string hex(uint64_t v) {
  char buf[24];
  snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

Machine::Machine(MachineConfig config, ConsoleOutput console) : config_(std::move(config)), console_(std::move(console)) {
  // The UART exists from the start so that console input sent before boot is kept for the guest.
  serial_ = std::make_unique<Serial>(console_, [this] {
    if (Vm* vm = irqVm_.load(std::memory_order_acquire)) {
      vm->setIrqLine(layout::kSerialIrq, true);
      vm->setIrqLine(layout::kSerialIrq, false);
    }
  });
}

Machine::~Machine() = default;

void Machine::requestStop(MachineResult::Kind kind, uint32_t status, const std::string& detail, uint64_t rip) {
  {
    std::lock_guard<std::mutex> lock(resultMu_);
    if (!haveResult_) {  // the first ending wins: a kill after an exit does not change it
      haveResult_ = true;
      result_.kind = kind;
      result_.status = status;
      result_.detail = detail;
      result_.rip = rip;
    }
  }
  stopping_.store(true, std::memory_order_release);
  std::lock_guard<std::mutex> lock(vcpusMu_);
  for (auto& v : vcpus_) v->kick();
}

void Machine::kill() { requestStop(MachineResult::Kind::Killed, 0, "killed"); }

void Machine::consoleInput(const uint8_t* data, size_t size) { serial_->input(data, size); }

void Machine::portIo(uint16_t port, uint8_t* data, uint32_t size, bool write) {
  if (port >= layout::kSerialPort && port < layout::kSerialPort + 8) {
    // The UART's registers are bytes; a wider access touches consecutive registers.
    for (uint32_t i = 0; i < size && port + i < layout::kSerialPort + 8; i++) {
      uint16_t offset = static_cast<uint16_t>(port + i - layout::kSerialPort);
      if (write) serial_->write(offset, data[i]);
      else data[i] = serial_->read(offset);
    }
    return;
  }
  if (port == layout::kExitPort) {
    if (write) {
      uint32_t status = 0;
      std::memcpy(&status, data, size < 4 ? size : 4);
      requestStop(MachineResult::Kind::Exited, status, "");
    } else {
      std::memset(data, 0, size);
    }
    return;
  }
  if (port == layout::kI8042CommandPort) {
    if (write && size == 1 && data[0] == 0xfe) requestStop(MachineResult::Kind::Reset, 0, "i8042 reset");
    if (!write) std::memset(data, 0, size);  // status: no data, input buffer empty
    return;
  }
  // Nothing here: reads float high, writes vanish, as on a real bus.
  if (!write) std::memset(data, 0xff, size);
}

void Machine::mmio(uint64_t, uint8_t* data, uint32_t size, bool write) {
  if (!write) std::memset(data, 0xff, size);
}

MachineResult Machine::boot() {
  auto start = Clock::now();
  std::vector<uint8_t> kernel = readFile("kernel", config_.kernelPath);
  std::vector<uint8_t> initrd = config_.initrdPath.empty() ? std::vector<uint8_t>() : readFile("initrd", config_.initrdPath);

  // The recipe: hypervisor, memory, kernel (PVH for an ELF vmlinux, else the 64-bit boot
  // protocol for a bzImage), initrd, boot info, vCPU.
  hypervisor_ = openHypervisor();
  vm_ = hypervisor_->createVm(config_.cpus);
  GuestMemory memory(config_.memoryBytes);
  uint32_t slot = 0;
  for (const auto& r : memory.regions()) vm_->mapMemory(slot++, r.gpa, r.host, r.size);
  BootCpuState cpu;
  if (isElf(kernel)) {
    LoadedKernel loaded = loadPvhElf(kernel, memory);
    cpu = writePvhBootInfo(memory, loaded, config_.cmdline, placeInitrd(initrd, memory, loaded.end));
  } else {
    LoadedBzImage image = loadBzImage(kernel, memory);
    cpu = writeBzImageBootInfo(memory, image, config_.cmdline, placeInitrd(initrd, memory, image.kernel.end, image.initrdCeiling));
  }
  irqVm_.store(vm_.get(), std::memory_order_release);
  writeMpTable(memory, config_.cpus);
  {
    std::lock_guard<std::mutex> lock(vcpusMu_);
    for (uint32_t id = 0; id < config_.cpus; id++) vcpus_.push_back(vm_->createVcpu(id));
  }
  vcpus_[0]->setBootState(cpu);

  double setupMs = msSince(start);
  auto running = Clock::now();
  // Application processors wait inside KVM (in-kernel LAPIC) until the guest sends them
  // INIT/SIPI; each runs on its own thread. The bootstrap processor runs on this one.
  std::vector<std::thread> aps;
  for (uint32_t id = 1; id < config_.cpus; id++) {
    Vcpu* ap = vcpus_[id].get();
    aps.emplace_back([this, ap, id] { onVcpuStop(id, runVcpu(*ap)); });
  }
  onVcpuStop(0, runVcpu(*vcpus_[0]));
  for (auto& t : aps) t.join();

  std::lock_guard<std::mutex> lock(resultMu_);
  result_.setupMs = setupMs;
  result_.runMs = msSince(running);
  return result_;
}

// A failing backend call on a vCPU thread must end the machine, not the process.
VcpuStop Machine::runVcpu(Vcpu& vcpu) {
  try {
    return vcpu.run(*this);
  } catch (const std::exception& e) {
    return VcpuStop{VcpuStop::Reason::InternalError, 0, e.what()};
  }
}

// The first vCPU to end the machine decides the result; the others are then kicked out.
void Machine::onVcpuStop(uint32_t id, const VcpuStop& stop) {
  if (stop.reason == VcpuStop::Reason::Requested) return;  // someone else ended it
  MachineResult::Kind kind = MachineResult::Kind::Error;
  std::string detail;
  switch (stop.reason) {
    case VcpuStop::Reason::Shutdown:
      kind = MachineResult::Kind::Shutdown;
      detail = stop.detail;
      break;
    case VcpuStop::Reason::Halt:
      detail = "vCPU " + std::to_string(id) + " halted with nothing to wake it";
      break;
    default:
      detail = stop.detail + " on vCPU " + std::to_string(id) + " at guest RIP " + hex(stop.rip);
      break;
  }
  requestStop(kind, 0, detail, stop.rip);
}

MachineResult Machine::run() {
  try {
    return boot();
  } catch (const std::exception& e) {
    MachineResult r;
    r.kind = MachineResult::Kind::Error;
    r.detail = e.what();
    return r;
  }
}

}  // namespace skiff
