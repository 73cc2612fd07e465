#include "devices/virtio/net.h"

#include <algorithm>
#include <cstring>

namespace skiff {
namespace virtio {

Net::Net(NetBackend& backend, const std::array<uint8_t, 6>& mac, Wake wake) : backend_(backend), wake_(std::move(wake)) {
  std::memcpy(config_.mac, mac.data(), sizeof config_.mac);
  config_.status = kStatusLinkUp;
  config_.maxVirtqueuePairs = 1;
  config_.mtu = backend.mtu();
  backend_.connect(this);
}

Net::~Net() {
  backend_.connect(nullptr);
  reset();
}

std::array<uint8_t, 6> Net::stableMac(const std::string& seed) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a: stable across runs, builds and hosts
  for (unsigned char c : seed) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  // 0x02: the locally administered bit set, the group (multicast) bit clear.
  return {0x02, uint8_t(h >> 32), uint8_t(h >> 24), uint8_t(h >> 16), uint8_t(h >> 8), uint8_t(h)};
}

void Net::readConfig(uint32_t offset, uint8_t* data, uint32_t size) const {
  // The struct viewed as its bytes (packed, little-endian fields).
  if (offset <= sizeof config_ && size <= sizeof config_ - offset) std::memcpy(data, reinterpret_cast<const uint8_t*>(&config_) + offset, size);
}

void Net::activate(const MemoryMap& memory, std::vector<Queue>& queues, uint64_t features, Guest& guest) {
  memory_ = &memory;
  queues_ = &queues;
  guest_ = &guest;
  mergeable_ = (features & kFMrgRxbuf) != 0;
  failed_ = false;
  held_.clear();
  heldBytes_ = 0;
  std::lock_guard<std::mutex> lock(inboxMu_);
  wakeRequested_ = false;
}

void Net::reset() {
  memory_ = nullptr;
  queues_ = nullptr;
  guest_ = nullptr;
  failed_ = false;
  held_.clear();
  heldBytes_ = 0;
  // Frames waiting for a driver that is gone are dropped, and counted.
  std::lock_guard<std::mutex> lock(inboxMu_);
  rxDropped_ += inbox_.size();
  inbox_.clear();
  inboxBytes_ = 0;
  wakeRequested_ = false;
  arrived_ = false;
}

Net::Stats Net::stats() const {
  return {txFrames_.load(), txBytes_.load(), txDropped_.load(), rxFrames_.load(), rxBytes_.load(), rxDropped_.load()};
}

size_t Net::pendingFrames() const {
  std::lock_guard<std::mutex> lock(inboxMu_);
  return inbox_.size();
}

void Net::setWake(Wake wake) {
  std::lock_guard<std::mutex> lock(inboxMu_);
  wake_ = std::move(wake);
}

void Net::callWake() {
  Wake wake;
  {
    std::lock_guard<std::mutex> lock(inboxMu_);
    wake = wake_;
  }
  if (wake) wake();
}

bool Net::receive(const uint8_t* frame, size_t len) {
  if (len < kMinFrame || len > kMaxFrame) {
    ++rxDropped_;
    return false;
  }
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(inboxMu_);
    if (inbox_.size() >= kMaxPendingFrames || inboxBytes_ + len > kMaxPendingBytes) {
      ++rxDropped_;
      return false;
    }
    if (spare_.empty()) {
      inbox_.emplace_back(frame, frame + len);
    } else {  // a buffer a delivered frame left: no allocation while it is large enough
      inbox_.push_back(std::move(spare_.back()));
      spare_.pop_back();
      inbox_.back().assign(frame, frame + len);
    }
    inboxBytes_ += len;
    if (inProcess_) {
      arrived_ = true;  // process() flushes before it returns, or wakes itself again
    } else if (!wakeRequested_) {
      wakeRequested_ = wake = true;
    }
  }
  if (wake) callWake();
  return true;
}

