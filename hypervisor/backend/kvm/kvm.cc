// The KVM backend. Every ioctl names itself in the error it raises, with errno.
#include "backend/kvm/kvm.h"

#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <vector>

namespace skiff {
namespace {

// A real-time signal interrupts KVM_RUN on a vCPU thread; Node itself uses SIGUSR1 (inspector).
int kickSignal() { return SIGRTMIN + 7; }

void installKickHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_handler = [](int) {};  // only there to make KVM_RUN return EINTR
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;              // no SA_RESTART: the ioctl must return
    sigaction(kickSignal(), &sa, nullptr);
  });
}

// In C++, linux/kvm.h's struct kvm_cpuid2 (a header and a flexible array) has sizeof 12, not C's
// 8, and its ioctl numbers encode that size: the kernel only knows the C ones. So the CPUID ioctls
// are defined here from an explicit 8-byte header, with the entries laid out right after it.
struct CpuidHeader {
  uint32_t nent;
  uint32_t padding;
};
static_assert(sizeof(CpuidHeader) == 8, "kvm_cpuid2 header");
constexpr unsigned long kGetSupportedCpuid = _IOWR(KVMIO, 0x05, CpuidHeader);
constexpr unsigned long kSetCpuid2 = _IOW(KVMIO, 0x90, CpuidHeader);

[[noreturn]] void fail(const char* call) {
  throw HypervisorError(std::string(call) + ": " + std::strerror(errno));
}

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd_ >= 0) close(fd_);
  }
  int get() const { return fd_; }

 private:
  int fd_;
};

// KVM_GET_SUPPORTED_CPUID, read once per VM; entries are then adjusted per vCPU.
std::vector<kvm_cpuid_entry2> supportedCpuid(int kvm) {
  for (uint32_t n = 64; n <= 4096; n *= 2) {
    std::vector<uint8_t> buf(sizeof(CpuidHeader) + n * sizeof(kvm_cpuid_entry2));
    CpuidHeader header{n, 0};
    std::memcpy(buf.data(), &header, sizeof header);
    if (ioctl(kvm, kGetSupportedCpuid, buf.data()) == 0) {
      std::memcpy(&header, buf.data(), sizeof header);
      if (header.nent > n) throw HypervisorError("ioctl(KVM_GET_SUPPORTED_CPUID): more entries than room");
      std::vector<kvm_cpuid_entry2> entries(header.nent);
      std::memcpy(entries.data(), buf.data() + sizeof header, header.nent * sizeof(kvm_cpuid_entry2));
      return entries;
    }
    if (errno != E2BIG) fail("ioctl(KVM_GET_SUPPORTED_CPUID)");
  }
  throw HypervisorError("ioctl(KVM_GET_SUPPORTED_CPUID): too many entries");
}

