// virtio-blk (virtio 1.2 §5.2) over a raw image file: reads and writes straight between the file
// and guest memory (preadv/pwritev), a read-only mode, FLUSH as fdatasync, DISCARD and
// WRITE_ZEROES as hole punching (sparse images stay sparse), GET_ID. One request queue; each disk
// is its own Block on its own transport.
#pragma once
#include <array>
#include <memory>
#include <string>

#include "devices/virtio/device.h"

namespace skiff {
namespace virtio {

struct BlockOptions {
  bool readOnly = false;
  // GET_ID's serial: up to 20 bytes, longer is cut (the guest shows it as /dev/disk/by-id/virtio-…).
  std::string id;
};

class Block final : public Device {
 public:
  static constexpr uint16_t kQueueSize = 256;
  static constexpr uint32_t kSectorSize = 512;
  static constexpr uint32_t kIdBytes = 20;
  static constexpr uint32_t kConfigSize = 60;  // virtio_blk_config up to write_zeroes_may_unmap
  // DISCARD / WRITE_ZEROES limits the config space announces (and requests are held to).
  static constexpr uint32_t kMaxDiscardSectors = 1u << 22;  // 2 GiB a segment
  static constexpr uint32_t kMaxDiscardSegments = 32;
  static constexpr uint32_t kDiscardAlignment = 8;  // sectors: a host page
  // Feature bits (§5.2.3).
  static constexpr uint64_t kFSegMax = 1ull << 2, kFRo = 1ull << 5, kFBlkSize = 1ull << 6, kFFlush = 1ull << 9;
  static constexpr uint64_t kFDiscard = 1ull << 13, kFWriteZeroes = 1ull << 14;
  // Request types and status values (§5.2.6).
  static constexpr uint32_t kTIn = 0, kTOut = 1, kTFlush = 4, kTGetId = 8, kTDiscard = 11, kTWriteZeroes = 13;
  static constexpr uint8_t kSOk = 0, kSIoErr = 1, kSUnsupp = 2;

  // Opens `path` (O_RDONLY when read-only) and locks it against a second writer. Throws DeviceError.
  static std::unique_ptr<Block> open(const std::string& path, const BlockOptions& options);
  // Takes ownership of an open file descriptor (a memfd in tests and fuzzing).
  Block(int fd, const BlockOptions& options);
  ~Block() override;
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;

  uint64_t capacitySectors() const { return capacity_; }

  DeviceType type() const override { return kBlock; }
  uint64_t features() const override;
  uint16_t queueCount() const override { return 1; }
  uint16_t queueMaxSize(uint16_t) const override { return kQueueSize; }
  uint32_t configSize() const override { return kConfigSize; }
  void readConfig(uint32_t offset, uint8_t* data, uint32_t size) const override;
  void writeConfig(uint32_t, const uint8_t*, uint32_t) override {}  // nothing writable (no CONFIG_WCE)
  void activate(const MemoryMap& memory, std::vector<Queue>& queues, uint64_t features, Guest& guest) override;
  bool process(uint16_t queue) override;
  void reset() override;

  // One request chain: sets its status byte and the used length. False (with `why`) only when the
  // chain has no byte to put a status in, so it cannot be answered at all.
  bool handle(const MemoryMap& memory, const Chain& chain, uint32_t& usedLen, std::string& why);

 private:
  uint8_t read(const MemoryMap& memory, const std::vector<Buffer>& data, uint64_t sector, uint32_t& written);
  uint8_t write(Cursor& in, uint64_t sector);
  uint8_t discardOrZero(Cursor& in, uint32_t type);
  uint8_t zero(uint64_t offset, uint64_t len, bool unmap);
  bool inRange(uint64_t sector, uint64_t sectors) const { return sector <= capacity_ && sectors <= capacity_ - sector; }

  int fd_;
  BlockOptions options_;
  uint64_t capacity_;  // sectors; a tail shorter than a sector is not addressable
  std::array<uint8_t, kConfigSize> config_{};
  const MemoryMap* memory_ = nullptr;
  std::vector<Queue>* queues_ = nullptr;
  Guest* guest_ = nullptr;
  uint64_t negotiated_ = 0;
};

}  // namespace virtio
}  // namespace skiff