bool Net::process(uint16_t queue) {
  if (guest_ == nullptr || failed_ || queue >= 2) return false;
  {
    std::lock_guard<std::mutex> lock(inboxMu_);
    inProcess_ = true;
    if (queue == kRxQueue) wakeRequested_ = false;
  }
  bool more = false;
  if (queue == kTxQueue) {
    Queue& tx = (*queues_)[kTxQueue];
    if (tx.ready()) {
      more = drainQueue(tx, kTxQueue, *guest_, kQueueSize, [this](const Chain& chain, uint32_t& usedLen, std::string& why) {
        usedLen = 0;  // nothing written into a tx buffer
        return handleTx(chain, why);
      });
      if (tx.failed()) failed_ = true;
    }
    backend_.flush();
  }
  // Always: a tx kick may have brought replies (slirp answers ARP inside send()), an rx kick new
  // buffers for frames that waited.
  if (!failed_) more |= flushRx();
  bool again;
  {
    std::lock_guard<std::mutex> lock(inboxMu_);
    inProcess_ = false;
    again = arrived_ && !inbox_.empty() && !wakeRequested_ && !failed_;
    if (again) wakeRequested_ = true;
  }
  if (again) callWake();
  return more && !failed_;
}

bool Net::handleTx(const Chain& chain, std::string& why) {
  if (!chain.writable.empty()) {
    why = "net: tx chain with device-writable buffers";
    failed_ = true;
    return false;
  }
  if (chain.readableBytes < sizeof(Header)) {
    why = "net: tx chain of " + std::to_string(chain.readableBytes) + " bytes, shorter than the 12-byte virtio-net header";
    failed_ = true;
    return false;
  }
  Cursor in(*memory_, chain.readable);
  Header h;
  in.read(&h, sizeof h);  // cannot fail: readableBytes >= sizeof h, and the walk checked the buffers
  // Offloads were not offered, so a header asking for one breaks the negotiation (§5.1.6.2.1).
  if (h.gsoType != kGsoNone || (h.flags & kHdrNeedsCsum) != 0) {
    why = "net: tx header asks for an offload that was not offered (flags " + std::to_string(h.flags) + ", gso_type " + std::to_string(h.gsoType) + ")";
    failed_ = true;
    return false;
  }
  uint32_t len = chain.readableBytes - uint32_t(sizeof h);
  if (len < kMinFrame || len > kMaxFrame) {
    ++txDropped_;  // not a virtio error: a frame no Ethernet carries (an MTU the guest raised, say)
    return true;
  }
  // A backend that reads guest memory safely (takesGuestMemory) gets the frame where it lies, if
  // that is one host span (Linux's linear tx skbs: one buffer, or the header apart); spans()
  // consumes nothing when it is not.
  txSpan_.clear();
  if (backend_.takesGuestMemory() && in.spans(len, txSpan_, 1)) {
    ++txFrames_;
    txBytes_ += len;
    backend_.send(static_cast<const uint8_t*>(txSpan_[0].iov_base), len);
    return true;
  }
  // Otherwise a private copy: another vCPU may rewrite the buffer while the backend parses it,
  // and a length it read twice must not change in between.
  txCopy_.resize(len);
  if (!in.read(txCopy_.data(), len)) {
    why = "net: tx buffer outside guest memory";
    failed_ = true;
    return false;
  }
  ++txFrames_;
  txBytes_ += len;
  backend_.send(txCopy_.data(), len);
  return true;
}

void Net::failDevice(const std::string& why) {
  failed_ = true;
  held_.clear();
  heldBytes_ = 0;
  guest_->fail(why);
}

