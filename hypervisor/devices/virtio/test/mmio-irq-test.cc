// virtio::Mmio's interrupt signalling (mmio.cc, raise() and the InterruptAck write), with a scripted
// device so every cause is placed exactly: what the transport tells the line when an edge is lost,
// when a cause arrives between the driver's read of InterruptStatus and its ACK, and when nothing
// is pending. Before each cause signalled (not only 0 -> non-zero), a lost edge muted the device
// for good; `lost_edge_is_sent_again_by_the_next_cause` is the check that failed then.
#include <cstring>
#include <string>
#include <vector>

#include "devices/virtio/mmio.h"
#include "devices/virtio/test/driver.h"
#include "devices/virtio/test/harness.h"
#include "devices/virtio/test/registers.h"

using namespace skiff::virtio;
using namespace skiff::virtio::testing;

namespace {

constexpr uint64_t kRam = 0x100000;
constexpr uint64_t kRamSize = 1 << 20;
constexpr uint16_t kQueues = 2, kQueueSize = 8;
constexpr uint32_t kUsed = 1, kConfig = 2;

// Two queues; process(q) makes the causes the test scripted for that kick, nothing else.
class ScriptedDevice final : public Device {
 public:
  DeviceType type() const override { return kVsock; }
  uint64_t features() const override { return kFVersion1 | kFEventIdx; }
  uint16_t queueCount() const override { return kQueues; }
  uint16_t queueMaxSize(uint16_t) const override { return kQueueSize; }
  uint32_t configSize() const override { return 0; }
  void readConfig(uint32_t, uint8_t*, uint32_t) const override {}
  void writeConfig(uint32_t, const uint8_t*, uint32_t) override {}
  void activate(const MemoryMap&, std::vector<Queue>&, uint64_t, Guest& guest) override { guest_ = &guest; }
  bool process(uint16_t queue) override {
    for (int i = 0; i < usedCauses; ++i) guest_->usedBuffers(queue);
    if (configCause) guest_->configChanged();
    usedCauses = 0;
    configCause = false;
    return false;
  }
  void reset() override { guest_ = nullptr; }

  int usedCauses = 0;
  bool configCause = false;

 private:
  Guest* guest_ = nullptr;
};

// The line as a list of calls: true = signal (an irqfd edge), false = everything acknowledged.
struct Bench {
  FakeMemory mem{{kRam, kRamSize}};
  ScriptedDevice dev;
  std::vector<bool> line;
  std::vector<std::string> logs;
  Mmio mmio{dev, mem.map, [this](bool level) { line.push_back(level); }, [this](const std::string& m) { logs.push_back(m); }};

  // Linux's virtio_mmio probe order; both queues' rings in the fake RAM.
  bool bringUp() {
    wr(mmio, 0x70, kAcknowledge);
    wr(mmio, 0x70, kAcknowledge | kDriver);
    uint64_t f = dev.features();
    wr(mmio, 0x24, 0), wr(mmio, 0x20, uint32_t(f));
    wr(mmio, 0x24, 1), wr(mmio, 0x20, uint32_t(f >> 32));
    wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk);
    for (uint32_t q = 0; q < kQueues; ++q) {
      uint64_t base = kRam + 0x1000 * q;
      wr(mmio, 0x30, q);
      wr(mmio, 0x38, kQueueSize);
      wr(mmio, 0x80, uint32_t(base)), wr(mmio, 0x84, 0);
      wr(mmio, 0x90, uint32_t(base + 0x400)), wr(mmio, 0x94, 0);
      wr(mmio, 0xa0, uint32_t(base + 0x800)), wr(mmio, 0xa4, 0);
      wr(mmio, 0x44, 1);
    }
    wr(mmio, 0x70, kAcknowledge | kDriver | kFeaturesOk | kDriverOk);
    return rd(mmio, 0x70) == (kAcknowledge | kDriver | kFeaturesOk | kDriverOk);
  }
  // The device thread after a kick on `queue`, making `used` used-buffer causes.
  void cause(uint16_t queue, int used, bool config = false) {
    dev.usedCauses = used;
    dev.configCause = config;
    mmio.processQueue(queue);
  }
  size_t signals() const {
    size_t n = 0;
    for (bool l : line) n += l;
    return n;
  }
};

}  // namespace

