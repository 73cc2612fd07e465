#include "devices/virtio/rng.h"

#include <sys/random.h>

#include <cerrno>

namespace skiff {
namespace virtio {

void Rng::activate(const MemoryMap& memory, std::vector<Queue>& queues, uint64_t, Guest& guest) {
  memory_ = &memory;
  queues_ = &queues;
  guest_ = &guest;
}

void Rng::reset() {
  memory_ = nullptr;
  queues_ = nullptr;
  guest_ = nullptr;
}

bool Rng::process(uint16_t index) {
  if (guest_ == nullptr || index != 0) return false;
  return drainQueue((*queues_)[0], 0, *guest_, kQueueSize, [&](const Chain& chain, uint32_t& usedLen, std::string&) {
    // Straight into guest memory: the spans were checked against the map a moment ago, and
    // getrandom writes only inside them.
    std::vector<iovec> spans;
    Cursor out(*memory_, chain.writable);
    uint64_t want = out.remaining() < kMaxRequest ? out.remaining() : kMaxRequest;
    // Too fragmented a chain gets nothing back, which the driver accepts as "try again".
    if (!out.spans(want, spans, 64)) return true;
    for (const iovec& s : spans) {
      auto* p = static_cast<uint8_t*>(s.iov_base);
      size_t left = s.iov_len;
      while (left > 0) {
        ssize_t n = getrandom(p, left, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return true;  // not after boot-time seeding; report what was filled
        p += n;
        left -= static_cast<size_t>(n);
        usedLen += static_cast<uint32_t>(n);
      }
    }
    return true;
  });
}

}  // namespace virtio
}  // namespace skiff