bool Net::gather(uint64_t need) {
  Queue& rx = (*queues_)[kRxQueue];
  while (mergeable_ ? heldBytes_ < need : held_.empty()) {
    Chain chain;
    // No kick suppression while buffers last: rx kicks matter only once we run dry, and then
    // enableNotification re-arms them (avail_event, or the flag) before the last look.
    if (!rx.pop(chain) && (rx.failed() || !rx.enableNotification() || !rx.pop(chain))) {
      if (rx.failed()) failDevice(rx.failure());
      return false;
    }
    if (!chain.readable.empty()) {
      failDevice("net: rx chain with device-readable buffers");
      return false;
    }
    if (chain.writableBytes < sizeof(Header)) {
      failDevice("net: rx buffer of " + std::to_string(chain.writableBytes) + " bytes, smaller than the 12-byte virtio-net header");
      return false;
    }
    if (held_.empty()) heldGeneration_ = rx.generation();
    held_.push_back(std::move(chain));
    heldBytes_ += held_.back().writableBytes;
    // Every buffer the queue can hold is ours and still the frame does not fit: the driver can
    // post no more, so waiting would hang the receive path for good.
    if (mergeable_ && heldBytes_ < need && held_.size() >= rx.size()) {
      failDevice("net: all " + std::to_string(held_.size()) + " rx buffers together hold " + std::to_string(heldBytes_) + " bytes, less than a " + std::to_string(need) + "-byte frame");
      return false;
    }
  }
  if (!mergeable_ && held_.front().writableBytes < need) {
    failDevice("net: rx buffer of " + std::to_string(held_.front().writableBytes) + " bytes for a " + std::to_string(need) +
               "-byte frame: without MRG_RXBUF each buffer must hold a whole frame");
    return false;
  }
  return true;
}

bool Net::flushRx() {
  {
    std::lock_guard<std::mutex> lock(inboxMu_);
    arrived_ = false;
  }
  Queue& rx = (*queues_)[kRxQueue];
  if (!rx.ready()) return false;
  if (!held_.empty() && rx.generation() != heldGeneration_) {  // the queue was set up again
    held_.clear();
    heldBytes_ = 0;
  }
  bool pushed = false, more = false;
  for (uint32_t budget = kQueueSize;; --budget) {
    const std::vector<uint8_t>* frame;
    {
      std::lock_guard<std::mutex> lock(inboxMu_);
      if (inbox_.empty()) break;
      // Only this thread pops, and deque::push_back keeps references valid: the frame stays put.
      frame = &inbox_.front();
    }
    if (budget == 0) {
      more = true;
      break;
    }
    uint64_t need = sizeof(Header) + frame->size();
    if (!gather(need)) {
      if (failed_) return false;
      break;  // no buffers yet: the driver's next rx kick brings us back
    }
    Header h{};
    h.numBuffers = static_cast<uint16_t>(held_.size());  // 1 without MRG_RXBUF, as §5.1.6.4 requires
    size_t done = 0;
    for (size_t i = 0; i < held_.size(); ++i) {
      Cursor out(*memory_, held_[i].writable);
      uint32_t len = 0;
      if (i == 0) {
        out.write(&h, sizeof h);  // cannot fail: writableBytes >= sizeof h (gather), the walk checked them
        len = sizeof h;
      }
      size_t n = static_cast<size_t>(std::min<uint64_t>(out.remaining(), frame->size() - done));
      if (!out.write(frame->data() + done, n)) {
        failDevice("net: rx buffer outside guest memory");
        return false;
      }
      done += n;
      len += static_cast<uint32_t>(n);
      rx.push(held_[i].head, len);
    }
    held_.clear();
    heldBytes_ = 0;
    pushed = true;
    ++rxFrames_;
    rxBytes_ += frame->size();
    std::lock_guard<std::mutex> lock(inboxMu_);
    inboxBytes_ -= inbox_.front().size();
    if (spare_.size() < kSpareBuffers) spare_.push_back(std::move(inbox_.front()));
    inbox_.pop_front();
  }
  if (pushed && rx.needsNotification()) guest_->usedBuffers(kRxQueue);
  return more;
}

}  // namespace virtio
}  // namespace skiff