// The edge for the first cause never reaches the driver (as measured on KVM on PVM). The next
// cause, on the other queue, must signal again although InterruptStatus is still 1; the driver's
// handler then finds and acknowledges it, and the line is lowered.
TEST(lost_edge_is_sent_again_by_the_next_cause) {
  Bench b;
  CHECK(b.bringUp());
  b.cause(0, 1);
  CHECK(b.line == std::vector<bool>{true});
  CHECK(rd(b.mmio, 0x60) == kUsed);
  // That edge is lost: no handler runs, nothing is acknowledged.
  b.cause(1, 1);
  CHECK(b.line == (std::vector<bool>{true, true}));
  CHECK(rd(b.mmio, 0x60) == kUsed);
  wr(b.mmio, 0x64, rd(b.mmio, 0x60));
  CHECK(b.line == (std::vector<bool>{true, true, false}));
  CHECK(rd(b.mmio, 0x60) == 0);
}

// Linux's vm_interrupt reads InterruptStatus, then acknowledges what it read. A config change that
// comes in between stays set after the ACK: the line must be signalled again (its own edge may be
// the lost one), not left with a bit nobody will be told about.
TEST(cause_between_read_and_ack_is_signalled_after_the_ack) {
  Bench b;
  CHECK(b.bringUp());
  b.cause(0, 1);
  uint32_t seen = rd(b.mmio, 0x60);
  CHECK(seen == kUsed);
  b.cause(0, 0, true);  // configChanged between the read and the ACK
  CHECK(rd(b.mmio, 0x60) == (kUsed | kConfig));
  size_t before = b.signals();
  wr(b.mmio, 0x64, seen);
  CHECK(rd(b.mmio, 0x60) == kConfig);
  CHECK(b.signals() == before + 1 && b.line.back());
  wr(b.mmio, 0x64, kConfig);
  CHECK(rd(b.mmio, 0x60) == 0 && !b.line.back());
}

// Each cause gives one signal, no more (EVENT_IDX suppression is the device's: one usedBuffers per
// batch the driver asked about), and ACKs that clear nothing signal nothing: a driver writing
// InterruptAck in a loop cannot make the transport storm its own line.
TEST(signals_only_for_causes_and_for_acks_that_leave_bits) {
  Bench b;
  CHECK(b.bringUp());
  wr(b.mmio, 0x64, 0xffffffff);  // nothing pending
  CHECK(b.line.empty());
  b.cause(0, 3);
  CHECK(b.signals() == 3 && b.line.size() == 3);
  wr(b.mmio, 0x64, 0);       // clears nothing
  wr(b.mmio, 0x64, kConfig);  // a bit that is not set
  CHECK(b.line.size() == 3);
  wr(b.mmio, 0x64, kUsed);
  CHECK(b.line.size() == 4 && !b.line.back());
  wr(b.mmio, 0x64, kUsed);  // again: nothing left to clear
  CHECK(b.line.size() == 4);
}

// A reset drops what was pending and lowers the line once; causes after it are the new driver's.
TEST(reset_lowers_the_line_and_later_causes_signal) {
  Bench b;
  CHECK(b.bringUp());
  b.cause(1, 1);
  wr(b.mmio, 0x70, 0);
  CHECK(rd(b.mmio, 0x60) == 0);
  CHECK(b.line == (std::vector<bool>{true, false}));
  b.cause(1, 1);  // not running: processQueue ignores the kick
  CHECK(b.line.size() == 2);
  CHECK(b.bringUp());
  b.cause(1, 1);
  CHECK(b.line.size() == 3 && b.line.back());
  CHECK(b.logs.empty());
}

int main() {
  return runAll();
}
