#include "vmm/machine.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>

#include "common/hex.h"
#include "vmm/boot.h"
#include "vmm/layout.h"
#include "vmm/memory.h"

namespace skiff {
namespace {

using Clock = std::chrono::steady_clock;
double msSince(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

// One read of the whole file into a buffer of its size (a 20 MiB vmlinux through
// istreambuf_iterator took tens of milliseconds, byte by byte).
std::vector<uint8_t> readFile(const std::string& what, const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  struct stat st {};
  if (fd < 0 || fstat(fd, &st) < 0) {
    int saved = errno;
    if (fd >= 0) close(fd);
    throw BootError("cannot read " + what + " " + path + ": " + std::strerror(saved));
  }
  std::vector<uint8_t> bytes(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = read(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // the file shrank: what was read is what the loaders check
    done += static_cast<size_t>(n);
  }
  int saved = errno;
  close(fd);
  if (done == 0 && !bytes.empty()) throw BootError("cannot read " + what + " " + path + ": " + std::strerror(saved));
  bytes.resize(done);
  return bytes;
}

bool isElf(const std::vector<uint8_t>& f) { return f.size() >= 4 && std::memcmp(f.data(), "\x7f" "ELF", 4) == 0; }


}  // namespace

// A doorbell: the backend signals the notifier itself, or (emulated) the exit handler does on a
// matching MMIO write. Either way the device's handler runs on the event loop.
class Machine::MachineDoorbell final : public Doorbell {
 public:
  MachineDoorbell(uint64_t addr, uint32_t size, std::optional<uint64_t> match) : addr_(addr), size_(size), match_(match) {}
  EventPath path() const override { return path_; }
  // The backend's rule (KVM_IOEVENTFD): the same address and length, and the value if matched.
  bool matches(uint64_t addr, const uint8_t* data, uint32_t size) const {
    if (addr != addr_ || size != size_) return false;
    if (!match_) return true;
    uint64_t value = 0;
    std::memcpy(&value, data, size);  // size is 1, 2, 4 or 8; x86 is little-endian
    return value == *match_;
  }

  uint64_t addr_;
  uint32_t size_;
  std::optional<uint64_t> match_;
  EventNotifier notifier_;
  EventPath path_ = EventPath::Emulated;
};

// An interrupt line: trigger() signals the notifier; the backend pulses the line itself, or
// (emulated) the event loop does.
class Machine::MachineInterruptLine final : public InterruptLine {
 public:
  explicit MachineInterruptLine(uint32_t line) : line_(line) {}
  void trigger() override { notifier_.signal(); }
  uint32_t line() const override { return line_; }
  EventPath path() const override { return path_; }

  uint32_t line_;
  EventNotifier notifier_;
  EventPath path_ = EventPath::Emulated;
};

Machine::Machine(MachineConfig config, ConsoleOutput console) : config_(std::move(config)), console_(std::move(console)), cmdline_(config_.cmdline) {
  // The loop exists from the start so that console input sent before boot is kept for the guest.
  loop_ = EventLoop::create([this](const std::string& message) { requestStop(MachineResult::Kind::Error, 0, "device event loop: " + message); });
  serial_ = std::make_unique<Serial>(console_, [this] {
    if (Vm* vm = irqVm_.load(std::memory_order_acquire)) {
      vm->setIrqLine(layout::kSerialIrq, true);
      vm->setIrqLine(layout::kSerialIrq, false);
    }
  });
}

Machine::~Machine() { teardown(); }

// Stops the event loop before freeing anything its handlers touch, then undoes the backend's
// doorbells and lines, then the VM. Idempotent; vCPU threads have ended when it runs.
void Machine::teardown() {
  std::lock_guard<std::mutex> once(teardownMu_);
  stopping_.store(true, std::memory_order_release);
  loop_->stop();
  irqVm_.store(nullptr, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(vcpusMu_);
    vcpus_.clear();
  }
  if (vm_) {
    for (auto& d : doorbells_) {
      if (d->path_ == EventPath::Backend) vm_->removeIoEvent(d->addr_, d->size_, d->match_, d->notifier_);
    }
    for (auto& l : lines_) {
      if (l->path_ == EventPath::Backend) vm_->removeIrqEvent(l->line_, l->notifier_);
    }
  }
  bus_.clear();
  doorbells_.clear();
  lines_.clear();
  vm_.reset();
  {
    std::lock_guard<std::mutex> lock(memoryMu_);
    memory_.reset();
  }
  hypervisor_.reset();
}

uint64_t Machine::guestResidentBytes() {
  // Never waits for a teardown in progress (the caller may be the JS thread): it is ending anyway.
  std::unique_lock<std::mutex> lock(memoryMu_, std::try_to_lock);
  if (!lock.owns_lock() || !memory_) return 0;
  uint64_t bytes = 0;
  std::vector<unsigned char> pages;
  for (const auto& r : memory_->regions()) {
    pages.resize(r.size / layout::kPageSize);
    if (mincore(r.host, r.size, pages.data()) < 0) continue;
    for (unsigned char p : pages) bytes += (p & 1) ? layout::kPageSize : 0;
  }
  return bytes;
}

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

void Machine::consoleInput(const uint8_t* data, size_t size) {
  if (size == 0) return;
  std::vector<uint8_t> bytes(data, data + size);
  // Dropped if the machine has ended: there is no guest to read it.
  loop_->post([this, bytes = std::move(bytes)] { serial_->input(bytes.data(), bytes.size()); });
}

// vmm-run's stdin: read on the event loop, straight into the UART.
void Machine::watchConsoleInput(IoHandle h) {
  loop_->add(h, kReadable, [this, h](uint32_t) {
    uint8_t buf[4096];
    ssize_t n = read(h, buf, sizeof buf);
    if (n > 0) {
      serial_->input(buf, static_cast<size_t>(n));
    } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
      loop_->remove(h);  // end of input: the guest just sees no more bytes
    }
  });
}

void Machine::addMmio(uint64_t base, uint64_t size, std::shared_ptr<MmioDevice> device) {
  // Nothing may shadow RAM or the APICs the guest relies on.
  bool inRam = false;
  for (const auto& r : memory_->regions()) inRam = inRam || (base < r.gpa + r.size && r.gpa < base + size);
  auto hits = [&](uint64_t page) { return base < page + layout::kPageSize && page < base + size; };
  if (inRam || hits(layout::kIoApic) || hits(layout::kLocalApic) || base + size < base) {
    throw HypervisorError("MMIO range at " + hex(base) + " overlaps guest RAM or an APIC");
  }
  bus_.add(base, size, std::move(device));
}

Doorbell& Machine::addDoorbell(uint64_t addr, uint32_t size, std::optional<uint64_t> match, std::function<void(uint64_t)> onRing) {
  if (size != 1 && size != 2 && size != 4 && size != 8) throw HypervisorError("doorbell at " + hex(addr) + ": size must be 1, 2, 4 or 8");
  if (!bus_.covers(addr, size)) throw HypervisorError("doorbell at " + hex(addr) + " is outside every device's MMIO range");
  if (match && size < 8 && (*match >> (8 * size)) != 0) throw HypervisorError("doorbell at " + hex(addr) + ": match value wider than the access");
  for (const auto& d : doorbells_) {
    if (d->addr_ == addr && (!d->match_ || !match || *d->match_ == *match)) throw HypervisorError("doorbell at " + hex(addr) + " added twice");
  }
  auto bell = std::make_unique<MachineDoorbell>(addr, size, match);
  MachineDoorbell* b = bell.get();
  if (!config_.emulateDoorbells) {
    try {
      vm_->addIoEvent(addr, size, match, b->notifier_);
      b->path_ = EventPath::Backend;
    } catch (const HypervisorError& e) {
      eventFallback_ = e.what();
    }
  }
  loop_->add(b->notifier_.handle(), kReadable, [b, onRing = std::move(onRing)](uint32_t) {
    if (uint64_t rings = b->notifier_.drain()) onRing(rings);
  });
  doorbells_.push_back(std::move(bell));
  return *b;
}

InterruptLine& Machine::interruptLine(uint32_t line) {
  if (line >= layout::kIoApicPins || line == layout::kSerialIrq) throw HypervisorError("interrupt line " + std::to_string(line) + " is not free");
  for (const auto& l : lines_) {
    if (l->line_ == line) throw HypervisorError("interrupt line " + std::to_string(line) + " taken twice");
  }
  auto irq = std::make_unique<MachineInterruptLine>(line);
  MachineInterruptLine* l = irq.get();
  if (!config_.emulateInterruptLines) {
    try {
      vm_->addIrqEvent(line, l->notifier_);
      l->path_ = EventPath::Backend;
    } catch (const HypervisorError& e) {
      eventFallback_ = e.what();
    }
  }
  if (l->path_ == EventPath::Emulated) {
    Vm* vm = vm_.get();
    loop_->add(l->notifier_.handle(), kReadable, [l, vm](uint32_t) {
      // Signals that arrive together make one edge, as the backend's irqfd would.
      if (l->notifier_.drain()) {
        vm->setIrqLine(l->line_, true);
        vm->setIrqLine(l->line_, false);
      }
    });
  }
  lines_.push_back(std::move(irq));
  return *l;
}

// At the end of the kernel's part: Linux hands the words after a "--" to init, so device words
// go before one if the command line has it.
void Machine::appendCmdline(const std::string& words) {
  if (words.empty()) return;
  size_t end = cmdline_.size();
  for (size_t i = 0; i < cmdline_.size();) {
    size_t start = cmdline_.find_first_not_of(" \t\n", i);
    if (start == std::string::npos) break;
    size_t stop = cmdline_.find_first_of(" \t\n", start);
    if (stop == std::string::npos) stop = cmdline_.size();
    if (cmdline_.compare(start, stop - start, "--") == 0) {
      end = start;
      break;
    }
    i = stop;
  }
  std::string before = cmdline_.substr(0, end), after = cmdline_.substr(end);
  while (!before.empty() && (before.back() == ' ' || before.back() == '\t' || before.back() == '\n')) before.pop_back();
  cmdline_ = before + (before.empty() ? "" : " ") + words + (after.empty() ? "" : " " + after);
}

VirtioSlot Machine::freeVirtioSlot() {
  for (uint32_t i = 0; i < layout::kVirtioMmioSlots; i++) {
    VirtioSlot slot{i, layout::virtioMmioSlot(i), layout::kVirtioMmioSlotSize, layout::virtioIrq(i)};
    bool lineTaken = false;
    for (const auto& l : lines_) lineTaken = lineTaken || l->line_ == slot.irq;
    if (!lineTaken && !bus_.overlaps(slot.base, slot.size)) return slot;
  }
  throw HypervisorError("all " + std::to_string(layout::kVirtioMmioSlots) + " virtio-mmio slots are taken");
}

std::string VirtioSlot::cmdline() const { return "virtio_mmio.device=" + hex(size) + "@" + hex(base) + ":" + std::to_string(irq); }

std::string Machine::eventsSummary() const {
  if (doorbells_.empty() && lines_.empty()) return "";
  int bells[2] = {0, 0}, irqs[2] = {0, 0};
  for (const auto& d : doorbells_) bells[d->path_ == EventPath::Backend ? 0 : 1]++;
  for (const auto& l : lines_) irqs[l->path_ == EventPath::Backend ? 0 : 1]++;
  std::string s = "doorbells backend=" + std::to_string(bells[0]) + " emulated=" + std::to_string(bells[1]) + "; interrupt lines backend=" + std::to_string(irqs[0]) +
                  " emulated=" + std::to_string(irqs[1]);
  if (config_.emulateDoorbells || config_.emulateInterruptLines) s += "; emulation asked for";
  if (!eventFallback_.empty()) s += "; the backend refused: " + eventFallback_;
  return s;
}

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

void Machine::mmio(uint64_t addr, uint8_t* data, uint32_t size, bool write) {
  if (write) {
    // The emulated doorbells: what the backend would have done without this exit.
    for (const auto& d : doorbells_) {
      if (d->path_ == EventPath::Emulated && d->matches(addr, data, size)) {
        d->notifier_.signal();
        return;
      }
    }
    if (bus_.write(addr, data, size)) return;
    return;  // nothing here: writes vanish
  }
  if (!bus_.read(addr, data, size)) std::memset(data, 0xff, size);
}

MachineResult Machine::boot() {
  auto start = Clock::now();
  std::vector<uint8_t> kernel = readFile("kernel", config_.kernelPath);
  std::vector<uint8_t> initrd = config_.initrdPath.empty() ? std::vector<uint8_t>() : readFile("initrd", config_.initrdPath);

  // The recipe: hypervisor, memory, devices (they may add to the command line), kernel (PVH for
  // an ELF vmlinux, else the 64-bit boot protocol for a bzImage), initrd, boot info, vCPUs.
  hypervisor_ = openHypervisor();
  vm_ = hypervisor_->createVm(config_.cpus);
  {
    std::lock_guard<std::mutex> lock(memoryMu_);
    memory_ = std::make_unique<GuestMemory>(config_.memoryBytes);
  }
  const GuestMemory& memory = *memory_;
  uint32_t slot = 0;
  for (const auto& r : memory.regions()) vm_->mapMemory(slot++, r.gpa, r.host, r.size);
  irqVm_.store(vm_.get(), std::memory_order_release);
  for (const auto& attach : config_.devices) attach(*this);
  if (config_.consoleInput >= 0) watchConsoleInput(config_.consoleInput);
  BootCpuState cpu;
  if (isElf(kernel)) {
    LoadedKernel loaded = loadPvhElf(kernel, memory);
    cpu = writePvhBootInfo(memory, loaded, cmdline_, placeInitrd(initrd, memory, loaded.end));
  } else {
    LoadedBzImage image = loadBzImage(kernel, memory);
    cpu = writeBzImageBootInfo(memory, image, cmdline_, placeInitrd(initrd, memory, image.kernel.end, image.initrdCeiling));
  }
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
  result_.events = eventsSummary();
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
  MachineResult r;
  try {
    r = boot();
  } catch (const std::exception& e) {
    r = MachineResult();
    r.kind = MachineResult::Kind::Error;
    r.detail = e.what();
  }
  // The vCPUs have ended. Devices hold what others may be waiting for (a disk's lock, vsock's
  // socket path), so they go now, after the event loop that runs their work; the VM, slow to free
  // on KVM on PVM, stays until shutdown() (or the destructor).
  {
    std::lock_guard<std::mutex> once(teardownMu_);
    loop_->stop();
    bus_.clear();
  }
  return r;
}

}  // namespace skiff
