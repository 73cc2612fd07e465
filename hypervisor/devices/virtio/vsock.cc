#include "devices/virtio/vsock.h"

#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

namespace skiff {
namespace virtio {
namespace {
constexpr uint16_t kRx = 0, kTx = 1;
constexpr uint32_t kTxBudget = Vsock::kQueueSize;
// One readv's spans at most (the kernel refuses more than IOV_MAX).
constexpr size_t kMaxRxSpans = IOV_MAX;
}  // namespace

Vsock::Vsock(uint64_t guestCid, VsockHost& host) : guestCid_(guestCid), host_(host) {}

Vsock::~Vsock() { reset(); }

void Vsock::readConfig(uint32_t offset, uint8_t* data, uint32_t size) const {
  if (offset <= 8 && size <= 8 - offset) std::memcpy(data, reinterpret_cast<const uint8_t*>(&guestCid_) + offset, size);  // le64 guest_cid, viewed as bytes
}

void Vsock::activate(const MemoryMap& memory, std::vector<Queue>& queues, uint64_t, Guest& guest) {
  memory_ = &memory;
  queues_ = &queues;
  guest_ = &guest;
}

void Vsock::reset() {
  while (!conns_.empty()) close(conns_.begin()->first, false);
  control_.clear();
  rxHeldFirst_ = rxHeldCount_ = 0;
  memory_ = nullptr;
  queues_ = nullptr;
  guest_ = nullptr;
}

bool Vsock::process(uint16_t queue) {
  if (guest_ == nullptr) return false;
  if (queue == kRx) {
    // New receive buffers: send what waited for them, then take the tx work that waited for room.
    fillRx();
    return processTx();
  }
  if (queue == kTx) return processTx();
  return false;  // the event queue: the device has no events to send
}

// Takes tx packets while replies have room to queue; returns true when the budget ran out.
bool Vsock::processTx() {
  Queue& tx = (*queues_)[kTx];
  if (!tx.ready()) return false;
  Chain chain;
  bool pushed = false, more = false;
  uint32_t budget = kTxBudget;
  for (bool first = true;; first = false) {
    tx.disableNotification();
    uint32_t before = budget;
    // Backpressure: a guest that does not post rx buffers cannot make us queue replies forever.
    while (budget > 0 && control_.size() < kMaxControl && tx.pop(chain)) {
      std::string why;
      if (!handleTx(chain, why)) {
        guest_->fail(why);
        return false;
      }
      tx.push(chain.head, 0);
      pushed = true;
      --budget;
    }
    if (tx.failed()) {
      guest_->fail(tx.failure());
      return false;
    }
    if (budget == 0) {
      more = true;
      break;
    }
    if (control_.size() >= kMaxControl) break;  // resumed by the next rx kick
    if (!first && budget == before) break;  // "more" that was not there (see drainQueue)
    if (!tx.enableNotification()) break;
  }
  if (pushed && tx.needsNotification()) guest_->usedBuffers(kTx);
  fillRx();
  return more;
}

bool Vsock::handleTx(const Chain& chain, std::string& why) {
  Cursor in(*memory_, chain.readable);
  Header h;
  if (!in.read(&h, sizeof h)) {
    why = "vsock packet shorter than its header";
    return false;
  }
  if (h.len > in.remaining() || h.len > kMaxPayload) {
    why = "vsock packet length " + std::to_string(h.len) + " beyond its buffers or the 64 KiB maximum";
    return false;
  }
  // Only the guest's own address to the host's is routed; anything else is refused, never answered
  // for an RST (two peers resetting each other would loop).
  bool routable = h.srcCid == guestCid_ && h.dstCid == kHostCid && h.type == kTypeStream;
  uint64_t k = key(h.dstPort, h.srcPort);
  auto it = conns_.find(k);
  if (!routable || (it == conns_.end() && h.op != kOpRequest)) {
    if (h.op != kOpRst && h.srcCid == guestCid_) queueControl(h.dstPort, h.srcPort, kOpRst);
    return true;
  }
  if (h.op == kOpRequest) {
    if (it != conns_.end()) {  // a second REQUEST on a live connection: it is reset
      close(k, true);
      return true;
    }
    int fd = conns_.size() < kMaxConnections ? host_.connect(h.dstPort) : -1;
    if (fd < 0) {
      queueControl(h.dstPort, h.srcPort, kOpRst);
      return true;
    }
    Conn& c = conns_[k];
    c.fd = fd;
    c.hostPort = h.dstPort;
    c.guestPort = h.srcPort;
    c.established = true;
    c.mayRead = true;
    c.peerBufAlloc = h.bufAlloc;
    c.peerFwdCnt = h.fwdCnt;
    byFd_[fd] = k;
    queueControl(c.hostPort, c.guestPort, kOpResponse);
    updateWatch(c);
    return true;
  }
  Conn& c = it->second;
  // Every packet carries the sender's credit (§5.10.6.3).
  c.peerBufAlloc = h.bufAlloc;
  c.peerFwdCnt = h.fwdCnt;
  switch (h.op) {
    case kOpResponse:
      if (c.established) {
        close(k, true);
        return true;
      }
      c.established = true;
      c.mayRead = true;
      host_.connected(c.fd, true);
      break;
    case kOpRw:
      if (!c.established || c.guestShutSend || c.closing) {
        close(k, true);
        return true;
      }
      onRw(c, in, h.len);
      if (conns_.count(k) == 0) return true;  // reset while forwarding
      break;
    case kOpShutdown:
      c.guestShutRecv |= (h.flags & kShutdownRecv) != 0;
      c.guestShutSend |= (h.flags & kShutdownSend) != 0;
      if (c.guestShutRecv && c.guestShutSend) {
        c.closing = true;
      } else if (c.guestShutSend && c.pending.empty()) {
        ::shutdown(c.fd, SHUT_WR);
      }
      flushPending(c);
      if (conns_.count(k) == 0) return true;
      break;
    case kOpRst:
      close(k, false);
      return true;
    case kOpCreditUpdate:
      break;  // the credit is taken above; fillRx uses it
    case kOpCreditRequest:
      queueControl(c.hostPort, c.guestPort, kOpCreditUpdate);
      break;
    default:
      close(k, true);
      return true;
  }
  updateWatch(c);
  return true;
}

// Guest data: straight to the host socket when it takes it, the rest held in `pending`. A guest
// that sends beyond the credit we announced is reset.
void Vsock::onRw(Conn& c, Cursor& in, uint32_t len) {
  if (len == 0) return;
  if (c.pending.size() + len > kBufAlloc || uint32_t(c.rxCnt - c.fwdCnt) + len > kBufAlloc) {
    close(key(c.hostPort, c.guestPort), true);
    return;
  }
  c.rxCnt += len;
  std::vector<iovec> iov;
  if (c.pending.empty() && in.spans(len, iov, 64)) {
    msghdr msg{};
    msg.msg_iov = iov.data();
    msg.msg_iovlen = iov.size();
    ssize_t n;
    do {
      // MSG_NOSIGNAL: a host peer that went away is an EPIPE for this connection, not a SIGPIPE
      // that kills the VMM.
      n = ::sendmsg(c.fd, &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
      close(key(c.hostPort, c.guestPort), true);
      return;
    }
    uint32_t written = n > 0 ? static_cast<uint32_t>(n) : 0;
    c.fwdCnt += written;
    // What the socket did not take is copied out of guest memory, from where writev stopped.
    std::string rest;
    for (const iovec& v : iov) {
      if (written >= v.iov_len) {
        written -= static_cast<uint32_t>(v.iov_len);
        continue;
      }
      rest.append(static_cast<const char*>(v.iov_base) + written, v.iov_len - written);
      written = 0;
    }
    c.pending += rest;
  } else {
    size_t at = c.pending.size();
    c.pending.resize(at + len);
    if (!in.read(&c.pending[at], len)) {  // cannot fail: len <= in.remaining(), checked by handleTx
      c.pending.resize(at);
      return;
    }
    uint64_t k = key(c.hostPort, c.guestPort);
    flushPending(c);
    if (conns_.count(k) == 0) return;  // reset by a failed write
  }
  // Tell the guest about freed space before it runs dry (every packet to it carries fwd_cnt too).
  creditUpdate(c);
}

// A CREDIT_UPDATE once a quarter of the buffer was forwarded since the guest last heard our
// fwd_cnt. At most one waits in the queue per connection: it carries the fwd_cnt of when it is
// sent, so a second one queued behind it (a batch of tx packets each crossing the threshold
// before rx runs) would say nothing new.
void Vsock::creditUpdate(Conn& c) {
  if (c.creditUpdateQueued || uint32_t(c.fwdCnt - c.fwdCntSent) < kBufAlloc / 4) return;
  c.creditUpdateQueued = true;
  queueControl(c.hostPort, c.guestPort, kOpCreditUpdate);
}

void Vsock::flushPending(Conn& c) {
  uint64_t k = key(c.hostPort, c.guestPort);
  while (!c.pending.empty()) {
    ssize_t n = ::send(c.fd, c.pending.data(), c.pending.size(), MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    if (n <= 0) {
      close(k, true);
      return;
    }
    c.pending.erase(0, static_cast<size_t>(n));
    c.fwdCnt += static_cast<uint32_t>(n);
  }
  if (!c.pending.empty()) return;
  if (c.closing) {
    close(k, true);  // the guest is waiting for our RST to finish its close
    return;
  }
  if (c.guestShutSend) ::shutdown(c.fd, SHUT_WR);
  creditUpdate(c);
}

// Bytes the guest can take now: its buffer less what is in flight. A guest reporting more
// forwarded than was ever sent gets nothing rather than a wrapped, huge credit.
uint32_t Vsock::credit(const Conn& c) const {
  uint32_t inFlight = c.txCnt - c.peerFwdCnt;
  return inFlight > c.peerBufAlloc ? 0 : c.peerBufAlloc - inFlight;
}

bool Vsock::sendable(const Conn& c) const {
  return c.established && c.mayRead && !c.hostEof && !c.guestShutRecv && !c.closing && credit(c) > 0;
}

void Vsock::queueControl(uint32_t hostPort, uint32_t guestPort, uint16_t op, uint32_t flags) {
  control_.push_back({hostPort, guestPort, op, flags});
}

Vsock::Header Vsock::header(uint32_t hostPort, uint32_t guestPort, uint16_t op, uint32_t flags, uint32_t len) {
  Header h{};
  h.srcCid = kHostCid;
  h.dstCid = guestCid_;
  h.srcPort = hostPort;
  h.dstPort = guestPort;
  h.len = len;
  h.type = kTypeStream;
  h.op = op;
  h.flags = flags;
  h.bufAlloc = kBufAlloc;
  auto it = conns_.find(key(hostPort, guestPort));
  if (it != conns_.end()) {
    h.fwdCnt = it->second.fwdCnt;
    it->second.fwdCntSent = it->second.fwdCnt;
    if (op == kOpCreditUpdate) it->second.creditUpdateQueued = false;
  }
  return h;
}

// Holds one more rx buffer, popped from the ring. With `arm`, an empty ring re-arms the driver's
// kicks (avail_event, or the flag) and looks once more, so a buffer posted meanwhile is not missed:
// rx kicks matter only once we run dry. False when none is available, the queue failed, or the
// buffer cannot hold a header: then the device failed and the caller must stop.
Vsock::Hold Vsock::holdRx(bool arm) {
  Queue& rx = (*queues_)[kRx];
  if (rxHeldCount_ == kRxBatch) return Hold::kNone;
  Chain& chain = held(rxHeldCount_);
  if (!rx.pop(chain) && (!arm || rx.failed() || !rx.enableNotification() || !rx.pop(chain))) return Hold::kNone;
  if (chain.writableBytes < sizeof(Header)) {
    guest_->fail("vsock rx buffer smaller than a packet header");
    return Hold::kFailed;
  }
  if (rxHeldCount_ == 0) rxHeldGeneration_ = rx.generation();
  ++rxHeldCount_;
  return Hold::kHeld;
}

// Writes `h` (and so ends the packet of h.len payload bytes already read into it) into the first
// held buffer and returns that buffer to the driver.
void Vsock::deliver(const Header& h) {
  Chain& chain = held(0);
  Cursor out(*memory_, chain.writable);
  out.write(&h, sizeof h);  // cannot fail: writableBytes >= sizeof h, and the walk checked them
  (*queues_)[kRx].push(chain.head, static_cast<uint32_t>(sizeof h) + h.len);
  rxHeldFirst_ = (rxHeldFirst_ + 1) % kRxBatch;
  --rxHeldCount_;
}

// Fills rx buffers: queued control packets first, then data from host sockets that may have some,
// as far as each connection's credit and the guest's buffers allow. Data for one connection is
// read with one readv across as many held buffers as its credit covers (up to kRxBatch), then
// split into one packet per buffer.
void Vsock::fillRx() {
  if (guest_ == nullptr) return;
  Queue& rx = (*queues_)[kRx];
  if (rxHeldCount_ > 0 && (!rx.ready() || rx.generation() != rxHeldGeneration_)) rxHeldFirst_ = rxHeldCount_ = 0;
  if (!rx.ready()) return;
  bool pushed = false;
  auto it = conns_.begin();
  for (;;) {
    // Pick the next packet before taking a buffer for it.
    bool isControl = !control_.empty();
    while (!isControl && it != conns_.end() && !sendable(it->second)) ++it;
    if (!isControl && it == conns_.end()) break;
    if (rxHeldCount_ == 0) {
      Hold got = holdRx(true);
      if (got == Hold::kFailed) return;
      if (got == Hold::kNone) break;
    }
    if (isControl) {
      Control ctl = control_.front();
      control_.pop_front();
      deliver(header(ctl.hostPort, ctl.guestPort, ctl.op, ctl.flags, 0));
      pushed = true;
      continue;
    }
    Conn& c = it->second;
    // Buffers for this read: held ones first, more popped while the credit covers them. Each
    // buffer's payload part (after its header) becomes its own spans in iov_.
    uint32_t left = credit(c);
    uint32_t wants[kRxBatch];
    size_t parts = 0;
    iov_.clear();
    while (left > 0 && parts < kRxBatch && iov_.size() < kMaxRxSpans) {
      if (parts == rxHeldCount_) {
        Hold got = holdRx(false);
        if (got == Hold::kFailed) return;
        if (got == Hold::kNone) break;
      }
      Chain& chain = held(parts);
      uint64_t room = chain.writableBytes - sizeof(Header);
      uint32_t want = static_cast<uint32_t>(std::min<uint64_t>(std::min<uint64_t>(room, left), kMaxPayload));
      Cursor out(*memory_, chain.writable);
      size_t mark = iov_.size();
      if (want == 0 || !out.skip(sizeof(Header)) || !out.spans(want, iov_, std::min<size_t>(64, kMaxRxSpans - mark))) {
        iov_.resize(mark);
        break;
      }
      wants[parts++] = want;
      left -= want;
    }
    if (parts == 0) {
      // Too small or too fragmented a buffer for data: it carries a credit update instead.
      deliver(header(c.hostPort, c.guestPort, kOpCreditUpdate, 0, 0));
      pushed = true;
      ++it;
      continue;
    }
    ssize_t n;
    do {
      n = ::readv(c.fd, iov_.data(), static_cast<int>(iov_.size()));
    } while (n < 0 && errno == EINTR);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      c.mayRead = false;  // the buffers stay held for the next packets
      updateWatch(c);
      continue;
    }
    if (n > 0) {
      // One packet per buffer, in ring order, each as full as the read made it.
      auto got = static_cast<uint32_t>(n);  // <= the sum of wants, each <= 64 KiB, at most kRxBatch of them
      for (size_t i = 0; i < parts && got > 0; ++i) {
        uint32_t payload = std::min(wants[i], got);
        got -= payload;
        c.txCnt += payload;
        deliver(header(c.hostPort, c.guestPort, kOpRw, 0, payload));
      }
      updateWatch(c);
    } else if (n == 0) {
      c.hostEof = true;  // the host closed: the guest sees both directions shut
      deliver(header(c.hostPort, c.guestPort, kOpShutdown, kShutdownRecv | kShutdownSend, 0));
      updateWatch(c);
    } else {
      deliver(header(c.hostPort, c.guestPort, kOpRst, 0, 0));
      uint64_t k = it->first;
      ++it;
      close(k, false);
    }
    pushed = true;
  }
  if (pushed && rx.needsNotification()) guest_->usedBuffers(kRx);
}

void Vsock::updateWatch(Conn& c) {
  // Read interest only while data could be forwarded and is not already flagged as waiting.
  bool read = c.established && !c.mayRead && !c.hostEof && !c.guestShutRecv && !c.closing && credit(c) > 0;
  bool write = !c.pending.empty();
  if (read == c.watchRead && write == c.watchWrite) return;
  c.watchRead = read;
  c.watchWrite = write;
  if (read || write) {
    host_.watch(c.fd, read, write);
  } else {
    host_.unwatch(c.fd);
  }
}

void Vsock::close(uint64_t k, bool reset) {
  auto it = conns_.find(k);
  if (it == conns_.end()) return;
  Conn& c = it->second;
  if (reset) queueControl(c.hostPort, c.guestPort, kOpRst);
  if (!c.established) host_.connected(c.fd, false);
  host_.unwatch(c.fd);
  ::close(c.fd);
  byFd_.erase(c.fd);
  conns_.erase(it);
}

void Vsock::hostReady(int fd, bool readable, bool writable) {
  auto f = byFd_.find(fd);
  if (f == byFd_.end() || guest_ == nullptr) return;
  uint64_t k = f->second;
  if (writable) flushPending(conns_[k]);
  auto it = conns_.find(k);
  if (it != conns_.end()) {
    if (readable) it->second.mayRead = true;
    updateWatch(it->second);
  }
  fillRx();
}

bool Vsock::hostConnect(int fd, uint32_t guestPort) {
  if (guest_ == nullptr || conns_.size() >= kMaxConnections) {
    ::close(fd);
    return false;
  }
  // A fresh host port per stream, skipping any still in use after the counter wraps.
  uint32_t port;
  do {
    port = nextHostPort_++;
    if (nextHostPort_ == 0) nextHostPort_ = kHostPortBase;
  } while (conns_.count(key(port, guestPort)));
  Conn& c = conns_[key(port, guestPort)];
  c.fd = fd;
  c.hostPort = port;
  c.guestPort = guestPort;
  byFd_[fd] = key(port, guestPort);
  queueControl(port, guestPort, kOpRequest);
  fillRx();
  return true;
}

}  // namespace virtio
}  // namespace skiff
