// virtio-rng (virtio 1.2 §5.4): one queue; each chain's writable buffers are filled from the host's
// getrandom(2). No configuration space, no device-specific features.
#pragma once
#include "devices/virtio/device.h"

namespace skiff {
namespace virtio {

class Rng final : public Device {
 public:
  static constexpr uint16_t kQueueSize = 64;
  // Caps one request so a guest asking for gigabytes cannot hold the device thread.
  static constexpr uint32_t kMaxRequest = 64 * 1024;

  DeviceType type() const override { return kRng; }
  uint64_t features() const override { return kFVersion1 | kFEventIdx | kFIndirectDesc; }
  uint16_t queueCount() const override { return 1; }
  uint16_t queueMaxSize(uint16_t) const override { return kQueueSize; }
  uint32_t configSize() const override { return 0; }
  void readConfig(uint32_t, uint8_t*, uint32_t) const override {}
  void writeConfig(uint32_t, const uint8_t*, uint32_t) override {}
  void activate(const MemoryMap& memory, std::vector<Queue>& queues, uint64_t features, Guest& guest) override;
  bool process(uint16_t queue) override;
  void reset() override;

 private:
  const MemoryMap* memory_ = nullptr;
  std::vector<Queue>* queues_ = nullptr;
  Guest* guest_ = nullptr;
};

}  // namespace virtio
}  // namespace skiff