class KvmVcpu final : public Vcpu {
 public:
  KvmVcpu(int vmFd, int kvmFd, uint32_t id, const std::vector<kvm_cpuid_entry2>& cpuid, uint32_t vcpuCount)
      : fd_(ioctl(vmFd, KVM_CREATE_VCPU, id)), id_(id) {
    if (fd_.get() < 0) fail("ioctl(KVM_CREATE_VCPU)");
    int size = ioctl(kvmFd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (size < static_cast<int>(sizeof(kvm_run))) fail("ioctl(KVM_GET_VCPU_MMAP_SIZE)");
    runSize_ = static_cast<size_t>(size);
    void* p = mmap(nullptr, runSize_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
    if (p == MAP_FAILED) fail("mmap(kvm_run)");
    run_ = static_cast<kvm_run*>(p);
    setCpuid(cpuid, vcpuCount);
  }
  ~KvmVcpu() override { munmap(run_, runSize_); }

  void setBootState(const BootCpuState& s) override {
    kvm_sregs sregs{};
    if (ioctl(fd_.get(), KVM_GET_SREGS, &sregs) < 0) fail("ioctl(KVM_GET_SREGS)");
    kvm_segment code{};
    code.base = 0;
    code.limit = 0xffffffff;
    code.selector = 0x10;
    code.type = 0xb;  // execute/read, accessed
    code.present = 1;
    code.s = 1;
    code.g = 1;
    kvm_segment data = code;
    data.selector = 0x18;
    data.type = 0x3;  // read/write, accessed
    data.db = 1;
    if (s.mode == BootCpuState::Mode::Long64) {
      code.l = 1;
      sregs.cr3 = s.cr3;
      sregs.cr4 = 1u << 5;                          // PAE
      sregs.cr0 = (1u << 0) | (1u << 4) | (1u << 31);  // PE, ET, PG
      sregs.efer = (1u << 8) | (1u << 10);            // LME, LMA
    } else {
      code.db = 1;
      sregs.cr0 = (1u << 0) | (1u << 4);  // PE, ET
      sregs.cr4 = 0;
      sregs.efer = 0;
    }
    sregs.cs = code;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    sregs.gdt.base = s.gdtBase;
    sregs.gdt.limit = s.gdtLimit;
    if (ioctl(fd_.get(), KVM_SET_SREGS, &sregs) < 0) fail("ioctl(KVM_SET_SREGS)");
    kvm_regs regs{};
    regs.rip = s.rip;
    regs.rsp = s.rsp;
    regs.rsi = s.rsi;
    regs.rbx = s.rbx;
    regs.rflags = 0x2;  // bit 1 is reserved-set; interrupts off
    if (ioctl(fd_.get(), KVM_SET_REGS, &regs) < 0) fail("ioctl(KVM_SET_REGS)");
  }

  VcpuStop run(ExitHandler& handler) override {
    installKickHandler();
    thread_.store(pthread_self());
    threadKnown_.store(true);
    for (;;) {
      if (handler.stopRequested()) return stop(VcpuStop::Reason::Requested, "");
      if (ioctl(fd_.get(), KVM_RUN, 0) < 0) {
        if (errno == EINTR || errno == EAGAIN) {
          __atomic_store_n(&run_->immediate_exit, 0, __ATOMIC_RELEASE);
          continue;  // a kick: the loop head checks whether a stop was asked for
        }
        fail("ioctl(KVM_RUN)");
      }
      switch (run_->exit_reason) {
        case KVM_EXIT_IO: {
          // data_offset and the access size come from KVM, but check them against the mapping anyway.
          uint64_t bytes = uint64_t(run_->io.size) * run_->io.count;
          if (run_->io.data_offset > runSize_ || bytes > runSize_ - run_->io.data_offset) {
            return stop(VcpuStop::Reason::InternalError, "KVM_EXIT_IO data outside kvm_run");
          }
          uint8_t* data = reinterpret_cast<uint8_t*>(run_) + run_->io.data_offset;
          for (uint32_t i = 0; i < run_->io.count; i++) {
            handler.portIo(run_->io.port, data + i * run_->io.size, run_->io.size, run_->io.direction == KVM_EXIT_IO_OUT);
          }
          break;
        }
        case KVM_EXIT_MMIO: {
          uint32_t len = run_->mmio.len > 8 ? 8 : run_->mmio.len;
          handler.mmio(run_->mmio.phys_addr, run_->mmio.data, len, run_->mmio.is_write != 0);
          break;
        }
        case KVM_EXIT_HLT:
          return stop(VcpuStop::Reason::Halt, "");
        case KVM_EXIT_SHUTDOWN:
          return stop(VcpuStop::Reason::Shutdown, "triple fault");
        case KVM_EXIT_SYSTEM_EVENT:
          return stop(VcpuStop::Reason::Shutdown, "system event " + std::to_string(run_->system_event.type));
        case KVM_EXIT_INTERNAL_ERROR:
          return stop(VcpuStop::Reason::InternalError, "KVM internal error, suberror " + std::to_string(run_->internal.suberror));
        case KVM_EXIT_FAIL_ENTRY:
          return stop(VcpuStop::Reason::FailEntry, "VM entry failed, reason " + std::to_string(run_->fail_entry.hardware_entry_failure_reason));
        case KVM_EXIT_INTR:
          break;
        default:
          return stop(VcpuStop::Reason::Unsupported, "unhandled KVM exit " + std::to_string(run_->exit_reason));
      }
      if (handler.stopRequested()) return stop(VcpuStop::Reason::Requested, "");
    }
  }

  void kick() override {
    // Shared with the vCPU thread and the kernel: an atomic store (ThreadSanitizer saw the race).
    __atomic_store_n(&run_->immediate_exit, 1, __ATOMIC_RELEASE);
    if (threadKnown_.load()) pthread_kill(thread_.load(), kickSignal());
  }

 private:
  VcpuStop stop(VcpuStop::Reason reason, std::string detail) {
    VcpuStop s{reason, 0, std::move(detail)};
    kvm_regs regs{};
    if (ioctl(fd_.get(), KVM_GET_REGS, &regs) == 0) s.rip = regs.rip;
    return s;
  }

  void setCpuid(std::vector<kvm_cpuid_entry2> entries, uint32_t vcpuCount) {
    for (auto& e : entries) {
      switch (e.function) {
        case 1:
          // Initial APIC id and logical processor count; the hypervisor bit tells the guest it is one.
          e.ebx = (e.ebx & 0x0000ffff) | (vcpuCount << 16) | (id_ << 24);
          e.ecx |= 1u << 31;
          break;
        case 0xb:
          e.edx = id_;  // x2APIC id
          break;
        default:
          break;
      }
    }
    std::vector<uint8_t> buf(sizeof(CpuidHeader) + entries.size() * sizeof(kvm_cpuid_entry2));
    CpuidHeader header{static_cast<uint32_t>(entries.size()), 0};
    std::memcpy(buf.data(), &header, sizeof header);
    std::memcpy(buf.data() + sizeof header, entries.data(), entries.size() * sizeof(kvm_cpuid_entry2));
    if (ioctl(fd_.get(), kSetCpuid2, buf.data()) < 0) fail("ioctl(KVM_SET_CPUID2)");
  }

  Fd fd_;
  uint32_t id_;
  kvm_run* run_ = nullptr;
  size_t runSize_ = 0;
  std::atomic<pthread_t> thread_{};
  std::atomic<bool> threadKnown_{false};
};

kvm_ioeventfd ioEvent(uint64_t addr, uint32_t size, std::optional<uint64_t> match, const EventNotifier& notifier) {
  kvm_ioeventfd io{};
  io.addr = addr;
  io.len = size;
  io.fd = notifier.handle();
  if (match) {
    io.flags |= KVM_IOEVENTFD_FLAG_DATAMATCH;
    io.datamatch = *match;
  }
  return io;
}

class KvmVm final : public Vm {
 public:
  KvmVm(int kvmFd, uint32_t vcpus) : kvm_(kvmFd), fd_(ioctl(kvmFd, KVM_CREATE_VM, 0)), vcpus_(vcpus) {
    if (fd_.get() < 0) fail("ioctl(KVM_CREATE_VM)");
    // Intel VT-x needs three pages for its real-mode TSS; out of the way, below 4 GiB.
    if (ioctl(fd_.get(), KVM_SET_TSS_ADDR, 0xfffbd000UL) < 0) fail("ioctl(KVM_SET_TSS_ADDR)");
    // The host's answer does not change while the process runs: ask once (0.4 ms a VM on PVM).
    static std::once_flag once;
    static std::vector<kvm_cpuid_entry2> supported;
    std::call_once(once, [kvmFd] { supported = supportedCpuid(kvmFd); });
    cpuid_ = supported;
  }

  void mapMemory(uint32_t slot, uint64_t gpa, void* host, uint64_t size) override {
    kvm_userspace_memory_region region{};
    region.slot = slot;
    region.guest_phys_addr = gpa;
    region.memory_size = size;
    region.userspace_addr = reinterpret_cast<uint64_t>(host);
    if (ioctl(fd_.get(), KVM_SET_USER_MEMORY_REGION, &region) < 0) fail("ioctl(KVM_SET_USER_MEMORY_REGION)");
  }

  std::unique_ptr<Vcpu> createVcpu(uint32_t id) override {
    ensureIrqchip();  // KVM wants it before the first vCPU
    return std::make_unique<KvmVcpu>(fd_.get(), kvm_, id, cpuid_, vcpus_);
  }

  void setIrqLine(uint32_t line, bool level) override {
    ensureIrqchip();
    kvm_irq_level irq{};
    irq.irq = line;
    irq.level = level ? 1 : 0;
    if (ioctl(fd_.get(), KVM_IRQ_LINE, &irq) < 0) fail("ioctl(KVM_IRQ_LINE)");
  }

  void addIoEvent(uint64_t addr, uint32_t size, std::optional<uint64_t> match, const EventNotifier& notifier) override {
    kvm_ioeventfd io = ioEvent(addr, size, match, notifier);
    if (ioctl(fd_.get(), KVM_IOEVENTFD, &io) < 0) fail("ioctl(KVM_IOEVENTFD)");
  }

  void removeIoEvent(uint64_t addr, uint32_t size, std::optional<uint64_t> match, const EventNotifier& notifier) override {
    kvm_ioeventfd io = ioEvent(addr, size, match, notifier);
    io.flags |= KVM_IOEVENTFD_FLAG_DEASSIGN;
    ioctl(fd_.get(), KVM_IOEVENTFD, &io);  // on teardown; closing the VM drops it anyway
  }

  // KVM's irqfd pulses the line (raise, lower) per signal: an edge, as the MP table's ISA
  // routing (mptable.cc) tells the guest to expect.
  void addIrqEvent(uint32_t line, const EventNotifier& notifier) override {
    ensureIrqchip();  // KVM_IRQFD needs an in-kernel irqchip
    kvm_irqfd irq{};
    irq.fd = static_cast<uint32_t>(notifier.handle());
    irq.gsi = line;
    if (ioctl(fd_.get(), KVM_IRQFD, &irq) < 0) fail("ioctl(KVM_IRQFD)");
  }

  void removeIrqEvent(uint32_t line, const EventNotifier& notifier) override {
    kvm_irqfd irq{};
    irq.fd = static_cast<uint32_t>(notifier.handle());
    irq.gsi = line;
    irq.flags = KVM_IRQFD_FLAG_DEASSIGN;
    ioctl(fd_.get(), KVM_IRQFD, &irq);
  }

 private:
  // The in-kernel IO-APIC, PIC and LAPICs, and the PIT. Created after the guest's memory is mapped,
  // not with the VM: on KVM on PVM, KVM_SET_USER_MEMORY_REGION takes a median 11.5 ms for 32 MiB
  // with an irqchip present and 4.4 ms without (bench/native.ts; docs/benchmarks.md).
  void ensureIrqchip() {
    std::call_once(irqchipOnce_, [this] {
      if (ioctl(fd_.get(), KVM_CREATE_IRQCHIP, 0) < 0) fail("ioctl(KVM_CREATE_IRQCHIP)");
      kvm_pit_config pit{};
      pit.flags = KVM_PIT_SPEAKER_DUMMY;
      if (ioctl(fd_.get(), KVM_CREATE_PIT2, &pit) < 0) fail("ioctl(KVM_CREATE_PIT2)");
    });
  }

  int kvm_;
  Fd fd_;
  uint32_t vcpus_;
  std::once_flag irqchipOnce_;
  std::vector<kvm_cpuid_entry2> cpuid_;
};

class Kvm final : public Hypervisor {
 public:
  Kvm() : fd_(open("/dev/kvm", O_RDWR | O_CLOEXEC)) {
    if (fd_.get() < 0) fail("open(/dev/kvm)");
    version_ = ioctl(fd_.get(), KVM_GET_API_VERSION, 0);
    if (version_ < 0) fail("ioctl(KVM_GET_API_VERSION)");
    if (version_ != KVM_API_VERSION) throw HypervisorError("KVM API version " + std::to_string(version_) + ", need " + std::to_string(KVM_API_VERSION));
  }
  const char* name() const override { return "kvm"; }
  int apiVersion() const override { return version_; }
  std::unique_ptr<Vm> createVm(uint32_t vcpus) override { return std::make_unique<KvmVm>(fd_.get(), vcpus); }

 private:
  Fd fd_;
  int version_ = 0;
};

}  // namespace

std::unique_ptr<Hypervisor> openKvm() { return std::make_unique<Kvm>(); }

}  // namespace skiff
